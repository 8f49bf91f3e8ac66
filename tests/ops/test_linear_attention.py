"""The linear algorithms against the quadratic form with the same features,
and the properties that follow: causality, padding invariance, gradients."""

import numpy as np
import pytest
import tensorflow as tf

import keras_favor
from keras_favor import ops as favor_ops
from keras_favor.layers import favor_kernels
from keras_favor.ops import chunk_scan
from keras_favor.ops import stabilizers
from tests import reference

FEATURE_MAPS = ["softmax", "softmax_hyperbolic", "softmax_trig", "relu", "elu"]
# Groups of 8 positions: short test sequences run in several recomputed
# groups, as sequences longer than the layer's default do.
RECOMPUTE_LENGTH = 8


def make_layer(feature_map="softmax", chunk_size=4, **kwargs):
    kwargs.setdefault("num_features", 32)
    kwargs.setdefault("recompute_length", RECOMPUTE_LENGTH)
    return keras_favor.FavorAttention(
        num_heads=2,
        key_dim=8,
        feature_map=feature_map,
        chunk_size=chunk_size,
        seed=7,
        **kwargs,
    )


def padding_mask(batch, length, valid_lengths):
    return np.arange(length)[None, :] < np.asarray(valid_lengths)[:, None]


def head_outputs(layer, query, value, mask=None, causal=False):
    """The linear algorithm's per-head outputs `(B, H, T, dv)`."""
    q, k, v = (
        tf.constant(x, tf.float32) for x in reference.heads(layer, query, value)
    )
    if mask is not None:
        mask = tf.constant(mask)[:, None, :]
    feature_fn, query_feature_fn = favor_kernels.feature_fns(layer)
    options = dict(
        mask=mask,
        query_feature_fn=query_feature_fn,
        recompute_length=layer.recompute_length,
    )
    if causal:
        return favor_ops.causal_linear_attention(
            q,
            k,
            v,
            feature_fn,
            layer.feature_map.feature_dim(layer.num_features, layer.key_dim),
            chunk_size=layer.chunk_size,
            **options,
        ).numpy()
    return favor_ops.bidirectional_linear_attention(
        q, k, v, feature_fn, **options
    ).numpy()


def relative_error(actual, expected):
    return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_linear_equals_quadratic_with_same_features(
    rng, feature_map, causal, padded
):
    # Length 13 with chunks of 4: a partial last chunk exercises padding.
    layer = make_layer(feature_map)
    x = rng.normal(scale=0.5, size=(2, 13, 16)).astype("float32")
    mask = padding_mask(2, 13, [13, 9]) if padded else None
    layer(x, x)
    actual = head_outputs(layer, x, x, mask, causal)
    q, k, v = reference.heads(layer, x, x)
    expected = reference.quadratic_feature_attention(
        layer, q, k, v, mask, causal
    )
    assert relative_error(actual, expected) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_layer_output_equals_quadratic_layer(rng, causal):
    layer = make_layer()
    x = rng.normal(size=(2, 21, 16)).astype("float32")
    mask = padding_mask(2, 21, [21, 11])
    actual = layer(x, x, attention_mask=mask, use_causal_mask=causal)
    expected = reference.differentiable_quadratic_layer(
        layer, x, x, mask, causal
    )
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64])
def test_causal_result_does_not_depend_on_chunk_size(rng, chunk_size):
    x = rng.normal(size=(1, 19, 16)).astype("float32")
    reference_layer = make_layer(chunk_size=19)
    expected = reference_layer(x, x, use_causal_mask=True)
    layer = make_layer(chunk_size=chunk_size)
    layer(x, x)
    layer.set_weights(reference_layer.get_weights())
    actual = layer(x, x, use_causal_mask=True)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_gradients_match_quadratic_form(rng, causal, mode):
    layer = make_layer()
    x = tf.constant(rng.normal(size=(2, 18, 16)).astype("float32"))
    mask = padding_mask(2, 18, [18, 13])
    target = tf.constant(rng.normal(size=(2, 18, 16)).astype("float32"))
    layer(x, x)

    def gradients(attention):
        def compute():
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(attention() * target)
            return tape.gradient(loss, [x] + layer.trainable_weights)

        if mode == "eager":
            return compute()
        return tf.function(compute, jit_compile=mode == "xla")()

    actual = gradients(
        lambda: layer(x, x, attention_mask=mask, use_causal_mask=causal)
    )
    expected = gradients(
        lambda: reference.differentiable_quadratic_layer(
            layer, x, x, mask, causal
        )
    )
    assert len(actual) == 9
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "feature_map, local_window",
    [(name, 0) for name in FEATURE_MAPS] + [("softmax", 3)],
)
@pytest.mark.parametrize("position", [0, 5, 6, 11])
def test_causal_has_no_future_leakage(rng, feature_map, local_window, position):
    # Chunks of 4 and groups of 8: positions 5 and 6 share a chunk with
    # the changed positions after them, position 11 a group. A window of 3
    # crosses the chunks of 4.
    layer = make_layer(feature_map, local_window=local_window)
    x = rng.normal(size=(2, 16, 16)).astype("float32")
    changed = x.copy()
    changed[:, position + 1 :] = rng.normal(
        scale=300.0, size=changed[:, position + 1 :].shape
    )
    before = np.asarray(layer(x, x, use_causal_mask=True))
    after = np.asarray(layer(changed, changed, use_causal_mask=True))
    assert np.all(np.isfinite(after))
    np.testing.assert_allclose(
        after[:, : position + 1],
        before[:, : position + 1],
        rtol=1e-6,
        atol=1e-6,
    )
    assert not np.allclose(after[:, position + 1 :], before[:, position + 1 :])


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_change_no_output(rng, feature_map, causal):
    layer = make_layer(feature_map)
    query = rng.normal(size=(2, 14, 16)).astype("float32")
    value = rng.normal(size=(2, 14, 16)).astype("float32")
    mask = padding_mask(2, 14, [14, 6])
    changed = value.copy()
    changed[1, 6:] = rng.normal(scale=300.0, size=changed[1, 6:].shape)
    before = layer(query, value, value_mask=mask, use_causal_mask=causal)
    after = layer(query, changed, value_mask=mask, use_causal_mask=causal)
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_fully_padded_rows_give_zero_attention_and_finite_gradients(
    rng, causal
):
    layer = make_layer(use_bias=False)
    x = tf.constant(rng.normal(size=(2, 20, 16)).astype("float32"))
    mask = padding_mask(2, 20, [20, 0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, x, attention_mask=mask, use_causal_mask=causal)
        loss = tf.reduce_sum(y)
    gradients = tape.gradient(loss, [x] + layer.trainable_weights)
    # No bias: zero attention output projects to exactly zero.
    np.testing.assert_array_equal(y[1], 0.0)
    assert np.all(np.isfinite(y))
    assert all(np.all(np.isfinite(g)) for g in gradients)


@pytest.mark.parametrize("feature_map", ["softmax", "softmax_hyperbolic"])
@pytest.mark.parametrize("causal", [False, True])
def test_large_inputs_stay_finite_and_match_quadratic(rng, feature_map, causal):
    # Logits of order 1e3 overflow exp in float32 without the stabilizers;
    # the quadratic oracle in float64 handles them.
    layer = make_layer(feature_map)
    x = rng.normal(scale=20.0, size=(1, 20, 16)).astype("float32")
    layer(x, x)
    q, k, v = reference.heads(layer, x, x)
    assert np.max(np.abs(q @ np.swapaxes(k, -1, -2))) / np.sqrt(8) > 100
    actual = head_outputs(layer, x, x, causal=causal)
    assert np.all(np.isfinite(actual))
    scores = reference.features(layer, q) @ np.swapaxes(
        reference.features(layer, k), -1, -2
    )
    if np.all(np.isfinite(scores)) and np.all(scores.sum(-1) > 0):
        expected = reference.quadratic_feature_attention(
            layer, q, k, v, causal=causal
        )
        assert relative_error(actual, expected) < 1e-4


def test_one_large_late_key_does_not_underflow_earlier_keys(rng):
    # The failure of a global key max in causal mode: a huge key at the end
    # would shrink every earlier key's features to zero.
    layer = make_layer(chunk_size=16)
    x = rng.normal(size=(1, 16, 16)).astype("float32")
    changed = x.copy()
    changed[0, -1] *= 1000.0
    before = np.asarray(layer(x, x, use_causal_mask=True))
    after = np.asarray(layer(changed, changed, use_causal_mask=True))
    np.testing.assert_allclose(
        after[0, :-1], before[0, :-1], rtol=1e-6, atol=1e-6
    )


def test_grouped_cross_attention_equals_quadratic(rng):
    # 21 queries and 12 keys: groups of 8 split both, with uneven last ones,
    # and the second key group of the short row holds no real key.
    layer = make_layer()
    query = rng.normal(size=(2, 21, 16)).astype("float32")
    value = rng.normal(size=(2, 12, 16)).astype("float32")
    mask = padding_mask(2, 12, [12, 5])
    layer(query, value)
    actual = head_outputs(layer, query, value, mask=mask)
    q, k, v = reference.heads(layer, query, value)
    expected = reference.quadratic_feature_attention(layer, q, k, v, mask)
    assert relative_error(actual, expected) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_grouped_gradients_with_dropout_match_finite_differences(rng, causal):
    # Dropout masks come from stateless seeds, so the recomputation in the
    # backward pass drops the same features: the gradient is the derivative
    # of the dropped-out function. Checked along a random direction in
    # float64, where central differences are accurate to ~1e-8.
    layer = make_layer(num_features=16)
    layer(np.zeros((1, 4, 16), "float32"))
    projection = tf.constant(layer.projection.numpy(), tf.float64)

    def feature_fn(heads):
        return layer.feature_map.log_scaled(heads, projection)

    shape = (2, 2, 19, 8)
    q, k, v = (tf.constant(rng.normal(scale=0.5, size=shape)) for _ in range(3))
    mask = tf.constant(padding_mask(2, 19, [19, 11]))[:, None, :]
    weights = tf.constant(rng.normal(size=shape))

    def loss(q, k, v):
        options = dict(
            mask=mask,
            dropout_rate=0.3,
            dropout_seed=[3, 4],
            recompute_length=RECOMPUTE_LENGTH,
        )
        if causal:
            outputs = favor_ops.causal_linear_attention(
                q, k, v, feature_fn, 16, chunk_size=4, **options
            )
        else:
            outputs = favor_ops.bidirectional_linear_attention(
                q, k, v, feature_fn, **options
            )
        return tf.reduce_sum(tf.sin(outputs) * weights)

    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        value = loss(q, k, v)
    gradients = tape.gradient(value, [q, k, v])
    directions = [tf.constant(rng.normal(size=shape)) for _ in range(3)]
    step = 1e-5
    plus, minus = (
        loss(*[x + sign * step * u for x, u in zip((q, k, v), directions)])
        for sign in (1.0, -1.0)
    )
    numeric = (plus - minus) / (2 * step)
    analytic = sum(tf.reduce_sum(g * u) for g, u in zip(gradients, directions))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


def test_blocked_prefix_equals_dense_prefix(rng):
    # 12 chunks: blocks of 2, then 6 block sums in blocks of 2, then 3
    # dense. Levels rise by up to ~150 overall, far past float64's exp
    # range for a single shared shift; the carried state sits lower still.
    n, features, dim = 12, 3, 2
    chunk_kv = tf.constant(rng.normal(size=(2, 1, n, features, dim)))
    chunk_sum = tf.constant(rng.uniform(size=(2, 1, n, features)))
    steps = np.abs(rng.normal(scale=15.0, size=(2, 1, n)))
    chunk_level = tf.constant(np.cumsum(steps, axis=-1))
    carried = (
        tf.constant(rng.normal(size=(2, 1, features, dim))),
        tf.constant(rng.uniform(size=(2, 1, features))),
        tf.constant([[-5.0], [stabilizers.NO_KEY_LEVEL]], tf.float64),
    )
    blocked = chunk_scan.inherited_states(
        chunk_kv, chunk_sum, chunk_level, carried, prefix_block=2
    )
    dense = chunk_scan.inherited_states(
        chunk_kv, chunk_sum, chunk_level, carried, prefix_block=n + 1
    )
    for actual, expected in zip(
        tf.nest.flatten(blocked), tf.nest.flatten(dense)
    ):
        np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-300)


def layer_features(layer, dtype):
    """The layer's unstabilized feature function, in `dtype`."""
    projection = None
    if layer.projection is not None:
        projection = tf.cast(tf.convert_to_tensor(layer.projection), dtype)
    return lambda heads: layer.feature_map(heads, projection)


def outputs_and_gradients(attention, inputs, target, mode):
    """`attention(*inputs)` and the gradients of `sum(outputs * target)`."""

    def compute(*inputs):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = attention(*inputs)
            loss = tf.reduce_sum(tf.cast(outputs, tf.float64) * target)
        return [outputs] + tape.gradient(loss, list(inputs))

    if mode == "eager":
        return compute(*inputs)
    return tf.function(compute, jit_compile=mode == "xla")(*inputs)


@pytest.mark.parametrize("mode", ["graph", "xla"])
def test_causal_prefix_in_blocks_matches_quadratic(rng, mode):
    # One position per chunk and blocks of 2: 24 chunks pass their states on
    # in three levels of blocks (24, 12, 6), then 3 chunk sums densely.
    layer = make_layer()
    x = rng.normal(scale=2.0, size=(2, 24, 16)).astype("float32")
    layer(x, x)
    heads = [tf.constant(h, tf.float32) for h in reference.heads(layer, x, x)]
    mask = tf.constant(padding_mask(2, 24, [24, 17]))[:, None, :]
    target = tf.constant(rng.normal(size=(2, 2, 24, 8)))
    feature_fn, query_feature_fn = favor_kernels.feature_fns(layer)
    actual = outputs_and_gradients(
        lambda q, k, v: favor_ops.causal_linear_attention(
            q,
            k,
            v,
            feature_fn,
            32,
            mask=mask,
            chunk_size=1,
            query_feature_fn=query_feature_fn,
            prefix_block=2,
        ),
        heads,
        target,
        mode,
    )
    expected = outputs_and_gradients(
        lambda q, k, v: favor_ops.naive_linear_attention(
            q, k, v, layer_features(layer, tf.float64), mask=mask, causal=True
        ),
        [tf.cast(h, tf.float64) for h in heads],
        target,
        mode,
    )
    # float32 rounding, relative to each tensor's largest entry.
    for a, e in zip(actual, expected):
        assert relative_error(np.asarray(a), np.asarray(e)) < 1e-5
