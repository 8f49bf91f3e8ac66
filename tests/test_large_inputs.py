"""Bidirectional attention at large input scales, against a float64
evaluation of the same random-feature estimator."""

import numpy as np
import pytest
import tensorflow as tf

import keras_favor
from tests import reference

FEATURE_MAPS = ["softmax", "softmax_hyperbolic", "softmax_trig", "relu", "elu"]
UNIT_ROUNDOFF = 2.0**-24


def float32_parts(parts, like):
    """`(values, log_scale)` as float64 arrays, ones and zeros for None."""
    values, log_scale = (None if x is None else np.asarray(x, np.float64)
                         for x in parts)
    if values is None:
        values = np.ones_like(log_scale)
    if log_scale is None:
        log_scale = np.zeros_like(values[..., :1])
    return values, log_scale


def log_domain_attention(query_parts, key_parts, v):
    """The estimator `phi(Q) phi(K)^T V / phi(Q) phi(K)^T 1` in float64.

    Each score `sum_f q_f k_f` is summed at the largest of its exponents
    and the scores of a query at the largest of theirs, so nothing
    overflows or underflows however large the log-scales are. Returns the
    outputs and each query's condition `sum |scores| / |sum scores|`.
    """
    vq, lq = query_parts
    vk, lk = key_parts
    exponents = lq[:, :, :, None, :] + lk[:, :, None, :, :]
    top = exponents.max(-1)
    scores = np.sum(
        vq[:, :, :, None, :] * vk[:, :, None, :, :]
        * np.exp(exponents - top[..., None]),
        axis=-1,
    )
    weights = scores * np.exp(top - top.max(-1, keepdims=True))
    normalizer = weights.sum(-1)
    condition = np.abs(weights).sum(-1) / np.abs(normalizer)
    return weights @ v / normalizer[..., None], condition


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0, 1000.0])
def test_large_inputs_match_the_float64_estimator(rng, feature_map, scale):
    layer = keras_favor.FavorAttention(
        2, 8, num_features=32, feature_map=feature_map, seed=1
    )
    x = rng.normal(scale=scale, size=(2, 24, 16)).astype("float32")
    layer(x, x)
    q, k, v = (tf.constant(h, tf.float32) for h in reference.heads(layer, x, x))
    feature_fn, query_feature_fn = layer._feature_fns()
    actual = keras_favor.ops.bidirectional_linear_attention(
        q, k, v, feature_fn, query_feature_fn=query_feature_fn
    ).numpy()
    query_parts = float32_parts(query_feature_fn(q), v)
    key_parts = float32_parts(feature_fn(k), v)
    expected, condition = log_domain_attention(
        query_parts, key_parts, np.asarray(v, np.float64)
    )

    # Every query sees every key: none may come out as an exact zero.
    assert np.all(np.isfinite(actual))
    assert not np.any(np.all(actual == 0.0, axis=-1))
    # The kernel adds shifts to the float32 log-scales: an exponent of
    # magnitude up to `span` takes a rounding error of at most
    # `3 u span` (three float32 additions, unit roundoff u). That moves each
    # weight by a factor within exp(+-2 delta) for delta = 3 u span + u, and
    # a weighted mean of the values by at most (exp(4 delta) - 1) max|v|,
    # times the query's condition where signed features cancel.
    span = max(np.max(np.abs(p[1])) for p in (query_parts, key_parts))
    delta = 3 * UNIT_ROUNDOFF * span + UNIT_ROUNDOFF
    # Sums of at most 24 keys and 64 features add their own rounding.
    delta += 100 * UNIT_ROUNDOFF
    bound = np.expm1(4 * delta) * np.max(np.abs(v)) * condition[..., None]
    assert np.all(np.abs(actual - expected) <= bound)
