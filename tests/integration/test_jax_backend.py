"""What needs a fresh process per backend: redraws per backend, `import
keras_favor` without TensorFlow, and unsupported backends.
tests/integration/backend_script.py runs each check with KERAS_BACKEND set
and writes what it found (this pytest process stays on its own backend).
Everything else runs on each backend in turn (`make test`, the
`backend_independent` modules); tests/layers/test_backend_outputs.py checks
on each that weights written by the TensorFlow backend give its outputs and
gradients.

Random draws are the backend's own: a seed gives the same projection on
every call and device of a backend, not the same on both backends.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("jax") is None,
    reason="JAX is not installed (the `test` extra installs it)",
)

SCRIPT = os.path.join(os.path.dirname(__file__), "backend_script.py")
ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)


def run_script(backend, modes, out_dir, timeout=600, **extra_env):
    """Runs backend_script.py's `modes` (a list) in one process on
    `backend`; returns the JSON result of each, by mode."""
    env = dict(os.environ, **extra_env)
    env["KERAS_BACKEND"] = backend
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # One CPU device for JAX, quiet about absent accelerators.
    env.setdefault("JAX_PLATFORMS", "cpu")
    process = subprocess.run(
        [sys.executable, SCRIPT, *modes, str(out_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert process.returncode == 0, process.stderr[-6000:]
    results = {}
    for mode in modes:
        with open(os.path.join(out_dir, f"{mode}.json")) as file:
            results[mode] = json.load(file)
    return results


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_backend")


@pytest.fixture(scope="module")
def jax_results(out_dir):
    """Both checks in one JAX process (a start costs seconds): the import
    first, which must load no TensorFlow, then the redraws."""
    return run_script("jax", ["import", "redraws"], out_dir)


def test_import_needs_no_tensorflow_and_distribute_names_the_backend(
    jax_results,
):
    result = jax_results["import"]
    assert result["backend"] == "jax"
    assert not result["tensorflow_imported"]
    assert "'jax' backend" in result["distribute_error"]
    assert "tf.distribute" in result["distribute_error"]
    assert not result["multi_worker_fit_enabled"]


def test_redraws_are_deterministic_per_backend_not_across_backends(
    out_dir, jax_results
):
    # FeatureRedraw's seeds are the same on both backends, but each
    # backend's stateless generator turns them into its own numbers
    # (TensorFlow's Philox, JAX's threefry): a seed gives one projection
    # per backend, the same in every process and model, and a different
    # one on the other backend (the FeatureRedraw docstring and the README
    # say so). On TensorFlow, this process, a second process and a second
    # model in it agree bit for bit.
    from tests.integration.backend_script import redraw_sequence

    draws = {}
    results = {
        "tensorflow": run_script("tensorflow", ["redraws"], out_dir),
        "jax": jax_results,
    }
    for name in ("tensorflow", "jax"):
        result = results[name]["redraws"]
        assert result["backend"] == name
        assert result["identical_in_process"], name
        draws[name] = dict(
            np.load(os.path.join(out_dir, f"redraws_{name}.npz"))
        )
    here = redraw_sequence()
    names = sorted(here)
    # Two layers, each as built and after two redraws.
    assert len(names) == 6 and sorted(draws["jax"]) == names
    for name in names:
        np.testing.assert_array_equal(draws["tensorflow"][name], here[name])
        tf_draw, jax_draw = draws["tensorflow"][name], draws["jax"][name]
        assert tf_draw.shape == jax_draw.shape == (8, 8), name
        assert not np.allclose(tf_draw, jax_draw, atol=1e-3), name
        # Both are orthogonal projections: the rows of each 8 x 8 block
        # are orthogonal, with chi-distributed norms.
        for draw in (tf_draw, jax_draw):
            norms = np.linalg.norm(draw, axis=-1)
            directions = draw / norms[:, None]
            np.testing.assert_allclose(
                directions @ directions.T, np.eye(8), atol=1e-5
            )
    # Each redraw changes every layer's projection, on both backends.
    for draw in draws.values():
        for path in {name.rsplit("/", 1)[0] for name in names}:
            for k in (1, 2):
                assert not np.array_equal(
                    draw[f"{path}/{k}"], draw[f"{path}/{k - 1}"]
                ), path


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_import_on_an_unsupported_backend_names_it(backend):
    # PyTorch is not installed here: Keras itself fails to import, and
    # keras_favor says so. The numpy backend imports, and keras_favor
    # refuses it. Both name the backend and the supported ones, in one
    # ImportError without Keras's traceback.
    process = subprocess.run(
        [sys.executable, "-c", "import keras_favor"],
        env=dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 1
    last = process.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: keras_favor"), process.stderr[-2000:]
    assert f"KERAS_BACKEND={backend}" in last
    assert "tensorflow and jax" in last
    if importlib.util.find_spec(backend) is None:
        assert f"No module named {backend!r}" in last
        assert "keras/src" not in process.stderr
    else:
        assert f"does not support the Keras backend {backend!r}" in last
