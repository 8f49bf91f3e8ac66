"""Runs keras_favor on the backend of `KERAS_BACKEND`, in a fresh process,
for tests/integration/test_jax_backend.py: the checks that need a process
of their own (the rest of the suite runs on each backend in turn, `make
test`).

    KERAS_BACKEND=jax python tests/integration/backend_script.py MODE... DIR

Each mode (`import`, `redraws`), run in the order given, checks things on
its own and writes `DIR/<mode>.json` (`redraws` also writes
`DIR/redraws_<backend>.npz`); `import` comes first where it runs, since it
checks what importing keras_favor loads.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402


def run_import(out_dir):
    import keras

    import keras_favor

    result = {
        "backend": keras.backend.backend(),
        "tensorflow_imported": "tensorflow" in sys.modules,
        "version": keras_favor.__version__,
    }
    try:
        keras_favor.distribute.enable_multi_worker_fit()
        result["distribute_error"] = None
    except RuntimeError as error:
        result["distribute_error"] = str(error)
    result["multi_worker_fit_enabled"] = (
        keras_favor.distribute.multi_worker_fit_enabled()
    )
    return result


def redraw_sequence():
    """The projections of a small Performer's FavorAttention layers (by
    index path) as built (layer seed 3), and after each of two
    `FeatureRedraw(seed=1)` redraws, as NumPy arrays."""
    import keras

    import keras_favor

    model = keras_favor.build_performer(
        vocabulary_size=20,
        max_length=12,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        num_features=8,
        seed=3,
    )
    model(np.ones((1, 12), "int32"))
    callback = keras_favor.FeatureRedraw(interval=1, seed=1)
    callback.set_model(model)
    layers = callback.layers_to_redraw()
    draws = {}
    for k in range(3):
        if k:
            callback.redraw()
        for path, layer in layers.items():
            draws[f"{path}/{k}"] = keras.ops.convert_to_numpy(layer.projection)
    return draws


def run_redraws(out_dir):
    """`redraw_sequence()` twice in this process (fresh models), written to
    `DIR/redraws_<backend>.npz`; the JSON says whether the two agree."""
    import keras

    first, second = redraw_sequence(), redraw_sequence()
    np.savez(
        os.path.join(out_dir, f"redraws_{keras.backend.backend()}.npz"), **first
    )
    return {
        "names": sorted(first),
        "identical_in_process": all(
            np.array_equal(first[name], second[name]) for name in first
        ),
    }


MODES = {"import": run_import, "redraws": run_redraws}


def main(*modes_and_out_dir):
    import keras

    *modes, out_dir = modes_and_out_dir
    for mode in modes:
        result = MODES[mode](out_dir)
        result["backend"] = keras.backend.backend()
        with open(os.path.join(out_dir, f"{mode}.json"), "w") as file:
            json.dump(result, file)


if __name__ == "__main__":
    main(*sys.argv[1:])
