"""`.keras` files saved by an earlier release load and give its outputs.

`tests/data/make_compatibility_files.py` wrote the files and the outputs
they gave when they were saved; a change of a layer's configuration or of
its weights' names that old files do not have makes a load fail or the
outputs differ.
"""

import os

import keras
import numpy as np
import pytest

import keras_favor  # noqa: F401  (registers the layers)

pytestmark = pytest.mark.backend_independent

DATA = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data"
)
NAMES = [
    "classifier_favor",
    "classifier_relu_sequential",
    "language_model_local_window",
    "language_model_exact",
]


@pytest.fixture(scope="module")
def recorded():
    with np.load(os.path.join(DATA, "compatibility_outputs.npz")) as data:
        return dict(data)


@pytest.mark.parametrize("name", NAMES)
def test_saved_file_loads_with_its_outputs(name, recorded):
    model = keras.saving.load_model(os.path.join(DATA, f"{name}.keras"))
    np.testing.assert_allclose(
        np.asarray(model(recorded["token_ids"])),
        recorded[name],
        rtol=1e-5,
        atol=1e-5,
    )
