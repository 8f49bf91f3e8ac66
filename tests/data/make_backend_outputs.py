"""Writes `backend_outputs.npz`, which tests/layers/test_backend_outputs.py
loads: the weights, inputs, outputs and gradients of its layers on the
TensorFlow backend. Run from the repository root:

    KERAS_BACKEND=tensorflow python -m tests.data.make_backend_outputs
"""

import keras
import numpy as np

from tests.layers import test_backend_outputs as cases


def main():
    if keras.backend.backend() != "tensorflow":
        raise SystemExit("Run with KERAS_BACKEND=tensorflow.")
    arrays = {}
    for index, name in enumerate(cases.CONFIGURATIONS):
        keras.utils.set_random_seed(index)
        layer = cases.built_layer(name)
        weights = layer.get_weights()
        arrays[f"{name}/count"] = np.array(len(weights))
        for i, weight in enumerate(weights):
            arrays[f"{name}/weight{i}"] = weight
        outputs, gradients = cases.outputs_and_gradients(name, layer)
        arrays[f"{name}/outputs"] = outputs
        for i, gradient in enumerate(gradients):
            arrays[f"{name}/gradient{i}"] = gradient.astype("float32")
    np.savez_compressed(cases.FILE, **arrays)


if __name__ == "__main__":
    main()
