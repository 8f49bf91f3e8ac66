"""A function of its inputs alone, traced once per signature where
TensorFlow builds a graph outside XLA, called as it is elsewhere
(`keras_favor.ops.trace_cache`): the same results and gradients either
way."""

import collections
import functools

import numpy as np
import pytest
from keras import ops

from keras_favor.ops import trace_cache
from tests import reference

pytestmark = pytest.mark.backend_independent

CALLS = []


def scaled_sine(inputs, scale):
    """`[scale sin(x) y, sum(y^2)]`, counting its calls (traces)."""
    CALLS.append(scale)
    x, absent, y = inputs
    assert absent is None
    return [scale * ops.sin(x) * y, ops.sum(y**2)]


def expected_gradients(x, y, scale):
    """The gradients of `sum(first) + second` in `x` and `y`, by hand."""
    return scale * np.cos(x) * y, scale * np.sin(x) + 2 * y


@pytest.fixture
def fresh_cache(monkeypatch):
    monkeypatch.setattr(trace_cache, "_traced", collections.OrderedDict())
    CALLS.clear()


def test_eager_calls_run_the_function_each_time(rng, fresh_cache):
    x, y = rng.normal(size=(2, 3, 4)).astype("float32")
    fn = functools.partial(scaled_sine, scale=2.0)

    def loss(x, y):
        first, second = trace_cache.call_traced(fn, [x, None, y])
        return ops.sum(first) + second

    for _ in range(2):
        grads = reference.gradients(loss, [x, y])
        for actual, want in zip(grads, expected_gradients(x, y, 2.0)):
            np.testing.assert_allclose(actual, want, rtol=1e-5, atol=1e-6)
    assert CALLS == [2.0, 2.0]
    assert not trace_cache._traced


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("jit_compile", [False, True])
def test_graphs_outside_xla_trace_once_per_signature(
    rng, fresh_cache, jit_compile
):
    # Four traced steps: the second has the first's signature, the third
    # another keyword argument, the fourth other shapes. Inside XLA the
    # function is traced where it is called, in every step.
    import tensorflow as tf

    def step(scale, x, y):
        @tf.function(jit_compile=jit_compile, autograph=False)
        def gradients(x, y):
            with tf.GradientTape() as tape:
                tape.watch([x, y])
                first, second = trace_cache.call_traced(
                    functools.partial(scaled_sine, scale=scale), [x, None, y]
                )
                loss = tf.reduce_sum(first) + second
            return tape.gradient(loss, [x, y])

        return [g.numpy() for g in gradients(x, y)]

    x, y = rng.normal(size=(2, 3, 4)).astype("float32")
    cases = [(2.0, x, y), (2.0, x, y), (3.0, x, y), (2.0, x[:2], y[:2])]
    for scale, x, y in cases:
        grads = step(scale, tf.constant(x), tf.constant(y))
        for actual, want in zip(grads, expected_gradients(x, y, scale)):
            np.testing.assert_allclose(actual, want, rtol=1e-5, atol=1e-6)
    if jit_compile:
        assert CALLS == [2.0, 2.0, 3.0, 2.0] and not trace_cache._traced
    else:
        assert CALLS == [2.0, 3.0, 2.0] and len(trace_cache._traced) == 3


def test_a_function_with_a_closure_raises(rng):
    x = rng.normal(size=(3,)).astype("float32")
    with pytest.raises(ValueError, match="`fn` must be a function"):
        trace_cache.call_traced(lambda inputs: [x * inputs[0]], [x])
    with pytest.raises(ValueError, match="`fn` must be a function"):
        trace_cache.call_traced(
            functools.partial(scaled_sine, scale=[2.0]), [x, None, x]
        )
