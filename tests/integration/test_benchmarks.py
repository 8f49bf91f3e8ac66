"""Smoke tests: the benchmark scripts run end to end at tiny sizes.

They check the scripts' plumbing (CSV, caps, watchdog, plots, summaries)
and the FLOP counts BENCHMARKS.md explains, not speed: timings belong to the
benchmarks themselves.
"""

import csv
import os
import sys

import numpy as np
import pytest

from benchmarks import approximation
from benchmarks import flop_bound
from benchmarks import long_sequence
from benchmarks import models
from benchmarks import speed_memory

REPOSITORY_DIR = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def run_main(module, monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    module.main()


def test_environment_is_read_here_when_this_process_runs_tensorflow(
    monkeypatch,
):
    # A parent that runs Keras on TensorFlow, the workers' backend, reads
    # the backend's description itself; any other asks a subprocess.
    import keras

    from benchmarks import common

    calls, run = [], common.subprocess.run

    def subprocess_run(command, **kwargs):
        if command[0] != sys.executable:
            return run(command, **kwargs)  # git, for the commit
        calls.append(command)
        raise RuntimeError("a Python subprocess was started")

    monkeypatch.setattr(common.subprocess, "run", subprocess_run)
    monkeypatch.setattr(common, "_BACKEND_DESCRIPTIONS", {})
    monkeypatch.setenv("KERAS_BACKEND", keras.backend.backend())
    if keras.backend.backend() == "tensorflow":
        described = common.environment()
        assert not calls
        for key, value in common._backend_description().items():
            assert described[key] == value
        assert described["tensorflow"] and described["keras"]
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    with pytest.raises(RuntimeError, match="a Python subprocess was started"):
        common.environment()
    assert len(calls) == 1


def test_speed_sweep_records_caps_and_plots(tmp_path, monkeypatch):
    # In this process (no workers). A time cap of 0 s puts every first
    # length over budget: the longer length must then be skipped, not run.
    monkeypatch.setattr(
        speed_memory,
        "run_isolated",
        lambda args, row: speed_memory.measure(dict(row, **vars(args))),
    )
    monkeypatch.setattr(
        speed_memory.common, "environment", speed_memory.common.describe
    )
    run_main(
        speed_memory,
        monkeypatch,
        "--levels",
        "layer",
        "--models",
        "favor",
        "--passes",
        "forward_backward",
        "--lengths",
        "16",
        "32",
        "--repeats",
        "1",
        "--min-repeats",
        "1",
        "--time-cap-s",
        "0",
        "--output-dir",
        str(tmp_path),
    )
    rows = read_csv(tmp_path / "speed_memory_cpu.csv")
    assert list(rows[0]) == list(speed_memory.FIELDS)
    measured = [r for r in rows if r["length"] == "16"]
    assert sorted(r["mode"] for r in measured) == ["bidirectional", "causal"]
    for row in measured:
        assert row["status"] == "over_time_cap"
        assert (
            float(row["max_s"])
            >= float(row["median_s"])
            >= float(row["min_s"])
            > 0
        )
        assert float(row["peak_rss_mib"]) >= float(row["baseline_rss_mib"]) > 0
    assert [r["status"] for r in rows if r["length"] == "32"] == ["skipped"] * 2
    for name in ("layer.png", "summary.txt"):
        assert (tmp_path / f"speed_memory_cpu_{name}").stat().st_size > 0
    assert "tensorflow" in (tmp_path / "speed_memory_cpu.json").read_text()


@pytest.mark.parametrize("kind", ["identity", "favor"])
def test_stack_step_runs(kind):
    # The stack level's models build and run one compiled training step.
    stack, forward = models.build("stack", kind, causal=True, length=8)
    step = models.compiled_step(
        forward, stack.trainable_variables, "forward_backward"
    )
    first, times = speed_memory.common.time_calls(
        step, [models.random_inputs(8)], 2
    )
    assert first > 0 and len(times) == 2


def test_identity_stack_keeps_the_value_and_output_projections():
    # The lower bound is IdentityBlock: a block without mixing of positions,
    # not without its attention's value and output projections; it lacks only
    # the query and key kernels and biases.
    identity, favor = (
        models.build("stack", kind, False, 8)[0]
        for kind in ("identity", "favor")
    )
    assert all(
        type(block) is models.IdentityBlock and block.attention == "identity"
        for block in identity.layers
    )
    query_key = 2 * (2 * models.HIDDEN**2 + 2 * models.HIDDEN)  # 2 blocks
    assert sum(v.numpy().size for v in identity.trainable_variables) == (
        sum(v.numpy().size for v in favor.trainable_variables) - query_key
    )
    # No mixing of positions: each position's output depends on itself only.
    x = models.random_inputs(5)
    np.testing.assert_allclose(
        identity(x)[:, 2:3], identity(x[:, 2:3]), atol=1e-5
    )


def test_watchdog_kills_a_worker_over_the_memory_cap():
    # Importing TensorFlow alone passes 0.1 GB.
    args = speed_memory.parse_args(["--repeats", "1", "--memory-cap-gb", "0.1"])
    configuration = {
        "level": "layer",
        "model": "favor",
        "mode": "causal",
        "pass": "forward",
        "length": 16,
    }
    result = speed_memory.run_isolated(args, configuration)
    assert result["status"] == "out_of_memory"
    assert result["note"].startswith("killed at")


def test_crossover_interpolates_between_measured_lengths():
    rows = [
        {
            "level": "layer",
            "model": model,
            "mode": "causal",
            "pass": "forward",
            "length": length,
            "status": "ok",
            "median_s": seconds,
        }
        for model, length, seconds in (
            ("favor", 1024, 2.0),
            ("exact", 1024, 1.0),
            ("favor", 4096, 2.0),
            ("exact", 4096, 4.0),
        )
    ]
    # exact / favor goes from 1/2 to 2 between 1024 and 4096: 1 at 2048.
    assert speed_memory.crossover_length(rows, "causal", "forward") == 2048
    assert (
        speed_memory.crossover_length(rows, "bidirectional", "forward") is None
    )


def test_approximation_writes_errors_and_checks(tmp_path, monkeypatch):
    run_main(
        approximation,
        monkeypatch,
        "--length",
        "64",
        "--dim",
        "4",
        "--num-features",
        "4",
        "8",
        "--samples",
        "2",
        "--output-dir",
        str(tmp_path),
    )
    rows = read_csv(tmp_path / "approximation.csv")
    assert list(rows[0]) == list(approximation.FIELDS)
    # 2 regimes x 2 feature maps x 2 projections x 2 sizes x 2 samples.
    assert len(rows) == 32
    assert all(float(r["mse"]) >= 0 for r in rows)
    # The float32 kernel matches the float64 quadratic form of its features.
    positive = [
        float(r["mse_vs_quadratic_form"])
        for r in rows
        if r["sample"] == "0" and r["feature_map"] == "positive"
    ]
    assert len(positive) == 8 and max(positive) < 1e-10
    summary = (tmp_path / "approximation_summary.txt").read_text()
    assert summary.count("HOLD") == 8
    assert (tmp_path / "approximation.png").stat().st_size > 0


def test_approximation_error_is_small_with_many_features():
    # With flat attention and many features FAVOR+ is close to exact.
    rows = approximation.measure("flat", 128, 4, [4096], 1, 0)
    positive = [r["mse"] for r in rows if r["feature_map"] == "positive"]
    assert max(positive) < 1e-4


# The FLOP counts of the timed steps, written out: BENCHMARKS.md explains the
# speed-up and the causal cost with them; flop_bound.py counts the graphs.
H, F, D, E = (
    models.NUM_HEADS,
    models.NUM_FEATURES,
    models.KEY_DIM,
    models.HIDDEN,
)


def projection_flops(length):
    # Query, key, value kernels forward and their gradients, and the output
    # projection's input gradient (the input takes no gradient, and a sum of
    # outputs needs no output projection for the weights' gradients).
    return 8 * 2 * length * E * E


def test_exact_step_flops_are_the_two_products_and_their_gradients():
    length = 256
    expected = projection_flops(length) + 6 * 2 * length * length * H * D
    assert flop_bound.step_flops("exact", "bidirectional", length) == expected


def test_favor_step_flops_are_ten_feature_sized_products():
    # The feature projections of queries and keys, K'^T V and Q' (K'^T V),
    # and their gradients, 2 L H F D each; plus the normalizer's
    # matrix-vector products, about 0.5 %.
    length = 256
    expected = projection_flops(length) + 10 * 2 * length * H * F * D
    counted = flop_bound.step_flops("favor", "bidirectional", length)
    assert expected <= counted <= 1.01 * expected


def test_causal_step_flops_add_the_chunk_products_and_the_state_prefix():
    # 1024 positions: 16 chunks of 64, passed on in two blocks of 8.
    from keras_favor.ops.causal_attention import PREFIX_BLOCK

    length, chunk = 1024, models.build("layer", "favor", True, 8)[0].chunk_size

    def prefix_flops(
        chunks,
    ):  # forward, per head, for the (F, D) states and F sums
        state = F * D + F
        if chunks > PREFIX_BLOCK and chunks % PREFIX_BLOCK == 0:
            # The block's decay product, its sum at its last level, and the
            # outer product that adds the earlier blocks' sums to each chunk.
            within = 2 * chunks * PREFIX_BLOCK * state + 2 * 2 * chunks * state
            return within + prefix_flops(chunks // PREFIX_BLOCK)
        return 2 * chunks * chunks * state

    # Per position: the feature projections with gradients (4 F D); the
    # normalizer's sums ride as one more value column, [V, 1], so K'^T [V, 1]
    # and Q' [S, z] with two gradients each take 6 F (D + 1), and the chunk's
    # C x C scores and their product with [V, 1] 3 C (F + D + 1) with
    # gradients; the prefix's decay factors take no gradient.
    per_position = 4 * F * D + 6 * F * (D + 1) + 3 * chunk * (F + D + 1)
    expected = (
        projection_flops(length)
        + 2 * length * H * per_position
        + 2 * H * prefix_flops(length // chunk)
    )
    assert flop_bound.step_flops("favor", "causal", length) == expected


@pytest.mark.parametrize("kind", ["favor", "exact"])
def test_products_are_rebuilt_as_the_step_runs_them(kind):
    # flop_bound.py times each product of a step alone; it must rebuild the
    # very product: the same output shape for every one in the graph.
    products = flop_bound.products(
        flop_bound.step_graph(kind, "bidirectional", 256)
    )
    assert len(products) >= 10
    for op in products:
        product, inputs = flop_bound.rebuilt_product(op)
        assert product(*inputs).shape == op.outputs[0].shape, op.name


def test_flop_bound_reports_rates_and_floors(tmp_path, monkeypatch):
    # The report's lines at tiny sizes, from a speed CSV of two lengths.
    monkeypatch.setattr(flop_bound, "RATE_SHAPES", ((64, 64, 64),))
    monkeypatch.setattr(flop_bound, "CAUSAL_LENGTHS", (128,))
    monkeypatch.setattr(flop_bound, "FLOOR_LENGTH", 128)
    rows = [
        {
            "device": "cpu",
            "level": "layer",
            "model": model,
            "mode": mode,
            "pass": "forward_backward",
            "length": length,
            "status": "ok",
            "median_s": 0.01,
        }
        for model in ("favor", "exact")
        for mode in speed_memory.MODES
        for length in (64, 128)
    ]
    speed_memory.common.write_csv(
        tmp_path / "speed_memory_cpu.csv", speed_memory.FIELDS, rows
    )
    run_main(flop_bound, monkeypatch, "--output-dir", str(tmp_path))
    lines = (tmp_path / "flop_bound_cpu.txt").read_text().splitlines()
    assert lines[0].startswith("matrix-product rate") and "GFLOP/s" in lines[0]
    assert [line.split(":")[0] for line in lines[1:]] == ["L=64"] + [
        "L=128"
    ] * 4
    assert (
        "FLOP ratio" in lines[2]
        and "the bidirectional step's; measured 1.00x" in lines[3]
    )
    assert (
        "products alone" in lines[4]
        and "10x needs the FAVOR+ step within 0.001 s" in lines[5]
    )


def test_speed_sweep_runs_on_jax_without_tensorflow(tmp_path):
    # The GPU path (BENCHMARKS.md, "GPU"): KERAS_BACKEND=jax on a machine
    # without TensorFlow. A `tensorflow` package that fails to import
    # stands in for its absence, in the sweep and in its workers; the CSV
    # has the CPU runs' columns, in files of their own.
    pytest.importorskip("jax")
    import json
    import subprocess

    hidden = tmp_path / "no_tensorflow" / "tensorflow"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text(
        "raise ImportError('TensorFlow is not installed (hidden by the test)')\n"
    )
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(hidden.parent), REPOSITORY_DIR]),
    )
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.speed_memory",
            "--levels",
            "stack",
            "--models",
            "favor",
            "--passes",
            "forward_backward",
            "--lengths",
            "16",
            "--repeats",
            "1",
            "--min-repeats",
            "1",
            "--output-dir",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-4000:]
    rows = read_csv(tmp_path / "speed_memory_jax_cpu.csv")
    assert list(rows[0]) == list(speed_memory.FIELDS)
    # The stack level only (each row is a worker process: the layer
    # level's step is jax_step's too, compared with TensorFlow's below).
    assert sorted((r["level"], r["model"], r["mode"]) for r in rows) == [
        ("stack", "favor", "bidirectional"),
        ("stack", "favor", "causal"),
    ]
    for row in rows:
        assert row["status"] == "ok", row
        assert float(row["median_s"]) > 0
        assert float(row["peak_rss_mib"]) >= float(row["baseline_rss_mib"]) > 0
        assert row["jit_compile"] == "True" and row["device"] == "cpu"
    environment = json.loads(
        (tmp_path / "speed_memory_jax_cpu.json").read_text()
    )["runs"][0]["environment"]
    assert environment["backend"] == "jax" and "jax" in environment
    assert "tensorflow" not in environment
    assert not (tmp_path / "speed_memory_cpu.csv").exists()


def test_jax_step_is_the_sum_of_the_gradients(tmp_path):
    # The JAX backend's training step returns what models.compiled_step
    # returns on TensorFlow (run on the TensorFlow backend here, in this
    # process, against jax_step in a JAX subprocess: the sums of the
    # forward pass and of the gradients of the same weights).
    pytest.importorskip("jax")
    import json
    import subprocess

    import numpy as np

    length, results = 16, {}
    code = (
        "import json; import numpy as np;"
        "from benchmarks import models, speed_memory;"
        "layer, forward = models.build('layer', 'favor', True, {n});"
        "layer.set_weights([np.load({w!r})[str(i)] for i in range(len(layer.weights))]);"
        "x = models.random_inputs({n});"
        "print(json.dumps([float(speed_memory.jax_step(layer, forward, p)(x))"
        " for p in ('forward', 'forward_backward')]))"
    )
    layer, forward = models.build("layer", "favor", True, length)
    x = models.random_inputs(length)
    for pass_ in ("forward", "forward_backward"):
        step = models.compiled_step(forward, layer.trainable_variables, pass_)
        results[pass_] = float(step(x))
    weights = str(tmp_path / "weights.npz")
    np.savez(weights, **{str(i): w for i, w in enumerate(layer.get_weights())})
    process = subprocess.run(
        [sys.executable, "-c", code.format(n=length, w=weights)],
        cwd=REPOSITORY_DIR,
        env=dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-4000:]
    jax_forward, jax_gradients = json.loads(
        process.stdout.strip().splitlines()[-1]
    )
    np.testing.assert_allclose(jax_forward, results["forward"], rtol=1e-5)
    np.testing.assert_allclose(
        jax_gradients, results["forward_backward"], rtol=1e-4
    )


def test_long_sequence_keeps_the_rows_of_what_a_run_does_not_measure(tmp_path):
    path = str(tmp_path / "long_sequence.csv")
    first = [
        {"mode": "causal", "length": 8, "step_s": 1.0},
        {"mode": "bidirectional", "length": 8, "step_s": 2.0},
    ]
    assert long_sequence.with_earlier_rows(path, first) == first
    long_sequence.common.write_csv(path, long_sequence.FIELDS, first)
    again = [{"mode": "causal", "length": 8, "step_s": 3.0}]
    merged = long_sequence.with_earlier_rows(path, again)
    assert [(r["mode"], float(r["step_s"])) for r in merged] == [
        ("bidirectional", 2.0),
        ("causal", 3.0),
    ]
