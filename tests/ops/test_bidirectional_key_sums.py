"""Bidirectional attention split into the keys' sums, computed once, and
the queries' application to them: the pieces equal the whole."""

import numpy as np
import pytest
from keras import ops

from keras_favor import FavorAttention
from keras_favor import ops as favor_ops
from keras_favor.layers import favor_kernels
from tests import reference

pytestmark = pytest.mark.backend_independent

FEATURE_MAPS = ["softmax", "softmax_hyperbolic", "softmax_trig", "relu", "elu"]


def layer_and_heads(feature_map, scale, recompute_length):
    layer = FavorAttention(
        num_heads=2,
        key_dim=8,
        feature_map=feature_map,
        num_features=32,
        seed=7,
        recompute_length=recompute_length,
    )
    rng = np.random.default_rng(0)
    x = rng.normal(scale=scale, size=(2, 11, 16)).astype("float32")
    layer.build(x.shape, x.shape)
    query, key, value = (
        ops.convert_to_tensor(
            rng.normal(scale=scale, size=(2, 2, n, 8)).astype("float32")
        )
        for n in (3, 11, 11)
    )
    return layer, query, key, value


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("scale", [0.5, 8.0])
def test_key_sums_then_queries_equal_bidirectional_attention(
    feature_map, scale
):
    """At scale 8 the features' log-scales lie far apart: the sums keep
    their per-feature shifts. Keys in groups of 4 in the whole op: its sums
    add up in another order, so the two agree to float32 round-off."""
    layer, query, key, value = layer_and_heads(feature_map, scale, 4)
    mask = ops.convert_to_tensor(
        (np.arange(11)[None] < np.array([[11], [6]]))[:, None, :]
    )
    feature_fn, query_feature_fn = favor_kernels.feature_fns(layer)

    def whole_and_pieces(query, key, value):
        whole = favor_ops.bidirectional_linear_attention(
            query,
            key,
            value,
            feature_fn,
            mask=mask,
            query_feature_fn=query_feature_fn,
            recompute_length=4,
        )
        sums = favor_ops.bidirectional_key_sums(key, value, feature_fn, mask)
        pieces = favor_ops.attend_to_bidirectional_key_sums(
            query, sums, query_feature_fn
        )
        return whole, pieces, sums

    expected, actual, sums = reference.evaluate(
        whole_and_pieces, query, key, value
    )
    assert tuple(sums[0].shape)[:2] == (2, 2)
    assert tuple(sums[1].shape) == tuple(sums[2].shape)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
