"""The layer's heads and features in float64, for the quadratic references
of `keras_favor.ops.naive` that the linear algorithms are tested against."""

import numpy as np
import tensorflow as tf

from keras_favor import ops as favor_ops


def heads(layer, query, value, key=None):
    """The layer's `(B, H, T, d)` query, key and value heads, in float64."""
    key = value if key is None else key

    def split(dense, x):
        return np.transpose(np.asarray(dense(x), np.float64), (0, 2, 1, 3))

    return (
        split(layer.query_dense, query),
        split(layer.key_dense, key),
        split(layer.value_dense, value),
    )


def feature_fn(layer):
    """The layer's unstabilized feature function `phi`, in float64."""
    projection = None
    if layer.projection is not None:
        projection = tf.cast(tf.convert_to_tensor(layer.projection), tf.float64)
    return lambda x: layer.feature_map(tf.cast(x, tf.float64), projection)


def features(layer, x):
    """Unstabilized features `phi(x)` of `(B, H, T, d)` heads, in float64."""
    return np.asarray(feature_fn(layer)(x))


def key_mask(mask):
    """A `(B, S)` bool mask as the ops take it, `(B, 1, S)`, or None."""
    return None if mask is None else tf.constant(mask, tf.bool)[:, None, :]


def quadratic_feature_attention(layer, q, k, v, mask=None, causal=False):
    """The `L x S` form `phi(Q) phi(K)^T` with the layer's own features."""
    return np.asarray(
        favor_ops.naive_linear_attention(
            *(tf.constant(x, tf.float64) for x in (q, k, v)),
            feature_fn(layer), mask=key_mask(mask), causal=causal,
        )
    )


def differentiable_quadratic_layer(layer, query, value, mask=None, causal=False):
    """The layer's output computed through the `L x S` matrix, in TensorFlow.

    Uses the layer's own sub-layers and unstabilized features in float64, so
    gradients can be compared with those of the linear algorithm.
    """

    def split(dense, x):
        return tf.transpose(tf.cast(dense(x), tf.float64), (0, 2, 1, 3))

    attended = favor_ops.naive_linear_attention(
        split(layer.query_dense, query),
        split(layer.key_dense, value),
        split(layer.value_dense, value),
        feature_fn(layer), mask=key_mask(mask), causal=causal,
    )
    merged = tf.cast(tf.transpose(attended, (0, 2, 1, 3)), tf.float32)
    return layer.output_dense(merged)
