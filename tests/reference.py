"""References for the tests, with `keras.ops` and NumPy on every backend.

The layer's heads and features in float64, for the quadratic references of
`keras_favor.ops.naive` that the linear algorithms are tested against; a
NumPy causal reference that carries a state; and `gradients`, the one place
where the tests differentiate (Keras has no backend-neutral gradient).

float64 tensors need a backend that has them: TensorFlow does, JAX only
with `jax_enable_x64`. `FLOAT64` says which dtype the references of this
backend compute in.
"""

import contextlib

import keras
import numpy as np
from keras import ops

from keras_favor import ops as favor_ops


def _has_float64():
    probe = ops.cast(ops.convert_to_tensor(np.zeros(1)), "float64")
    return keras.backend.standardize_dtype(probe.dtype) == "float64"


# float64 where the backend computes in it, else float32 (JAX by default).
FLOAT64 = "float64" if _has_float64() else "float32"


def float64_scope():
    """A scope in which `keras.ops` compute in float64 on every backend
    (on JAX: `jax.enable_x64`), for references that `FLOAT64` would leave
    in float32 there."""
    if keras.backend.backend() != "jax":
        return contextlib.nullcontext()
    import jax

    return jax.enable_x64(True)


def numpy(x):
    """A tensor, or a nest of lists/tuples of them, as float64 NumPy."""
    if isinstance(x, (list, tuple)):
        return type(x)(numpy(item) for item in x)
    return np.asarray(ops.convert_to_numpy(x), np.float64)


def compiled(fn, jit_compile=False):
    """`fn` traced into one program by the backend: `tf.function` on
    TensorFlow (compiled by XLA with `jit_compile`), `jax.jit` on JAX."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=jit_compile, autograph=False)
    return jit_on_jax(fn)


def jit_on_jax(fn):
    """`fn` under `jax.jit` on JAX, where eager ops compile a program for
    each op and shape (hundreds for one causal call: seconds, against
    milliseconds of arithmetic); `fn` itself on TensorFlow, whose eager ops
    start at once. `fn` must not build layers on JAX: build them first."""
    if keras.backend.backend() != "jax":
        return fn
    import jax

    return jax.jit(fn)


def evaluate(fn, *args):
    """`jit_on_jax(fn)(*args)` as NumPy (a nest of arrays and Nones)."""
    args = [ops.convert_to_tensor(a) for a in args]
    return keras.tree.map_structure(
        lambda x: None if x is None else ops.convert_to_numpy(x),
        jit_on_jax(fn)(*args),
    )


def gradients(fn, args, has_aux=False):
    """Gradients of the scalar `fn(*args)` with respect to each of `args`.

    Args:
        fn: maps tensors to a scalar, or to `(scalar, aux)` with `has_aux`.
        args: a list of arrays or tensors, differentiated at these values.
        has_aux: whether `fn` also returns something not differentiated.

    Returns:
        The list of gradients as float64 NumPy arrays, and with `has_aux`
        also `aux` (its tensors as NumPy arrays).
    """
    args = [ops.convert_to_tensor(a) for a in args]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(args)
            result = fn(*args)
        loss, aux = result if has_aux else (result, None)
        grads = tape.gradient(loss, args)
    elif keras.backend.backend() == "jax":
        import jax

        # Compiled: one XLA program costs less than the eager gradient's
        # many small ones.
        grads, aux = jax.jit(
            jax.grad(
                lambda *a: fn(*a) if has_aux else (fn(*a), None),
                argnums=tuple(range(len(args))),
                has_aux=True,
            )
        )(*args)
    else:
        raise NotImplementedError(keras.backend.backend())
    # An input the result does not depend on has a zero gradient (None on
    # TensorFlow).
    grads = [
        np.zeros(a.shape) if g is None else numpy(g)
        for a, g in zip(args, grads)
    ]
    if not has_aux:
        return grads
    return grads, keras.tree.map_structure(ops.convert_to_numpy, aux)


def gradients_with_weights(layer, fn, args, has_aux=False):
    """`gradients` of `fn(*args)` with respect to `args` and then to each of
    `layer.trainable_weights`, which `fn` reads through the layer.

    Args:
        layer: a built layer; its weights' values are differentiated at.
        fn: maps `args` to a scalar, or to `(scalar, aux)` with `has_aux`.
        args: a list of arrays or tensors.
        has_aux: whether `fn` also returns something not differentiated.

    Returns:
        As `gradients`: the gradients of `args`, then of the weights.
    """
    weights = layer.trainable_weights
    count = len(args)

    def with_values(*values):
        mapping = list(zip(weights, values[count:]))
        with keras.StatelessScope(state_mapping=mapping):
            return fn(*values[:count])

    values = [*args, *(ops.convert_to_numpy(w) for w in weights)]
    return gradients(with_values, values, has_aux)


def heads(layer, query, value, key=None):
    """The layer's `(B, H, T, d)` query, key and value heads, in float64."""
    key = value if key is None else key

    def split(dense, x):
        return np.transpose(numpy(dense(x)), (0, 2, 1, 3))

    return (
        split(layer.query_dense, query),
        split(layer.key_dense, key),
        split(layer.value_dense, value),
    )


def feature_fn(layer, dtype=None):
    """The layer's unstabilized feature function `phi`, in `FLOAT64`."""
    dtype = dtype or FLOAT64
    projection = None
    if layer.projection is not None:
        projection = ops.cast(ops.convert_to_tensor(layer.projection), dtype)
    return lambda x: layer.feature_map(ops.cast(x, dtype), projection)


def features(layer, x):
    """Unstabilized features `phi(x)` of `(B, H, T, d)` heads, in float64."""
    return numpy(feature_fn(layer)(x))


def key_mask(mask):
    """A `(B, S)` bool mask as the ops take it, `(B, 1, S)`, or None."""
    if mask is None:
        return None
    return ops.convert_to_tensor(np.asarray(mask, bool)[:, None, :])


def quadratic_feature_attention(
    layer, q, k, v, mask=None, causal=False, dtype=None
):
    """The `L x S` form `phi(Q) phi(K)^T` with the layer's own features, in
    `dtype` (`FLOAT64` unless given)."""
    dtype = dtype or FLOAT64
    return numpy(
        favor_ops.naive_linear_attention(
            *(ops.cast(ops.convert_to_tensor(x), dtype) for x in (q, k, v)),
            feature_fn(layer, dtype),
            mask=key_mask(mask),
            causal=causal,
        )
    )


def differentiable_quadratic_layer(
    layer, query, value, mask=None, causal=False
):
    """The layer's output computed through the `L x S` matrix, in `FLOAT64`.

    Uses the layer's own sub-layers and unstabilized features, so gradients
    can be compared with those of the linear algorithm.
    """

    def split(dense, x):
        return ops.transpose(ops.cast(dense(x), FLOAT64), (0, 2, 1, 3))

    attended = favor_ops.naive_linear_attention(
        split(layer.query_dense, query),
        split(layer.key_dense, value),
        split(layer.value_dense, value),
        feature_fn(layer),
        mask=key_mask(mask),
        causal=causal,
    )
    merged = ops.cast(ops.transpose(attended, (0, 2, 1, 3)), "float32")
    return layer.output_dense(merged)


def causal_attention_with_state(
    query_features, key_features, value, mask=None, initial_sums=None
):
    """Causal linear attention from explicit features, in float64 NumPy.

    Query `t` attends to the keys `s <= t` and to the sums it starts from:
    `(phi(q_t) (S0 + sum_s phi(k_s) v_s^T)) / (phi(q_t) (z0 + sum_s
    phi(k_s)))`, 0 where that normalizer is 0 (the query sees nothing).

    Args:
        query_features, key_features: `(B, H, L, F)` features.
        value: `(B, H, L, D)`.
        mask: bool `(B, L)`, True at real keys, or None.
        initial_sums: `(S0 (B, H, F, D), z0 (B, H, F))`, or None for zeros.

    Returns:
        `(outputs (B, H, L, D), (S, z))`, `S` and `z` the sums after the
        last key.
    """
    phi_q, phi_k, value = (
        np.asarray(x, np.float64) for x in (query_features, key_features, value)
    )
    batch, num_heads, _, num_features = phi_k.shape
    if mask is not None:
        phi_k = phi_k * np.asarray(mask, np.float64)[:, None, :, None]
    if initial_sums is None:
        initial_sums = (
            np.zeros((batch, num_heads, num_features, value.shape[-1])),
            np.zeros((batch, num_heads, num_features)),
        )
    kv0, z0 = (np.asarray(x, np.float64) for x in initial_sums)
    kv = kv0[:, :, None] + np.cumsum(
        phi_k[..., :, None] * value[..., None, :], axis=2
    )
    z = z0[:, :, None] + np.cumsum(phi_k, axis=2)
    numerator = np.einsum("bhlf,bhlfd->bhld", phi_q, kv)
    denominator = np.einsum("bhlf,bhlf->bhl", phi_q, z)
    sees_nothing = denominator == 0
    outputs = numerator / np.where(sees_nothing, 1.0, denominator)[..., None]
    outputs[sees_nothing] = 0.0
    return outputs, (kv[:, :, -1], z[:, :, -1])
