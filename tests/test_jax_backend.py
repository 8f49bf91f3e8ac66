"""keras_favor on the JAX backend, in subprocesses with KERAS_BACKEND=jax
(this pytest process stays on TensorFlow); tests/backend_script.py runs
them and writes what it found.

The forward passes are compared with the TensorFlow backend's for the same
weights and projection. Random draws are the backend's own: a seed gives
the same projection on every call and device of a backend, not the same on
both backends, so the JAX checks of projections are distributional.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import backend_script

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("jax") is None,
    reason="JAX is not installed (the `test` extra installs it)",
)

SCRIPT = os.path.join(os.path.dirname(__file__), "backend_script.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(backend, mode, out_dir, timeout=600):
    env = dict(os.environ)
    env["KERAS_BACKEND"] = backend
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # One CPU device for JAX, quiet about absent accelerators.
    env.setdefault("JAX_PLATFORMS", "cpu")
    process = subprocess.run(
        [sys.executable, SCRIPT, mode, str(out_dir)],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert process.returncode == 0, process.stderr[-6000:]
    path = os.path.join(out_dir, f"{mode}.json")
    if os.path.exists(path):
        with open(path) as file:
            return json.load(file)
    return None


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_backend")


def test_import_needs_no_tensorflow_and_distribute_names_the_backend(
    out_dir,
):
    result = run_script("jax", "import", out_dir)
    assert result["backend"] == "jax"
    assert not result["tensorflow_imported"]
    assert "'jax' backend" in result["distribute_error"]
    assert "tf.distribute" in result["distribute_error"]
    assert not result["multi_worker_fit_enabled"]


def test_forward_equals_tensorflow_for_the_same_weights(out_dir):
    run_script("tensorflow", "draw", out_dir)
    run_script("jax", "forward", out_dir)
    tensorflow = np.load(os.path.join(out_dir, "draw.npz"))
    jax = np.load(os.path.join(out_dir, "forward_jax.npz"))
    names = [config[0] for config in backend_script.configurations()]
    assert len(names) == 18
    for name in names:
        expected = tensorflow[f"{name}/output"]
        got = jax[f"{name}/output"]
        assert got.shape == expected.shape, name
        scale = np.abs(expected).max()
        # Looser bounds where round-off is amplified: trigonometric
        # features' normalizer can come near zero (measured 7e-5), and at
        # input scale 100 the logits are very large, so the dense
        # projections' round-off (each backend orders its sums its own way)
        # moves the exponents (measured 8e-5).
        rtol = 1e-5
        if name.startswith("softmax_trig"):
            rtol = 2e-4
        elif name.endswith("_large"):
            rtol = 5e-4
        np.testing.assert_allclose(
            got, expected, rtol=rtol, atol=rtol * scale, err_msg=name
        )


def test_projections_redraws_dropout_and_mixed_precision(out_dir):
    result = run_script("jax", "features", out_dir)
    for norm in ("chi", "sqrt_d"):
        orthogonal = result[f"orthogonal_{norm}"]
        assert orthogonal["shape"] == [10, 4]
        assert orthogonal["dtype"] == "float32"
        assert orthogonal["off_diagonal"] < 1e-5
        assert orthogonal["reproducible"] and orthogonal["seed_matters"]
    low, high = result["orthogonal_sqrt_d"]["row_norm_range"]
    assert abs(low - 2.0) < 1e-5 and abs(high - 2.0) < 1e-5
    assert abs(result["iid"]["mean"]) < 0.1
    assert abs(result["iid"]["std"] - 1.0) < 0.1
    assert result["iid"]["reproducible"]
    assert result["iid_tensor_seed_shape"] == [3, 2]
    assert result["redraw"] == {
        "changed": True, "reproducible": True, "count": 1,
    }
    assert result["unseeded_redraws_differ"]
    assert result["dropout"]["finite"] == {"False": True, "True": True}
    assert result["dropout"]["grouped_finite"]
    assert result["dropout"]["training_differs"]
    assert result["mixed"]["dtype"] == "float16"
    assert result["mixed"]["max_error"] < 1e-2 * result["mixed"]["scale"]


def test_grouped_recomputation_gradients_equal_one_group(out_dir):
    result = run_script("jax", "gradients", out_dir)
    assert result["False"] < 1e-5
    assert result["True"] < 1e-5


def test_causal_state_in_pieces_and_the_sequential_performer(out_dir):
    result = run_script("jax", "state", out_dir)
    assert result["pieces_error"] < 2e-6
    assert result["sequential_error"] < 1e-6


def test_savedmodel_export_of_unknown_lengths_names_the_backend(out_dir):
    result = run_script("jax", "export", out_dir)
    # Keras exports a fixed-length model through jax2tf, which works.
    assert result["fixed_length_error"] < 1e-5
    for name in ("favor_attention", "build_performer"):
        assert result[name] is not None, name
        assert "RuntimeError" in result[name], result[name]
        assert "needs the TensorFlow backend" in result[name]
        assert "'jax' backend" in result[name]


def test_fit_with_jit_compile_redraws_and_keras_saving(out_dir):
    result = run_script("jax", "fit", out_dir)
    for task in ("classification", "language_model"):
        run = result[task]
        assert run["jit_compile"], task
        assert run["losses"][-1] < run["losses"][0], (task, run["losses"])
        assert run["reload_error"] < 1e-6, task
        # 16 steps, a redraw every 3, none in the final window.
        assert run["redraw_counts"] == [4], task
