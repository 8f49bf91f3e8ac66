"""keras_favor.backend: what differs between the Keras backends."""

import keras
import numpy as np
import pytest

from keras_favor import backend
from tests import reference

pytestmark = pytest.mark.backend_independent


@pytest.mark.parametrize("value", [True, False])
def test_an_eager_cond_runs_only_the_branch_taken(value):
    # An eager cond on JAX would trace (and compile) both branches.
    called = []

    def branch_fn(name, result):
        def fn():
            called.append(name)
            return keras.ops.convert_to_tensor(result)

        return fn

    pred = keras.ops.convert_to_tensor(value)
    result = backend.cond(pred, branch_fn("true", 1.0), branch_fn("false", 2.0))
    assert called == (["true"] if value else ["false"])
    assert float(keras.ops.convert_to_numpy(result)) == (1.0 if value else 2.0)


def test_a_traced_cond_decides_when_it_runs():
    def fn(x):
        return backend.cond(
            keras.ops.sum(x) > 0, lambda: x * 2.0, lambda: x - 1.0
        )

    run = reference.compiled(fn)
    for x, want in (([1.0, 2.0], [2.0, 4.0]), ([-1.0, -2.0], [-2.0, -3.0])):
        got = keras.ops.convert_to_numpy(run(np.array(x, "float32")))
        np.testing.assert_array_equal(got, want)
