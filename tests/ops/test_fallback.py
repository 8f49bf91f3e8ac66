"""A result computed again by a slower algorithm where a check flags it
(`keras_favor.ops.fallback`): the results and the gradients of the branch
taken, eager and traced, an absent input passed through; on TensorFlow and
JAX no conditional hands the untaken branch's intermediates to the backward
pass."""

import numpy as np
import pytest
from keras import ops

import keras_favor
from keras_favor.layers import favor_kernels
from keras_favor.ops.fallback import with_fallback
from tests import reference

pytestmark = pytest.mark.backend_independent


def main_fn(threshold):
    """Results `[x y, sum(exp(x))]`, flagged where some `x > threshold`."""

    def main(inputs):
        x, absent, y = inputs
        assert absent is None
        return [x * y, ops.sum(ops.exp(x))], ops.any(x > threshold)

    return main


def fallback_fn(inputs):
    x, _, y = inputs
    return [ops.sin(x) * y**2, ops.sum(x**3)]


def expected(x, y, weights, scale, flagged):
    """The loss `sum(weights r0) + scale r1` of the branch taken and its
    gradients in `x` and `y`, by hand."""
    if flagged:
        loss = np.sum(weights * np.sin(x) * y**2) + scale * np.sum(x**3)
        dx = weights * np.cos(x) * y**2 + 3 * scale * x**2
        dy = 2 * weights * np.sin(x) * y
    else:
        loss = np.sum(weights * x * y) + scale * np.sum(np.exp(x))
        dx = weights * y + scale * np.exp(x)
        dy = weights * x
    return loss, dx, dy


@pytest.mark.parametrize("flagged", [False, True])
@pytest.mark.parametrize(
    "mode", ["eager", pytest.param("graph", marks=pytest.mark.tensorflow_only)]
)
def test_results_and_gradients_are_the_branch_taken(rng, flagged, mode):
    x, y, weights = rng.normal(size=(3, 2, 5)).astype("float32")
    scale = 0.5
    threshold = -10.0 if flagged else 10.0

    def loss(x, y):
        first, second = with_fallback(
            main_fn(threshold), fallback_fn, [x, None, y]
        )
        value = ops.sum(weights * first) + scale * second
        return value, value

    if mode == "graph":
        import tensorflow as tf

        @tf.function(autograph=False)
        def traced(x, y):
            with tf.GradientTape() as tape:
                tape.watch([x, y])
                value, _ = loss(x, y)
            return tape.gradient(value, [x, y]), value

        grads, aux = traced(tf.constant(x), tf.constant(y))
        grads, aux = reference.numpy(grads), reference.numpy(aux)
    else:
        grads, aux = reference.gradients(loss, [x, y], has_aux=True)
    want_loss, want_dx, want_dy = expected(
        *(a.astype(np.float64) for a in (x, y, weights)), scale, flagged
    )
    np.testing.assert_allclose(aux, want_loss, rtol=1e-5)
    for actual, want in zip(grads, (want_dx, want_dy)):
        np.testing.assert_allclose(actual, want, rtol=1e-5, atol=1e-6)


def test_numpy_inputs_are_taken_as_tensors(rng):
    x, y = rng.normal(size=(2, 2, 5)).astype("float32")
    first, second = with_fallback(main_fn(10.0), fallback_fn, [x, None, y])
    np.testing.assert_allclose(ops.convert_to_numpy(first), x * y, rtol=1e-6)
    np.testing.assert_allclose(
        ops.convert_to_numpy(second), np.sum(np.exp(x)), rtol=1e-5
    )


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("flagged", [False, True])
def test_gradients_twice_and_of_second_order(rng, flagged):
    # A persistent tape asks for the gradients twice, and a tape over the
    # gradient differentiates the selection again.
    import tensorflow as tf

    x, y = (tf.constant(a) for a in rng.normal(size=(2, 2, 5)))
    threshold = -10.0 if flagged else 10.0
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([x, y])
            first, second = with_fallback(
                main_fn(threshold), fallback_fn, [x, None, y]
            )
            loss = tf.reduce_sum(first) + second
        dx = tape.gradient(loss, x)
        again = tape.gradient(loss, x)
    second_order = outer.gradient(dx, x)
    x, y = x.numpy(), y.numpy()
    if flagged:
        want_dx, want_second = (
            np.cos(x) * y**2 + 3 * x**2,
            -np.sin(x) * y**2 + 6 * x,
        )
    else:
        want_dx, want_second = y + np.exp(x), np.exp(x)
    for actual in (dx, again):
        np.testing.assert_allclose(actual.numpy(), want_dx, rtol=1e-6)
    np.testing.assert_allclose(second_order.numpy(), want_second, rtol=1e-6)


@pytest.mark.jax_only
@pytest.mark.parametrize("flagged", [False, True])
def test_second_order_gradients_on_jax(rng, flagged):
    # The backward pass of the selection is itself differentiable.
    import jax
    import jax.numpy as jnp

    x, y = rng.normal(size=(2, 2, 5)).astype("float32")
    threshold = -10.0 if flagged else 10.0

    def loss(x):
        first, second = with_fallback(
            main_fn(threshold), fallback_fn, [x, None, y]
        )
        return jnp.sum(first) + second

    second_order = jax.grad(lambda x: jnp.sum(jax.grad(loss)(x)))(x)
    if flagged:
        want = -np.sin(x) * y**2 + 6 * x
    else:
        want = np.exp(x)
    np.testing.assert_allclose(second_order, want, rtol=1e-5, atol=1e-6)


def _small_causal_loss(rng):
    """`(loss, heads)`: the sum of a small causal layer's attention outputs,
    in groups of 16 positions, as a function of its three `(1, 2, 40, 8)`
    heads, and those heads."""
    layer = keras_favor.FavorAttention(
        num_heads=2, key_dim=8, num_features=13, seed=3
    )
    layer.build((1, 40, 16), (1, 40, 16))
    feature_fn, query_feature_fn = favor_kernels.feature_fns(layer)

    def loss(heads):
        outputs = keras_favor.ops.causal_linear_attention(
            *heads,
            feature_fn,
            13,
            query_feature_fn=query_feature_fn,
            chunk_size=8,
            recompute_length=16,
        )
        return ops.sum(outputs)

    heads = [rng.normal(size=(1, 2, 40, 8)).astype("float32") for _ in range(3)]
    return loss, heads


@pytest.mark.tensorflow_only
def test_no_conditional_outputs_the_untaken_branch_intermediates(rng):
    # `tf.cond`'s own gradient makes the conditional output every
    # intermediate of the per-feature branch (dozens of tensors, zeros
    # where it did not run, which Grappler folds into constants kept for
    # the life of the step); through `with_fallback` each conditional
    # outputs its selected results, or gradients, only.
    import tensorflow as tf

    loss, heads = _small_causal_loss(rng)
    heads = [tf.constant(h) for h in heads]

    @tf.function(autograph=False)
    def gradients(*heads):
        with tf.GradientTape() as tape:
            tape.watch(heads)
            value = loss(heads)
        return tape.gradient(value, heads)

    graph = gradients.get_concrete_function(*heads).graph
    conditionals = [
        op for op in graph.get_operations() if op.type in ("If", "StatelessIf")
    ]
    assert conditionals
    for op in conditionals:
        assert len(op.outputs) <= len(op.inputs), op.name


@pytest.mark.jax_only
def test_no_jax_conditional_outputs_the_untaken_branch_residuals(rng):
    # Under `jax.grad` a `lax.cond` would output the residuals of both
    # branches, the per-feature branch's as zeros, in every step; through
    # `with_fallback` each conditional outputs its selected results, or
    # gradients, only.
    import jax

    loss, heads = _small_causal_loss(rng)
    conditionals = _jax_conditionals(jax.make_jaxpr(jax.grad(loss))(heads))
    assert conditionals
    for equation in conditionals:
        # The first operand is the branch index.
        assert len(equation.outvars) <= len(equation.invars) - 1


def _jax_conditionals(closed_jaxpr):
    """Every `cond` equation of a jaxpr, nested ones included."""
    found, pending = [], [closed_jaxpr.jaxpr]
    while pending:
        jaxpr = pending.pop()
        for equation in jaxpr.eqns:
            if equation.primitive.name == "cond":
                found.append(equation)
            for value in equation.params.values():
                for item in (
                    value if isinstance(value, (list, tuple)) else [value]
                ):
                    inner = getattr(item, "jaxpr", item)
                    if hasattr(inner, "eqns"):
                        pending.append(inner)
    return found


def test_a_fallback_with_a_closure_raises(rng):
    x, y = rng.normal(size=(2, 2, 5)).astype("float32")
    with pytest.raises(ValueError, match="`fallback_fn` must be a function"):
        with_fallback(
            main_fn(10.0), lambda inputs: [x * inputs[0], y], [x, None, y]
        )


TRACES = []


def counted_fallback(inputs, power):
    """`fallback_fn` with a keyword argument, counting its traces."""
    TRACES.append(power)
    x, _, y = inputs
    return [ops.sin(x) * y**power, ops.sum(x**3)]


@pytest.mark.tensorflow_only
def test_a_fallback_is_traced_once_per_signature(rng, monkeypatch):
    # Two traced steps (two models' train functions, say), each with its
    # forward pass and the backward pass's recomputation, trace the
    # fallback once; another keyword argument traces it again.
    import collections
    import functools

    import tensorflow as tf

    from keras_favor.ops import trace_cache

    monkeypatch.setattr(trace_cache, "_traced", collections.OrderedDict())
    TRACES.clear()
    x, y = (tf.constant(a) for a in rng.normal(size=(2, 2, 5)))

    def step(power):
        @tf.function(autograph=False)
        def gradients(x, y):
            with tf.GradientTape() as tape:
                tape.watch([x, y])
                first, second = with_fallback(
                    main_fn(-10.0),
                    functools.partial(counted_fallback, power=power),
                    [x, None, y],
                )
                loss = tf.reduce_sum(first) + second
            return tape.gradient(loss, [x, y])

        return [g.numpy() for g in gradients(x, y)]

    first, second, cubed = step(2), step(2), step(3)
    assert TRACES == [2, 3]
    x, y = x.numpy(), y.numpy()
    for dx, dy in (first, second):
        np.testing.assert_allclose(dx, np.cos(x) * y**2 + 3 * x**2, rtol=1e-6)
        np.testing.assert_allclose(dy, 2 * np.sin(x) * y, rtol=1e-6)
    np.testing.assert_allclose(cubed[1], 3 * np.sin(x) * y**2, rtol=1e-6)
