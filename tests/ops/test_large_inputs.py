"""Attention at large input scales, bidirectional and causal, against a
float64 evaluation of the same random-feature estimator."""

import numpy as np
import pytest
from keras import ops

import keras_favor
from keras_favor.layers import favor_kernels
from tests import reference

pytestmark = pytest.mark.backend_independent

FEATURE_MAPS = ["softmax", "softmax_hyperbolic", "softmax_trig", "relu", "elu"]
UNIT_ROUNDOFF = 2.0**-24


def float32_parts(parts, like):
    """`(values, log_scale)` as float64 arrays, ones and zeros for None."""
    values, log_scale = (
        None if x is None else np.asarray(x, np.float64) for x in parts
    )
    if values is None:
        values = np.ones_like(log_scale)
    if log_scale is None:
        log_scale = np.zeros_like(values[..., :1])
    return values, log_scale


def log_domain_attention(query_parts, key_parts, v, causal=False):
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
        vq[:, :, :, None, :]
        * vk[:, :, None, :, :]
        * np.exp(exponents - top[..., None]),
        axis=-1,
    )
    if causal:
        future = np.triu(np.ones(top.shape[-2:], bool), 1)
        top = np.where(future, -np.inf, top)
    weights = scores * np.exp(top - top.max(-1, keepdims=True))
    normalizer = weights.sum(-1)
    condition = np.abs(weights).sum(-1) / np.abs(normalizer)
    return weights @ v / normalizer[..., None], condition


def attention(q, k, v, feature_fn, query_feature_fn, mode):
    if mode == "bidirectional":
        return keras_favor.ops.bidirectional_linear_attention(
            q, k, v, feature_fn, query_feature_fn=query_feature_fn
        )
    values, log_scale = feature_fn(k)
    num_features = (values if log_scale is None else log_scale).shape[-1]
    chunk_size = int(mode.split("_")[-1])
    return keras_favor.ops.causal_linear_attention(
        q,
        k,
        v,
        feature_fn,
        num_features,
        chunk_size=chunk_size,
        query_feature_fn=query_feature_fn,
    )


@pytest.mark.backend_samples(10)
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0, 1000.0])
@pytest.mark.parametrize(
    "mode", ["bidirectional", "causal_chunk_8", "causal_chunk_64"]
)
def test_large_inputs_match_the_float64_estimator(
    rng, feature_map, scale, mode
):
    layer = keras_favor.FavorAttention(
        2, 8, num_features=32, feature_map=feature_map, seed=1
    )
    x = rng.normal(scale=scale, size=(2, 24, 16)).astype("float32")
    layer.build(x.shape, x.shape)
    q, k, v = (h.astype("float32") for h in reference.heads(layer, x, x))
    feature_fn, query_feature_fn = favor_kernels.feature_fns(layer)
    actual = reference.evaluate(
        lambda q, k, v: attention(q, k, v, feature_fn, query_feature_fn, mode),
        q,
        k,
        v,
    )
    query_parts = float32_parts(reference.evaluate(query_feature_fn, q), v)
    key_parts = float32_parts(reference.evaluate(feature_fn, k), v)
    expected, condition = log_domain_attention(
        query_parts,
        key_parts,
        np.asarray(v, np.float64),
        causal=mode != "bidirectional",
    )

    # Every query sees a key (causal: at least its own): none may come out
    # as an exact zero.
    assert np.all(np.isfinite(actual))
    assert not np.any(np.all(actual == 0.0, axis=-1))
    # The kernels add shifts to the float32 log-scales: an exponent of
    # magnitude up to `span` takes a rounding error of at most
    # `3 u span` (three float32 additions, unit roundoff u: a key shift, a
    # query shift and one level difference in the causal chunks or state). That moves each
    # weight by a factor within exp(+-2 delta) for delta = 3 u span + u, and
    # a weighted mean of the values by at most (exp(4 delta) - 1) max|v|,
    # times the query's condition where signed features cancel.
    span = max(np.max(np.abs(p[1])) for p in (query_parts, key_parts))
    delta = 3 * UNIT_ROUNDOFF * span + UNIT_ROUNDOFF
    # Sums of at most 24 keys and 64 features add their own rounding.
    delta += 100 * UNIT_ROUNDOFF
    bound = np.expm1(4 * delta) * np.max(np.abs(v)) * condition[..., None]
    assert np.all(np.abs(actual - expected) <= bound)


def causal_heads(rng, feature_map, scale, length=40):
    """Float32 heads `(2, 2, length, 8)`, a padding mask and feature fns."""
    layer = keras_favor.FavorAttention(
        2, 8, num_features=16, feature_map=feature_map, seed=5
    )
    layer.build((1, 2, 16), (1, 2, 16))
    heads = [
        ops.convert_to_tensor(
            rng.normal(scale=s, size=(2, 2, length, 8)).astype("float32")
        )
        for s in (scale, scale, 1.0)
    ]
    valid = np.arange(length)[None, :] < np.array([[length], [29]])
    values, log_scale = favor_kernels.feature_fns(layer)[0](heads[1])
    num_features = (values if log_scale is None else log_scale).shape[-1]
    return (
        heads,
        ops.convert_to_tensor(valid[:, None, :]),
        favor_kernels.feature_fns(layer),
        num_features,
    )


def causal_outputs_and_gradients(heads, mask, fns, num_features, **kwargs):
    """Outputs, gradients and a continuation from the returned state."""
    feature_fn, query_feature_fn = fns

    def loss(*heads):
        outputs, state = keras_favor.ops.causal_linear_attention(
            *heads,
            feature_fn,
            num_features,
            mask=mask,
            query_feature_fn=query_feature_fn,
            return_state=True,
            **kwargs,
        )
        return ops.sum(ops.sin(outputs)), (outputs, state)

    gradients, (outputs, state) = reference.gradients(loss, heads, has_aux=True)
    continued = reference.evaluate(
        lambda *state: keras_favor.ops.causal_linear_attention(
            *(h[:, :, :3] for h in heads),
            feature_fn,
            num_features,
            query_feature_fn=query_feature_fn,
            initial_state=state,
        ),
        *state,
    )
    return [outputs, *gradients, continued]


@pytest.mark.backend_samples(1)
@pytest.mark.parametrize(
    "feature_map, recompute_length",
    [
        ("softmax", None),
        ("softmax_hyperbolic", None),
        ("elu", None),
        ("softmax", 16),
    ],
)
def test_per_feature_levels_equal_one_level_at_ordinary_scales(
    rng, feature_map, recompute_length
):
    # At scale 1 the one-level algorithm keeps every normalizer; the
    # per-feature algorithm, forced here, must give the same outputs,
    # gradients and state, up to round-off; also in groups of 16
    # positions, recomputed in the backward pass.
    from keras_favor.ops import log_domain_causal

    heads, mask, fns, num_features = causal_heads(rng, feature_map, 1.0)
    kwargs = dict(chunk_size=8)
    if recompute_length:
        kwargs["recompute_length"] = recompute_length
    expected = causal_outputs_and_gradients(
        heads, mask, fns, num_features, **kwargs
    )
    forced = log_domain_causal.log_domain_causal_attention
    original = keras_favor.ops.causal_attention._loses_a_normalizer
    try:
        keras_favor.ops.causal_attention._loses_a_normalizer = lambda *args: (
            ops.convert_to_tensor(True)
        )
        actual = causal_outputs_and_gradients(
            heads, mask, fns, num_features, **kwargs
        )
    finally:
        keras_favor.ops.causal_attention._loses_a_normalizer = original
    assert forced is log_domain_causal.log_domain_causal_attention
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-6)


def two_roundings(heads, fns):
    """Twice the rounding bound of `test_large_inputs_match_the_float64_
    estimator` for positive features: two evaluations each within it of
    the same estimator are within this of each other."""
    feature_fn, query_feature_fn = fns
    span = max(
        np.max(np.abs(reference.evaluate(fn, x)[1]))
        for fn, x in ((query_feature_fn, heads[0]), (feature_fn, heads[1]))
    )
    delta = 3 * UNIT_ROUNDOFF * span + 101 * UNIT_ROUNDOFF
    return 2 * np.expm1(4 * delta) * np.max(np.abs(heads[2]))


@pytest.mark.backend_samples(1)
@pytest.mark.parametrize("feature_map", ["softmax", "softmax_hyperbolic"])
def test_large_inputs_in_pieces_equal_the_whole(rng, feature_map):
    # At scale 100 the per-feature levels carry the state between pieces.
    heads, mask, fns, num_features = causal_heads(rng, feature_map, 100.0)
    feature_fn, query_feature_fn = fns

    def whole_and_pieces(*heads):
        options = dict(query_feature_fn=query_feature_fn, return_state=True)
        whole, whole_state = keras_favor.ops.causal_linear_attention(
            *heads, feature_fn, num_features, mask=mask, **options
        )
        state, pieces = None, []
        for start, stop in [(0, 7), (7, 8), (8, 33), (33, 40)]:
            outputs, state = keras_favor.ops.causal_linear_attention(
                *(h[:, :, start:stop] for h in heads),
                feature_fn,
                num_features,
                mask=mask[:, :, start:stop],
                chunk_size=4,
                initial_state=state,
                **options,
            )
            pieces.append(outputs)
        return whole, whole_state, ops.concatenate(pieces, 2), state

    whole, whole_state, pieces, state = reference.evaluate(
        whole_and_pieces, *heads
    )
    assert not np.any(np.all(whole == 0.0, axis=-1))
    bound = two_roundings(heads, fns)
    assert np.max(np.abs(pieces - whole)) <= bound
    # The states hold the same sums at the same levels.
    state, whole_state = (
        reference.numpy(tuple(s)) for s in (state, whole_state)
    )
    np.testing.assert_array_equal(state[2], whole_state[2])
    for a, e in zip(state[:2], whole_state[:2]):
        np.testing.assert_allclose(a, e, rtol=bound, atol=bound)


def test_large_causal_inputs_under_xla_equal_eager(rng):
    heads, mask, fns, num_features = causal_heads(rng, "softmax", 100.0)
    feature_fn, query_feature_fn = fns

    def attend(*heads):
        return keras_favor.ops.causal_linear_attention(
            *heads,
            feature_fn,
            num_features,
            mask=mask,
            query_feature_fn=query_feature_fn,
        )

    eager = ops.convert_to_numpy(attend(*heads))
    xla = ops.convert_to_numpy(
        reference.compiled(attend, jit_compile=True)(*heads)
    )
    assert not np.any(np.all(eager == 0.0, axis=-1))
    assert np.max(np.abs(xla - eager)) <= two_roundings(heads, fns)
