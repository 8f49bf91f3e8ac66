"""Training with tf.distribute: MirroredStrategy on two logical CPUs,
MultiWorkerMirroredStrategy with two local worker processes (and the opt-in
Keras fix it needs), and XLA-compiled `fit`, all with FeatureRedraw; and
that `import keras_favor` leaves Keras alone."""

import json
import os
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import keras_favor
from keras_favor.distribute import multi_worker_fit
from tests import fit_script

REPO = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
SCRIPT = os.path.join(REPO, "tests", "fit_script.py")
PROCESS_TIMEOUT_S = 180
# Run as a module of the `examples` package (PYTHONPATH holds REPO).
EXAMPLE = ["-m", "examples.distributed_training"]


def free_ports(count):
    """`count` distinct ports that were free on 127.0.0.1 just now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def subprocess_env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(
        [REPO] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    env.update(extra)
    return env


def run_processes(commands, envs, log_paths, timeout=PROCESS_TIMEOUT_S):
    """Starts the commands together and waits for all of them, at most
    `timeout` seconds in total; kills the rest when one overruns. Output
    goes to files, so no pipe can fill up and block a process."""
    processes = []
    for command, env, log_path in zip(commands, envs, log_paths):
        with open(log_path, "w") as log:
            processes.append(
                subprocess.Popen(
                    command, env=env, stdout=log, stderr=subprocess.STDOUT
                )
            )
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    return [process.returncode for process in processes]


def log_tail(path, chars=4000):
    with open(path) as f:
        return f.read()[-chars:]


def run_script(mode, out_dirs, envs):
    """Runs `fit_script.py mode` once per output directory; returns each
    run's `result.json` and `weights.npz`."""
    logs = [os.path.join(out_dir + ".log") for out_dir in out_dirs]
    commands = [[sys.executable, SCRIPT, mode, out_dir] for out_dir in out_dirs]
    codes = run_processes(commands, envs, logs)
    for code, log in zip(codes, logs):
        assert code == 0, f"{mode} exited with {code}:\n{log_tail(log)}"
    results = []
    for out_dir in out_dirs:
        with open(os.path.join(out_dir, "result.json")) as f:
            summary = json.load(f)
        with np.load(os.path.join(out_dir, "weights.npz")) as arrays:
            results.append((summary, dict(arrays)))
    return results


def two_worker_envs():
    """Subprocess environments whose TF_CONFIG makes a two-worker cluster
    on localhost."""
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    return [
        subprocess_env(
            TF_CONFIG=json.dumps(
                {
                    "cluster": {"worker": workers},
                    "task": {"type": "worker", "index": index},
                }
            )
        )
        for index in range(2)
    ]


def run_two_workers(mode, tmp_path):
    out_dirs = [str(tmp_path / f"worker{index}") for index in range(2)]
    return run_script(mode, out_dirs, two_worker_envs())


def expected_projection(redraws):
    """The attention layer's projection after `redraws` FeatureRedraw
    redraws, computed here, in one process, without any strategy."""
    model = fit_script.tiny_model()
    callback = keras_favor.FeatureRedraw(seed=fit_script.REDRAW_SEED)
    callback.set_model(model)
    for _ in range(redraws):
        callback.redraw()
    return keras.ops.convert_to_numpy(model.get_layer("attention").projection)


def expected_redraw_counts(steps):
    return [step // fit_script.INTERVAL for step in range(1, steps + 1)]


def check_distributed_fit(summary, arrays):
    records = summary["records"]
    steps = (
        fit_script.EPOCHS * fit_script.NUM_EXAMPLES // (fit_script.GLOBAL_BATCH)
    )
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert [r["redraw_count"] for r in records] == expected_redraw_counts(steps)
    assert all(r["copies_equal"] for r in records)
    sums = {r["redraw_count"]: r["projection_sum"] for r in records}
    assert len(set(sums.values())) == len(sums), "a redraw changed nothing"
    assert summary["loss"][-1] < summary["loss"][0]
    assert np.isfinite(summary["evaluate_loss"])
    assert summary["predict_shape"] == [fit_script.NUM_EXAMPLES, 1]
    assert summary["projection_kept_by_evaluate_and_predict"]
    np.testing.assert_array_equal(
        arrays["projection"], expected_projection(steps // fit_script.INTERVAL)
    )


@pytest.mark.integration
def test_import_leaves_keras_alone_and_mirrored_fit_keeps_replicas_equal(
    tmp_path,
):
    """In a fresh process: `import keras_favor` (and `keras_favor.convert`)
    imports no keras-hub, an extra, and keeps Keras's trainer functions
    (the same objects), the first `enable_multi_worker_fit()`
    wraps them and the second changes nothing; then, with the stock
    functions back, MirroredStrategy trains with FeatureRedraw and keeps
    both replicas' projections equal."""
    [(summary, arrays)] = run_script(
        "mirrored", [str(tmp_path / "mirrored")], [subprocess_env()]
    )
    untouched = summary.pop("keras_untouched")
    needed = multi_worker_fit._keras_needs_fix()
    assert untouched["keras_hub_imported"] is False
    assert untouched["unchanged_by_import"] == [True, True]
    assert untouched["enable_results"] == [needed, False]
    assert untouched["enabled"] == needed
    assert untouched["patched_wraps_stock"] == [needed, needed]
    assert untouched["unchanged_by_second_call"] == [True, True]

    assert summary["num_replicas"] == 2
    assert all(r["num_copies"] == 2 for r in summary["records"])
    check_distributed_fit(summary, arrays)


@pytest.mark.integration
def test_multi_worker_fit_needs_the_fix_and_gives_identical_workers(tmp_path):
    """Two workers on localhost: after `import keras_favor`, stock Keras
    fails in both places the fix patches (on a Keras that needs it), each
    half of the fix is needed, and after `enable_multi_worker_fit()` both
    workers train to identical weights and projections."""
    needed = multi_worker_fit._keras_needs_fix()
    results = run_two_workers("multi_worker", tmp_path)
    for summary, arrays in results:
        assert not summary.pop("enabled_after_import")
        assert summary.pop("enable_result") == needed
        stock_error = summary.pop("stock_error")
        half_fix_error = summary.pop("symbolic_build_fix_only_error")
        if needed:
            assert "PerReplica" in stock_error
            assert "reduction dimension" in half_fix_error
        else:
            # Past the last affected version: stock Keras must work, or
            # `_AFFECTED_KERAS_VERSIONS` needs a higher bound.
            assert stock_error is None
        assert summary["num_replicas"] == 2
        check_distributed_fit(summary, arrays)
    (summary_0, arrays_0), (summary_1, arrays_1) = results
    assert summary_0 == summary_1
    assert arrays_0.keys() == arrays_1.keys()
    for name in arrays_0:
        np.testing.assert_array_equal(arrays_0[name], arrays_1[name])


@pytest.fixture
def stock_trainer_functions():
    """The trainer functions as they are now (stock: this process never
    enables the fix); restored after the test, whatever it patched."""
    functions = fit_script.keras_trainer_functions()
    assert not multi_worker_fit.multi_worker_fit_enabled()
    yield functions
    trainer = multi_worker_fit._tensorflow_trainer_class()
    trainer._maybe_symbolic_build = functions[0]
    sys.modules[trainer.__module__].reduce_per_replica = functions[1]
    assert not multi_worker_fit.multi_worker_fit_enabled()


@pytest.mark.parametrize(
    "version, backend, patches",
    [
        ("3.0.0", "tensorflow", True),
        ("3.15.1", "tensorflow", True),
        ("2.15.0", "tensorflow", False),
        ("3.16.0", "tensorflow", False),
        ("4.0.0", "tensorflow", False),
    ],
)
def test_enabling_is_version_gated(
    stock_trainer_functions, monkeypatch, version, backend, patches
):
    monkeypatch.setattr(keras, "version", lambda: version)
    monkeypatch.setattr(keras.backend, "backend", lambda: backend)
    assert keras_favor.distribute.enable_multi_worker_fit() == patches
    after = fit_script.keras_trainer_functions()
    changed = [a is not b for a, b in zip(after, stock_trainer_functions)]
    assert changed == [patches, patches]
    assert multi_worker_fit.multi_worker_fit_enabled() == patches
    assert not keras_favor.distribute.enable_multi_worker_fit()


def test_enabling_on_another_backend_names_it(
    stock_trainer_functions, monkeypatch
):
    # tf.distribute is TensorFlow's: on another backend a clear error, and
    # Keras stays unpatched.
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(RuntimeError, match="'jax' backend"):
        keras_favor.distribute.enable_multi_worker_fit()
    after = fit_script.keras_trainer_functions()
    assert all(a is b for a, b in zip(after, stock_trainer_functions))
    assert not multi_worker_fit.multi_worker_fit_enabled()


def test_public_surface():
    assert keras_favor.distribute.__all__ == [
        "enable_multi_worker_fit",
        "multi_worker_fit_enabled",
        "sequence_replicas",
    ]
    public = {
        name
        for name in vars(keras_favor.distribute)
        if not name.startswith("_")
    }
    modules = {
        "multi_worker_fit",
        "replica_sequence_parallel",
        "sequence_parallel",
    }
    assert public - modules == set(keras_favor.distribute.__all__)


@pytest.mark.parametrize("use_causal_mask", [False, True])
def test_xla_fit_reads_redrawn_projection(use_causal_mask):
    """XLA-compiled training and prediction read the projection variable:
    with redraws between steps they match a model trained without XLA (and
    training without redraws ends elsewhere); a redraw after training
    changes the compiled predictions."""
    x, y = fit_script.toy_data(32)

    def trained(jit_compile, redraw):
        # The models without XLA run eagerly: no compilation at all, and
        # no function to trace.
        model = fit_script.compile_model(
            fit_script.tiny_model(use_causal_mask),
            jit_compile=jit_compile,
            run_eagerly=not jit_compile,
        )
        # A redraw after every step, the last one too (no final window).
        callbacks = [
            keras_favor.FeatureRedraw(interval=1, seed=1, final_window=0)
        ]
        model.fit(
            x,
            y,
            batch_size=8,
            shuffle=False,
            verbose=0,
            callbacks=callbacks if redraw else [],
        )
        return model

    xla, plain = trained(True, True), trained(False, True)
    plain_fixed = trained(False, False)
    assert xla.jit_compile and not plain.jit_compile and plain.run_eagerly
    layer = xla.get_layer("attention")
    assert int(layer.redraw_count.numpy()) == 4
    np.testing.assert_array_equal(
        layer.projection.numpy(),
        plain.get_layer("attention").projection.numpy(),
    )
    for a, b in zip(xla.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

    def key_kernel(model):
        return model.get_layer("attention").key_dense.kernel.numpy()

    # Without the redraws the weights come out elsewhere, so XLA training
    # with a projection baked in could not have matched `plain`.
    assert not np.allclose(key_kernel(xla), key_kernel(plain_fixed), atol=1e-4)

    before = xla.predict(x, verbose=0)
    for model in (xla, plain):
        model.get_layer("attention").redraw_features(123)
    after = xla.predict(x, verbose=0)
    assert not np.allclose(before, after, atol=1e-4)
    np.testing.assert_allclose(
        after, plain.predict(x, verbose=0), rtol=1e-4, atol=1e-5
    )


# Runs the example's `main` twice in one process (a TensorFlow start fewer
# than two processes): interrupted, then resumed from the backup with a new
# strategy, model and callbacks.
INTERRUPT_AND_RESUME = """
import sys
from examples.distributed_training import main

main(sys.argv[1:] + ["--interrupt-after-epoch=1"])
print("RUN AGAIN", flush=True)
main(sys.argv[1:])
"""


@pytest.mark.integration
def test_example_trains_and_resumes(tmp_path):
    """examples/distributed_training.py, interrupted after its first epoch
    and run again, resumes at the step and redraw count it stopped at."""
    command = [
        sys.executable,
        "-c",
        INTERRUPT_AND_RESUME,
        "--epochs=2",
        "--steps-per-epoch=3",
        "--redraw-interval=2",
        f"--backup-dir={tmp_path / 'backup'}",
    ]
    log = str(tmp_path / "run.log")
    [code] = run_processes([command], [subprocess_env()], [log])
    output = log_tail(log, chars=40000)
    assert code == 0, output
    outputs = output.split("RUN AGAIN")
    assert len(outputs) == 2, output
    assert "Interrupted after epoch 1" in outputs[0]
    assert (
        "starts at step 3; redraw count per attention layer: [1, 1]"
        in outputs[1]
    )
    # 6 steps: redraws after steps 2 and 4; none in the last 2 steps.
    assert "Done; redraw count per attention layer: [2, 2]" in outputs[1]


@pytest.mark.integration
def test_example_trains_on_two_workers(tmp_path):
    """examples/distributed_training.py with TF_CONFIG set trains under
    MultiWorkerMirroredStrategy (which needs its `enable_multi_worker_fit`
    call) on two local workers."""
    command = [
        sys.executable,
        *EXAMPLE,
        "--epochs=1",
        "--steps-per-epoch=2",
        # A redraw after step 1, none in the last step.
        "--redraw-interval=1",
        f"--backup-dir={tmp_path / 'backup'}",
    ]
    logs = [str(tmp_path / f"worker{index}.log") for index in range(2)]
    codes = run_processes([command] * 2, two_worker_envs(), logs)
    for code, log in zip(codes, logs):
        output = log_tail(log, chars=20000)
        assert code == 0, output
        assert "2 replica(s) in sync" in output
        assert "Done; redraw count per attention layer: [1, 1]" in output
