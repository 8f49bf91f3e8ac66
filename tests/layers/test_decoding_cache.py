"""Decoding caches: a sequence run in cached pieces (a prompt, then one
position at a time) gives the outputs of one causal call over the whole,
in FavorAttention and in PerformerBlock; the cache's size does not grow."""

import itertools

import keras
import numpy as np
import pytest

import keras_favor
from keras_favor.layers import PerformerBlock

FEATURE_MAPS = ["softmax", "softmax_hyperbolic", "softmax_trig", "relu", "elu"]
LENGTH = 13
# Position 0 of row 1 and the first 7 of row 2 are left padding.
PADDED = ((1, 4), (2, 7))
# float32 round-off of two summation orders, relative to the largest output.
RTOL = 1e-5


def padded_inputs(rng, dim=16, length=LENGTH):
    x = rng.normal(size=(3, length, dim)).astype("float32")
    mask = np.ones((3, length), bool)
    for row, count in PADDED:
        mask[row, :count] = False
    return x, mask


def run_in_pieces(call, x, mask, cache, first=6):
    """A prompt of `first` positions, then one position per call."""
    outputs, cache = call(x[:, :first], mask[:, :first], cache, 0)
    pieces = [np.asarray(outputs)]
    for t in range(first, x.shape[1]):
        outputs, cache = call(x[:, t : t + 1], mask[:, t : t + 1], cache, t)
        pieces.append(np.asarray(outputs))
    return np.concatenate(pieces, axis=1), cache


def assert_equal_at_real_positions(got, want, mask):
    scale = np.max(np.abs(want[mask]))
    np.testing.assert_allclose(got[mask], want[mask], rtol=0, atol=RTOL * scale)


def attention_layer(feature_map, local_window=0, dropout=0.0):
    return keras_favor.FavorAttention(
        num_heads=2,
        key_dim=8,
        num_features=16,
        feature_map=feature_map,
        local_window=local_window,
        chunk_size=4,
        seed=1,
        dropout=dropout,
    )


def layer_call(layer):
    def call(x, mask, cache, index):
        return layer(
            x,
            query_mask=mask,
            use_causal_mask=True,
            cache=cache,
            cache_update_index=index,
        )

    return call


@pytest.mark.parametrize(
    "feature_map, local_window",
    [(name, 0) for name in FEATURE_MAPS]
    + [("softmax", 3), ("softmax_hyperbolic", 5), ("softmax", 40000)],
)
def test_cached_pieces_equal_one_causal_call(rng, feature_map, local_window):
    layer = attention_layer(feature_map, local_window)
    x, mask = padded_inputs(rng)
    want = np.asarray(layer(x, query_mask=mask, use_causal_mask=True))
    got, _ = run_in_pieces(layer_call(layer), x, mask, layer.empty_cache(3))
    assert_equal_at_real_positions(got, want, mask)


@pytest.mark.parametrize("local_window", [3, 40000])
def test_window_cache_for_max_length_positions_keeps_fewer_keys(
    rng, local_window
):
    layer = attention_layer("softmax", local_window)
    x, mask = padded_inputs(rng)
    layer(x[:, :1])
    cache = layer.empty_cache(3, max_length=LENGTH)
    # A step costs what the kept keys cost: the window's, or the sequence's
    # where the window is longer.
    assert cache[3].shape[2] == min(local_window, LENGTH)
    want = np.asarray(layer(x, query_mask=mask, use_causal_mask=True))
    got, cache = run_in_pieces(layer_call(layer), x, mask, cache)
    assert_equal_at_real_positions(got, want, mask)
    if local_window > LENGTH:
        with pytest.raises(ValueError, match="`cache_update_index` .13."):
            layer_call(layer)(x[:, :1], mask[:, :1], cache, LENGTH)
        other = attention_layer("softmax", local_window=4)
        other(x[:, :1])
        with pytest.raises(ValueError, match="more than `local_window`"):
            layer_call(other)(x[:, :1], mask[:, :1], cache, 0)


def test_cache_keeps_its_shapes_at_every_position(rng):
    layer = attention_layer("softmax", local_window=3)
    x, mask = padded_inputs(rng, length=40)
    layer(x[:, :1])
    empty = layer.empty_cache(3)
    _, cache = run_in_pieces(layer_call(layer), x, mask, empty, first=1)
    assert [tuple(c.shape) for c in cache] == [tuple(c.shape) for c in empty]
    assert all(np.all(np.isfinite(np.asarray(c, "float32"))) for c in cache)


def test_no_dropout_when_decoding(rng):
    layer = attention_layer("softmax", dropout=0.5)
    x, mask = padded_inputs(rng)
    want = np.asarray(layer(x, query_mask=mask, use_causal_mask=True))
    outputs, _ = layer(
        x,
        query_mask=mask,
        use_causal_mask=True,
        cache=layer.empty_cache(3),
        training=True,
    )
    assert_equal_at_real_positions(np.asarray(outputs), want, mask)


@pytest.mark.parametrize("attention", ["favor", "exact"])
def test_block_cached_pieces_equal_one_call(rng, attention):
    block = PerformerBlock(
        num_heads=2,
        intermediate_dim=32,
        causal=True,
        attention=attention,
        num_features=16,
        chunk_size=4,
        seed=3,
    )
    x, mask = padded_inputs(rng)
    want = np.asarray(block(x, mask=mask))

    def call(x, mask, cache, index):
        return block(x, mask=mask, cache=cache, cache_update_index=index)

    got, _ = run_in_pieces(call, x, mask, block.empty_cache(3, LENGTH))
    assert_equal_at_real_positions(got, want, mask)


def test_bidirectional_or_cross_attention_with_a_cache_raises(rng):
    layer = attention_layer("softmax")
    x, _ = padded_inputs(rng)
    layer(x)
    cache = layer.empty_cache(3)
    with pytest.raises(ValueError, match="use_causal_mask=True"):
        layer(x, cache=cache)
    with pytest.raises(ValueError, match="cross-attention"):
        layer(x, x[:, :5], use_causal_mask=True, cache=cache)
    with pytest.raises(ValueError, match="one position axis"):
        layer(x[:, None], use_causal_mask=True, cache=cache)


def test_cache_of_the_wrong_shape_or_batch_raises(rng):
    layer = attention_layer("softmax")
    x, _ = padded_inputs(rng)
    layer(x)
    cache = layer.empty_cache(3)
    with pytest.raises(ValueError, match=r"`cache\[0\]`.*\(3, 2, 16, 8\)"):
        layer(x[:2], use_causal_mask=True, cache=cache)
    with pytest.raises(ValueError, match="tuple of 3 tensors"):
        layer(x, use_causal_mask=True, cache=cache[:2])
    wider = attention_layer("softmax", local_window=3)
    wider(x)
    with pytest.raises(ValueError, match="tuple of 6 tensors"):
        wider(x, use_causal_mask=True, cache=cache)
    with pytest.raises(ValueError, match="batch_size"):
        layer.empty_cache(0)


def test_block_cache_errors(rng):
    x, _ = padded_inputs(rng)
    bidirectional = PerformerBlock(2, 32)
    bidirectional(x)
    with pytest.raises(ValueError, match="causal"):
        bidirectional.empty_cache(3)
    exact = PerformerBlock(2, 32, causal=True, attention="exact")
    exact(x)
    with pytest.raises(ValueError, match="max_length"):
        exact.empty_cache(3)
    cache = exact.empty_cache(3, LENGTH)
    with pytest.raises(ValueError, match="cache_update_index"):
        exact(x, cache=cache)
    with pytest.raises(ValueError, match=r"`cache_update_index` \(1\)"):
        exact(x, cache=cache, cache_update_index=1)
    with pytest.raises(ValueError, match=r"`cache\[0\]`.*\(2, 13, 2, 8\)"):
        exact(x[:2], cache=cache, cache_update_index=0)
    with pytest.raises(ValueError, match="built"):
        PerformerBlock(2, 32, causal=True).empty_cache(3)


@pytest.mark.parametrize("feature_map", ["softmax", "softmax_hyperbolic"])
@pytest.mark.parametrize("first", [1, 6])
def test_one_position_steps_at_large_input_scales_equal_the_whole(
    feature_map, first
):
    """Attention logits in the tens and hundreds: the recurrent step keeps
    a level per feature and shifts each query by its normalizer's largest
    term, so no normalizer is lost, also after a chunked prefill whose
    state holds sums far below their level (input scales 6 to 12)."""
    layer = attention_layer(feature_map)
    for scale, seed in itertools.product((6, 8, 10, 12, 30), range(3)):
        x, mask = padded_inputs(np.random.default_rng(seed))
        x = scale * x
        want = np.asarray(layer(x, query_mask=mask, use_causal_mask=True))
        got, _ = run_in_pieces(
            layer_call(layer), x, mask, layer.empty_cache(3), first=first
        )
        assert np.all(np.isfinite(got))
        assert np.all(np.abs(got[mask]).sum(-1) > 0)
        assert_equal_at_real_positions(got, want, mask)


def test_cached_softmax_attention_pieces_equal_multi_head_attention(rng):
    # The reference: keras.layers.MultiHeadAttention, causal over the whole
    # sequence with the padding as a key mask, with the same weights.
    x, mask = padded_inputs(rng)
    reference = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)
    want = np.asarray(reference(x, x, value_mask=mask, use_causal_mask=True))
    layer = keras_favor.layers.CachedSoftmaxAttention(num_heads=2, key_dim=8)
    layer.build(x.shape, x.shape)
    layer.set_weights(reference.get_weights())
    got, cache = run_in_pieces(
        layer_call(layer), x, mask, layer.empty_cache(3, LENGTH)
    )
    assert_equal_at_real_positions(got, want, mask)
    np.testing.assert_array_equal(np.asarray(cache[2]), mask)
    with pytest.raises(ValueError, match="use_causal_mask=True"):
        layer(x, cache=cache, cache_update_index=0)
    with pytest.raises(ValueError, match="cross-attention"):
        layer(x, x, use_causal_mask=True, cache=cache, cache_update_index=0)
