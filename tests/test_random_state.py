"""The suite's fixed random state (tests/conftest.py): every test starts
from the same seeds, also after a test that set others."""

import random

import keras
import numpy as np
import pytest

from tests.conftest import SEED
from tests.conftest import _set_random_seed

pytestmark = pytest.mark.backend_independent


def draws():
    return (
        random.random(),
        np.random.random(),
        keras.ops.convert_to_numpy(keras.random.normal((3,))).tolist(),
    )


def tensorflow_seed():
    """TensorFlow's global seed (on TensorFlow; None elsewhere)."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    return tf.compat.v1.random.get_seed(0)[0]


def test_seeds_are_set_again_after_a_test_draws_or_sets_others():
    on_tensorflow = keras.backend.backend() == "tensorflow"
    _set_random_seed(SEED)
    first = draws()
    draws()
    _set_random_seed(SEED)
    assert draws() == first
    # Keras's own call still sets TensorFlow's seed.
    keras.utils.set_random_seed(3)
    assert tensorflow_seed() == (3 if on_tensorflow else None)
    assert draws() != first
    _set_random_seed(SEED)
    assert draws() == first
    assert tensorflow_seed() == (SEED if on_tensorflow else None)
