"""Quadratic-time oracles that the linear algorithms are tested against."""

import numpy as np
import tensorflow as tf


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


def features(layer, x):
    """Unstabilized features `phi(x)` of `(B, H, T, d)` heads, in float64."""
    projection = None
    if layer.projection is not None:
        projection = tf.constant(np.asarray(layer.projection), tf.float64)
    return np.asarray(layer.feature_map(tf.constant(x, tf.float64), projection))


def attention_from_scores(scores, v, mask=None, causal=False):
    """`scores v / scores 1` with the key mask and the causal mask applied."""
    scores = np.array(scores, np.float64)
    if mask is not None:
        scores = scores * np.asarray(mask, np.float64)[:, None, None, :]
    if causal:
        scores = np.tril(scores)
    return scores @ v / scores.sum(-1, keepdims=True)


def quadratic_feature_attention(layer, q, k, v, mask=None, causal=False):
    """The `L x S` form `phi(Q) phi(K)^T` with the layer's own features."""
    scores = features(layer, q) @ np.swapaxes(features(layer, k), -1, -2)
    return attention_from_scores(scores, v, mask, causal)


def softmax_attention(q, k, v, mask=None, causal=False):
    """Exact softmax attention on `(B, H, T, d)` heads."""
    logits = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    logits = logits - logits.max(-1, keepdims=True)
    return attention_from_scores(np.exp(logits), v, mask, causal)


def output(layer, attended):
    """Applies the layer's output projection to `(B, H, T, dv)` heads."""
    merged = np.transpose(attended, (0, 2, 1, 3)).astype(np.float32)
    return np.asarray(layer.output_dense(merged))


def differentiable_quadratic_layer(layer, query, value, mask=None, causal=False):
    """The layer's output computed through the `L x S` matrix, in TensorFlow.

    Uses the layer's own sub-layers and unstabilized features in float64, so
    gradients can be compared with those of the linear algorithm.
    """

    def split(dense, x):
        return tf.transpose(tf.cast(dense(x), tf.float64), (0, 2, 1, 3))

    q = split(layer.query_dense, query)
    k = split(layer.key_dense, value)
    v = split(layer.value_dense, value)
    projection = None
    if layer.projection is not None:
        projection = tf.cast(tf.convert_to_tensor(layer.projection), tf.float64)
    scores = tf.einsum(
        "bhtf,bhsf->bhts",
        layer.feature_map(q, projection),
        layer.feature_map(k, projection),
    )
    if mask is not None:
        scores *= tf.cast(mask, tf.float64)[:, None, None, :]
    if causal:
        scores = tf.linalg.band_part(scores, -1, 0)
    attended = scores @ v / tf.reduce_sum(scores, -1, keepdims=True)
    merged = tf.cast(tf.transpose(attended, (0, 2, 1, 3)), tf.float32)
    return layer.output_dense(merged)
