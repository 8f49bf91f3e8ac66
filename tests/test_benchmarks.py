"""Smoke tests: the benchmark scripts run end to end at tiny sizes.

They check the scripts' plumbing (CSV, caps, watchdog, plots, summaries),
not speed: timings belong to the benchmarks themselves.
"""

import csv
import os
import sys

import pytest

BENCHMARKS_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks")
sys.path.insert(0, BENCHMARKS_DIR)

import approximation  # noqa: E402
import speed_memory  # noqa: E402


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def run_main(module, monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    module.main()


def test_speed_sweep_records_caps_and_plots(tmp_path, monkeypatch):
    # A time cap of 0 s puts every first length over budget: the longer
    # length must then be skipped, not run.
    run_main(
        speed_memory, monkeypatch,
        "--in-process", "--levels", "layer", "--models", "favor",
        "--passes", "forward_backward", "--lengths", "16", "32",
        "--repeats", "1", "--min-repeats", "1", "--time-cap-s", "0",
        "--output-dir", str(tmp_path),
    )
    rows = read_csv(tmp_path / "speed_memory_cpu.csv")
    measured = [r for r in rows if r["length"] == "16"]
    assert sorted(r["mode"] for r in measured) == ["bidirectional", "causal"]
    for row in measured:
        assert row["status"] == "over_time_cap"
        assert float(row["median_s"]) > 0
        assert float(row["peak_rss_mib"]) >= float(row["baseline_rss_mib"]) > 0
    assert [r["status"] for r in rows if r["length"] == "32"] == ["skipped"] * 2
    for name in ("layer.png", "summary.txt", "tables.md"):
        assert (tmp_path / f"speed_memory_cpu_{name}").stat().st_size > 0
    environment = (tmp_path / "speed_memory_cpu.json").read_text()
    assert "tensorflow" in environment


def test_identity_stack_step_runs():
    # The stack level's models build and run one compiled training step.
    import models
    import timing

    stack = models.block_stack("identity", causal=False)
    stack.build((1, 8, models.HIDDEN))
    step = timing.compiled_step(
        stack, stack.trainable_variables, "forward_backward"
    )
    first, times = timing.time_step(step, timing.random_inputs(8, models.HIDDEN), 1)
    assert first > 0 and len(times) == 1


def isolated_args(**overrides):
    args = speed_memory.parse_args(["--repeats", "1", "--min-repeats", "1"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_watchdog_kills_a_worker_over_the_memory_cap():
    # Importing TensorFlow alone passes 0.1 GB.
    args = isolated_args(memory_cap_gb=0.1)
    command = speed_memory.worker_command(args, "layer", "favor", "causal", "forward", 16)
    result = speed_memory.run_isolated(command, args)
    assert result["status"] == "out_of_memory"
    assert result["note"].startswith("killed at")


def test_crossover_interpolates_between_measured_lengths():
    rows = [
        {"level": "layer", "model": model, "mode": "causal", "pass": "forward",
         "length": length, "status": "ok", "median_s": seconds}
        for model, length, seconds in (
            ("favor", 1024, 2.0), ("exact", 1024, 1.0),
            ("favor", 4096, 2.0), ("exact", 4096, 4.0),
        )
    ]
    # exact / favor goes from 1/2 to 2 between 1024 and 4096: 1 at 2048.
    assert speed_memory.crossover_length(rows, "causal", "forward") == 2048
    assert speed_memory.crossover_length(rows, "bidirectional", "forward") is None


def test_approximation_writes_errors_and_checks(tmp_path, monkeypatch):
    run_main(
        approximation, monkeypatch,
        "--length", "64", "--dim", "4", "--num-features", "4", "8",
        "--samples", "2", "--output-dir", str(tmp_path),
    )
    rows = read_csv(tmp_path / "approximation.csv")
    # 2 regimes x 2 feature maps x 2 projections x 2 sizes x 2 samples.
    assert len(rows) == 32
    assert all(float(r["mse"]) >= 0 for r in rows)
    summary = (tmp_path / "approximation_summary.txt").read_text()
    assert summary.count("HOLD") == 8
    assert (tmp_path / "approximation.png").stat().st_size > 0


def test_approximation_error_is_small_with_many_features():
    # With flat attention and many features FAVOR+ is close to exact.
    rows = approximation.measure("flat", 128, 4, [4096], 1, 0)
    positive = [r["mse"] for r in rows if r["feature_map"] == "positive"]
    assert max(positive) < 1e-4


def test_flop_counts_match_the_products_in_the_step_graphs():
    # The arithmetic bound in BENCHMARKS.md rests on these counts: they must
    # agree with the products each timed step really runs. FAVOR+ also has
    # its normalizer's matrix-vector products (about 0.5 %), left out.
    import flop_bound

    length = 256
    for kind, count, tolerance in (
        ("favor", flop_bound.favor_step_flops, 0.01),
        ("exact", flop_bound.exact_step_flops, 1e-9),
    ):
        counted = flop_bound.graph_step_flops(kind, "bidirectional", length)
        assert abs(counted - count(length)) <= tolerance * count(length), kind


def test_causal_flop_count_matches_the_products_in_the_step_graph():
    # BENCHMARKS.md explains the causal step's time with this count: 1024
    # positions make 16 chunks of 64, passed on in two blocks of 8.
    import flop_bound
    import models

    length = 1024
    chunk_size = models.attention_layer("favor").chunk_size
    counted = flop_bound.graph_step_flops("favor", "causal", length)
    expected = flop_bound.favor_causal_step_flops(length, chunk_size)
    assert counted == expected


@pytest.mark.parametrize("kind", ["favor", "exact"])
def test_products_are_rebuilt_as_the_step_runs_them(kind):
    # flop_bound.py times each product of a step alone; it must rebuild the
    # very product: the same output shape for every one in the graph.
    import flop_bound

    graph = flop_bound.step_graph(kind, "bidirectional", 256)
    products = flop_bound.executed_products(graph)
    assert len(products) >= 10
    for op in products:
        product, inputs = flop_bound.rebuilt_product(op)
        assert product(*inputs).shape == op.outputs[0].shape, op.name
