"""keras-hub's own tests of TransformerDecoder, TransformerEncoder and
CachedMultiHeadAttention, adapted to their converted forms (rewritten
from what they check). Expected exceptions: no attention scores, no
custom attention masks, no cross-attention key/value cache to fill."""

import keras
import keras_hub
import numpy as np
import pytest
from keras import ops
from keras import random

from keras_favor.convert import from_multi_head_attention
from keras_favor.convert import performerize
from keras_favor.keras_hub import FavorTransformerDecoder
from keras_favor.keras_hub.attention_swap import convert_held_attention
from keras_favor.layers.favor_attention import FavorAttention

BATCH, LENGTH, HEADS, KEY_DIM = 2, 5, 2, 4
HIDDEN = HEADS * KEY_DIM
LAYER_ARGUMENTS = dict(
    intermediate_dim=4,
    num_heads=2,
    activation="relu",
    layer_norm_epsilon=1e-05,
    kernel_initializer="HeNormal",
    bias_initializer="Zeros",
    dropout=0.1,
)
OPTIONS = {"seed": 0, "num_features": 16}


def decoder(**kwargs):
    return FavorTransformerDecoder(
        **{**LAYER_ARGUMENTS, **kwargs}, favor_options=OPTIONS
    )


def converted_encoder(length=4, **kwargs):
    """A converted keras-hub TransformerEncoder: `performerize` of a model
    holding one (`model.layers[-1]`)."""
    encoder = keras_hub.layers.TransformerEncoder(
        **{**LAYER_ARGUMENTS, **kwargs}
    )
    model = keras.Sequential([keras.Input((length, 6)), encoder])
    return model, performerize(model, **OPTIONS)


def uniform(*shape, seed=0):
    return random.uniform(shape, seed=seed)


# TransformerDecoder.


@pytest.mark.parametrize("normalize_first", [False, True])
@pytest.mark.parametrize("cross_attention", [False, True])
def test_decoder_behaviors(normalize_first, cross_attention):
    layer = decoder(normalize_first=normalize_first)
    x = uniform(2, 4, 6)
    args = (x, uniform(2, 4, 6, seed=1)) if cross_attention else (x,)
    outputs = layer(*args)
    assert tuple(outputs.shape) == (2, 4, 6)
    assert len(layer.trainable_weights) == (26 if cross_attention else 16)
    attentions = [layer._self_attention_layer] + (
        [layer._cross_attention_layer] if cross_attention else []
    )
    assert all(isinstance(a, FavorAttention) for a in attentions)
    # Projection and redraw count of each attention are its non-trainable
    # weights.
    assert len(layer.non_trainable_weights) == 2 * len(attentions)
    restored = FavorTransformerDecoder.from_config(layer.get_config())
    assert restored.get_config() == layer.get_config()
    restored(*args)
    restored.set_weights(layer.get_weights())
    np.testing.assert_allclose(
        np.asarray(restored(*args)), np.asarray(outputs), atol=1e-6
    )


def test_decoder_invalid_calls():
    encoder_input, decoder_input = ops.zeros((2, 4, 6)), ops.zeros((2, 4, 6))
    with_cross = decoder()
    with_cross(decoder_input, encoder_input)
    with pytest.raises(ValueError, match="encoder_sequence"):
        with_cross(decoder_input)
    without_cross = decoder()
    without_cross(decoder_input)
    with pytest.raises(ValueError, match="encoder_sequence"):
        without_cross(decoder_input, encoder_input)


def test_invalid_kernel_initializer_raises():
    with pytest.raises(ValueError):
        decoder(kernel_initializer="Invalid")


def test_decoder_training_propagation():
    layer = decoder(dropout=0.99999)  # zeros the sub-layers' outputs
    decoder_sequence = uniform(1, 4, 6)
    outputs = layer(decoder_sequence, uniform(1, 4, 6, seed=1), training=True)
    expected = layer._feedforward_layer_norm(
        layer._self_attention_layer_norm(decoder_sequence)
    )
    np.testing.assert_allclose(
        np.asarray(outputs), np.asarray(expected), atol=1e-5
    )


@pytest.mark.parametrize("cross_attention", [False, True])
def test_decoder_mask_propagation(cross_attention):
    layer = decoder()
    decoder_sequence = keras.layers.Masking(mask_value=-1.0)(
        ops.convert_to_tensor(
            np.where(
                np.arange(4)[None, :, None] < 2, np.ones((1, 4, 6)), -1.0
            ).astype("float32")
        )
    )
    args = (decoder_sequence,)
    if cross_attention:
        args += (uniform(1, 4, 6),)
    outputs = layer(*args)
    np.testing.assert_array_equal(
        np.asarray(outputs._keras_mask), [[True, True, False, False]]
    )


def cached_loop(layer, x, cache, **kwargs):
    """`layer` called on each position of `x` in turn inside
    `ops.while_loop`, its state carried along."""

    def body(i, outputs, cache):
        token = ops.slice(x, (0, i, 0), (BATCH, 1, HIDDEN))
        output, cache = layer(
            token,
            self_attention_cache=cache,
            self_attention_cache_update_index=i,
            **kwargs,
        )[:2]
        return i + 1, ops.slice_update(outputs, (0, i, 0), output), cache

    _, outputs, cache = ops.while_loop(
        lambda i, outputs, cache: i < LENGTH,
        body,
        (0, ops.zeros_like(x), cache),
    )
    return outputs, cache


@pytest.mark.parametrize("cross_attention", [False, True])
def test_decoder_cache_call_is_correct(cross_attention):
    """One cached call over the sequence, a loop of one-position cached
    calls and an uncached causal call give the same outputs; so do the
    next position's outputs from either state (the state's stabilizer
    levels may differ, its meaning does not)."""
    layer = decoder(num_heads=HEADS, dropout=0.0)
    x = uniform(BATCH, LENGTH + 1, HIDDEN)
    kwargs = {}
    if cross_attention:
        kwargs["encoder_sequence"] = uniform(BATCH, 3, HIDDEN, seed=1)
    full = layer(x, **kwargs)
    # With cross-attention the call also returns the (unused)
    # cross-attention cache, as keras-hub's decoder does.
    layer_outputs, one_call_state = layer(
        x[:, :LENGTH],
        self_attention_cache=layer.empty_cache(BATCH),
        self_attention_cache_update_index=0,
        **kwargs,
    )[:2]
    loop_outputs, loop_state = cached_loop(
        layer, x[:, :LENGTH], layer.empty_cache(BATCH), **kwargs
    )
    np.testing.assert_allclose(
        np.asarray(loop_outputs), np.asarray(layer_outputs), atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(loop_outputs), np.asarray(full)[:, :LENGTH], atol=1e-5
    )
    for state in (one_call_state, loop_state):
        last = layer(
            x[:, LENGTH:],
            self_attention_cache=state,
            self_attention_cache_update_index=LENGTH,
            **kwargs,
        )[0]
        np.testing.assert_allclose(
            np.asarray(last)[:, 0], np.asarray(full)[:, LENGTH], atol=1e-5
        )


def cross_step(layer, x, encoded, cache, update_index=None, mask=None):
    """A decoding step of `layer` at position 0 with `cache` as its
    cross-attention cache: `(outputs, cross_cache)`."""
    outputs, _, cross_cache = layer(
        x,
        encoded,
        encoder_padding_mask=mask,
        self_attention_cache=layer.empty_cache(BATCH),
        self_attention_cache_update_index=0,
        cross_attention_cache=cache,
        cross_attention_cache_update_index=update_index,
    )
    return np.asarray(outputs), cross_cache


def test_decoder_steps_from_the_static_encoder_cache_alone():
    """The encoder's key sums, computed once, give each step the full
    cross-attention's outputs, whatever `encoder_sequence` the step is
    handed (it is not read)."""
    layer = decoder()
    x, encoded = uniform(BATCH, 1, HIDDEN), uniform(BATCH, 7, HIDDEN, seed=1)
    mask = np.arange(7)[None] < np.array([[7], [4]])
    expected = np.asarray(layer(x, encoded, encoder_padding_mask=mask))
    cache = layer.encoder_cache(encoded, mask)
    assert tuple(cache.shape) == (BATCH, 2 * 16 * (KEY_DIM + 2))
    other = uniform(BATCH, 2, HIDDEN, seed=2)
    outputs, returned = cross_step(layer, x, other, cache)
    assert returned is cache
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)
    # Update index 0: the cache is computed from `encoder_sequence`.
    outputs, filled = cross_step(layer, x, encoded, cache * 0, 0, mask)
    np.testing.assert_allclose(np.asarray(filled), np.asarray(cache))
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)
    # An empty cache: the step reads `encoder_sequence`.
    empty = ops.zeros((BATCH, 0))
    outputs, _ = cross_step(layer, x, encoded, empty, None, mask)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)


def test_decoder_rejects_a_cross_cache_it_cannot_use():
    layer = decoder()
    x, encoded = uniform(BATCH, 1, HIDDEN), uniform(BATCH, 3, HIDDEN)
    layer(x, encoded)
    with pytest.raises(ValueError, match="cross_attention_cache"):
        cross_step(layer, x, encoded, ops.zeros((BATCH, 2, 3, 2, 4)))
    with pytest.raises(ValueError, match="cross_attention_cache_update"):
        cross_step(layer, x, encoded, layer.encoder_cache(encoded), 1)
    statistics = FavorTransformerDecoder(
        **LAYER_ARGUMENTS, favor_options={**OPTIONS, "feature_map": "favor++"}
    )
    statistics(x, encoded)
    assert not statistics.supports_static_cross_cache
    with pytest.raises(ValueError, match="static cross-attention cache"):
        statistics.encoder_cache(encoded)


# TransformerEncoder.


@pytest.mark.parametrize("normalize_first", [False, True])
def test_encoder_behaviors_and_valid_call(normalize_first):
    _, converted = converted_encoder(normalize_first=normalize_first)
    inputs = uniform(2, 4, 6)
    assert tuple(converted(inputs).shape) == (2, 4, 6)
    encoder = converted.layers[-1].layer
    assert isinstance(encoder._self_attention_layer, FavorAttention)
    assert len(encoder.trainable_weights) == 16


def test_encoder_valid_call_with_mask_equals_the_original_with_a_full_window():
    keras.utils.set_random_seed(0)
    encoder = keras_hub.layers.TransformerEncoder(
        intermediate_dim=4, num_heads=2
    )
    encoder.build([2, 4, 6])
    favor = from_multi_head_attention(
        encoder._self_attention_layer, local_window=4, seed=0
    )
    inputs = uniform(2, 4, 6)
    mask = inputs[:, :, 0] < 0.5
    expected = encoder(inputs, mask)
    convert_held_attention(encoder, {"local_window": 4, "seed": 0})
    assert encoder._self_attention_layer.get_config() == favor.get_config()
    np.testing.assert_allclose(
        np.asarray(encoder(inputs, mask)), np.asarray(expected), atol=1e-5
    )


def test_encoder_training_propagation():
    _, converted = converted_encoder(dropout=0.99999)
    encoder = converted.layers[-1].layer
    inputs = uniform(1, 4, 6)
    outputs = encoder(inputs, training=True)
    expected = encoder._feedforward_layer_norm(
        encoder._self_attention_layer_norm(inputs)
    )
    np.testing.assert_allclose(
        np.asarray(outputs), np.asarray(expected), atol=1e-5
    )


def test_encoder_mask_propagation():
    _, converted = converted_encoder()
    encoder = converted.layers[-1]
    inputs = keras.layers.Masking(mask_value=-1.0)(
        ops.convert_to_tensor(
            np.where(
                np.arange(4)[None, :, None] < 2, np.ones((1, 4, 6)), -1.0
            ).astype("float32")
        )
    )
    outputs = encoder(inputs)
    np.testing.assert_array_equal(
        np.asarray(outputs._keras_mask), [[True, True, False, False]]
    )


def test_encoder_attention_scores_raise():
    _, converted = converted_encoder()
    with pytest.raises(ValueError, match="return_attention_scores"):
        converted.layers[-1].layer(
            uniform(1, 4, 6), return_attention_scores=True
        )


# CachedMultiHeadAttention.


def converted_cached_attention(dropout=0.0):
    mha = keras_hub.layers.CachedMultiHeadAttention(
        num_heads=HEADS, key_dim=KEY_DIM, dropout=dropout
    )
    mha.build((BATCH, LENGTH, HIDDEN), (BATCH, LENGTH, HIDDEN))
    return from_multi_head_attention(mha, **OPTIONS)


def test_cached_attention_behaviors():
    layer = converted_cached_attention(dropout=0.1)
    outputs = layer(uniform(2, 4, HIDDEN), uniform(2, 4, HIDDEN, seed=1))
    assert tuple(outputs.shape) == (2, 4, HIDDEN)
    assert len(layer.trainable_weights) == 8


def test_cached_attention_cache_call_is_correct():
    """keras-hub's test passes a lower-triangular mask; the converted layer
    asks for causality instead."""
    layer = converted_cached_attention()
    x = uniform(BATCH, LENGTH, HIDDEN)
    no_loop, _ = layer(
        x,
        use_causal_mask=True,
        cache=layer.empty_cache(BATCH),
        cache_update_index=0,
    )

    def body(i, outputs, cache):
        token = ops.slice(x, (0, i, 0), (BATCH, 1, HIDDEN))
        output, cache = layer(
            token, use_causal_mask=True, cache=cache, cache_update_index=i
        )
        return i + 1, ops.slice_update(outputs, (0, i, 0), output), cache

    _, loop, _ = ops.while_loop(
        lambda i, outputs, cache: i < LENGTH,
        body,
        (0, ops.zeros_like(x), layer.empty_cache(BATCH)),
    )
    np.testing.assert_allclose(np.asarray(loop), np.asarray(no_loop), atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(no_loop),
        np.asarray(layer(x, x, use_causal_mask=True)),
        atol=1e-5,
    )


def test_cached_attention_scores_raise():
    layer = converted_cached_attention()
    x = uniform(BATCH, LENGTH, HIDDEN)
    with pytest.raises(ValueError, match="return_attention_scores"):
        layer(x, x, return_attention_scores=True)


def test_cached_attention_training_propagation():
    """Dropout near 1 drops (almost) every key feature of the numerator:
    the output is the output projection of zeros."""
    layer = converted_cached_attention(dropout=0.99999)
    x = uniform(BATCH, LENGTH, HIDDEN)
    outputs = layer(x, x, training=True)
    zeros = ops.zeros((BATCH, LENGTH, HEADS, KEY_DIM))
    np.testing.assert_allclose(
        np.asarray(outputs), np.asarray(layer.output_dense(zeros)), atol=1e-5
    )
