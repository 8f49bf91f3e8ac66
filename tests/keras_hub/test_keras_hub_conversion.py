"""`performerize` on keras-hub models built from small configs: what
converts (equal to the original where FAVOR+ is exact, with a local
window as long as the sequence), what stays causal, what raises."""

import configparser
import pathlib
import re

import keras
import keras_hub
import numpy as np
import pytest

from keras_favor.convert import performerize
from keras_favor.keras_hub import FavorTransformerDecoder
from keras_favor.layers.favor_attention import FavorAttention

ROOT = pathlib.Path(__file__).resolve().parents[2]
SIZES = dict(
    vocabulary_size=50,
    num_layers=2,
    num_heads=2,
    hidden_dim=16,
    intermediate_dim=32,
    max_sequence_length=16,
)
LENGTH = 8
# A local window as long as the sequence makes FAVOR+ exact softmax
# attention: outputs then equal the original's up to float32 rounding of
# a different summation order.
EXACT = dict(local_window=LENGTH, seed=0)
TOLERANCE = 1e-5


def token_inputs(batch=2, length=LENGTH, seed=0):
    rng = np.random.RandomState(seed)
    padding = np.ones((batch, length), bool)
    padding[1, length - 3 :] = False
    return {
        "token_ids": rng.randint(1, 50, (batch, length)).astype("int32"),
        "padding_mask": padding,
    }


def gpt2_backbone():
    keras.utils.set_random_seed(1)
    return keras_hub.models.GPT2Backbone(**SIZES)


@pytest.fixture(scope="module")
def converted_gpt2():
    """`gpt2_backbone()` converted to plain FAVOR+, once per module (the
    tests only call it)."""
    return performerize(gpt2_backbone(), seed=0)


def attention_layers(model):
    from keras_favor.convert.attention_paths import all_layers

    return [
        layer
        for _, layer in all_layers(model)
        if isinstance(layer, (keras.layers.MultiHeadAttention, FavorAttention))
    ]


def real_positions(outputs, inputs):
    """The outputs at unpadded positions (padded ones are not used)."""
    return np.asarray(outputs)[inputs["padding_mask"]]


def test_keras_hub_extra_is_declared_and_installed_by_make_test():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    extra = config["options.extras_require"]["keras-hub"].split()
    assert extra == ["keras-hub>=0.32,<0.33"]
    assert keras_hub.__version__.startswith("0.32")
    makefile = (ROOT / "Makefile").read_text()
    extras = re.search(r'pip install -e "\.\[([^\]]*)\]"', makefile)
    assert "keras-hub" in extras.group(1).split(",")


@pytest.mark.parametrize(
    "backbone_class", ["GPT2Backbone", "OPTBackbone", "BertBackbone"]
)
def test_backbone_converts_and_equals_the_original_with_a_full_window(
    backbone_class,
):
    keras.utils.set_random_seed(2)
    backbone = getattr(keras_hub.models, backbone_class)(**SIZES)
    inputs = token_inputs()
    if backbone_class == "BertBackbone":
        inputs["segment_ids"] = np.zeros_like(inputs["token_ids"])
    converted = performerize(backbone, **EXACT)
    assert type(converted).__name__ == "Favor" + backbone_class
    assert isinstance(converted, type(backbone))
    attentions = attention_layers(converted)
    assert len(attentions) == 2
    assert all(isinstance(layer, FavorAttention) for layer in attentions)
    expected, outputs = backbone(inputs), converted(inputs)
    if isinstance(expected, dict):
        expected, outputs = (
            expected["sequence_output"],
            outputs["sequence_output"],
        )
    np.testing.assert_allclose(
        real_positions(outputs, inputs),
        real_positions(expected, inputs),
        atol=TOLERANCE,
    )
    # The original is left as it was.
    assert all(
        type(layer) is not FavorAttention
        for layer in attention_layers(backbone)
    )


def test_converted_gpt2_stays_causal_bit_equal_before_a_changed_token(
    converted_gpt2,
):
    converted = converted_gpt2
    inputs = token_inputs()
    changed = {key: value.copy() for key, value in inputs.items()}
    changed["token_ids"][:, 5] = (changed["token_ids"][:, 5] % 49) + 1
    before, after = converted(inputs), converted(changed)
    np.testing.assert_array_equal(
        np.asarray(before)[:, :5], np.asarray(after)[:, :5]
    )
    assert not np.allclose(np.asarray(before)[0, 5:], np.asarray(after)[0, 5:])


def test_converted_decoder_ignores_left_padding(converted_gpt2):
    """A left-padded sequence gives the outputs of the same inputs
    unpadded: padding keys are masked, not only later than real ones."""
    decoder = converted_gpt2.transformer_layers[0]
    x = keras.random.normal((1, 5, 16), seed=3)
    padded_x = keras.ops.concatenate([keras.random.normal((1, 3, 16)), x], 1)
    mask = np.array([[False] * 3 + [True] * 5])
    np.testing.assert_allclose(
        np.asarray(decoder(padded_x, decoder_padding_mask=mask))[:, 3:],
        np.asarray(decoder(x)),
        atol=TOLERANCE,
    )


def test_custom_decoder_attention_mask_raises(converted_gpt2):
    decoder = converted_gpt2.transformer_layers[0]
    x = keras.random.normal((2, LENGTH, 16))
    mask = np.tril(np.ones((LENGTH, LENGTH), bool))[None].repeat(2, 0)
    with pytest.raises(ValueError, match="decoder_attention_mask"):
        decoder(x, decoder_attention_mask=mask)


def decoder_model(cross_attention, causal):
    keras.utils.set_random_seed(4)
    decoder_input = keras.Input((LENGTH, 16))
    inputs = [decoder_input]
    decoder = keras_hub.layers.TransformerDecoder(
        intermediate_dim=32, num_heads=2
    )
    if cross_attention:
        encoder_input = keras.Input((LENGTH + 2, 16))
        inputs.append(encoder_input)
        outputs = decoder(decoder_input, encoder_input, use_causal_mask=causal)
    else:
        outputs = decoder(decoder_input, use_causal_mask=causal)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("causal", [True, False])
def test_functional_model_with_a_decoder_converts(causal):
    model = decoder_model(cross_attention=False, causal=causal)
    converted = performerize(model, **EXACT)
    assert isinstance(converted.layers[1], FavorTransformerDecoder)
    x = keras.random.normal((2, LENGTH, 16), seed=5)
    np.testing.assert_allclose(
        np.asarray(converted(x)), np.asarray(model(x)), atol=TOLERANCE
    )
    changed = keras.ops.concatenate([x[:, :5], x[:, 5:] + 1.0], axis=1)
    early_equal = np.array_equal(
        np.asarray(converted(x))[:, :5], np.asarray(converted(changed))[:, :5]
    )
    assert early_equal == causal


def test_decoder_with_cross_attention_converts_both_attention_layers():
    model = decoder_model(cross_attention=True, causal=True)
    # The window makes the self-attention exact; cross-attention takes none.
    converted = performerize(model, num_features=4096, **EXACT)
    decoder = converted.layers[2]
    assert isinstance(decoder._self_attention_layer, FavorAttention)
    assert isinstance(decoder._cross_attention_layer, FavorAttention)
    x = keras.random.normal((2, LENGTH, 16), seed=5)
    # Small encoder states keep the scores small: positive random features
    # estimate `exp(q . k)` with a relative variance that grows like
    # `exp(|q|^2 + |k|^2)` and falls like `1 / num_features`.
    encoded = 0.25 * keras.random.normal((2, LENGTH + 2, 16), seed=6)
    np.testing.assert_allclose(
        np.asarray(converted([x, encoded])),
        np.asarray(model([x, encoded])),
        atol=0.02,
    )


def test_bart_converts_encoder_and_decoder():
    keras.utils.set_random_seed(6)
    backbone = keras_hub.models.BartBackbone(**SIZES)
    inputs = token_inputs()
    inputs = {
        "encoder_token_ids": inputs["token_ids"],
        "encoder_padding_mask": inputs["padding_mask"],
        "decoder_token_ids": inputs["token_ids"][:, :6],
        "decoder_padding_mask": inputs["padding_mask"][:, :6],
    }
    converted = performerize(backbone, **EXACT)
    assert len(attention_layers(converted)) == 6
    assert all(
        isinstance(layer, FavorAttention)
        for layer in attention_layers(converted)
    )
    expected, outputs = backbone(inputs), converted(inputs)
    np.testing.assert_allclose(
        np.asarray(outputs["encoder_sequence_output"]),
        np.asarray(expected["encoder_sequence_output"]),
        atol=TOLERANCE,
    )


def test_whisper_bias_less_key_projection_raises_naming_it():
    keras.utils.set_random_seed(7)
    backbone = keras_hub.models.WhisperBackbone(
        vocabulary_size=50,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        num_mels=8,
        max_encoder_sequence_length=16,
        max_decoder_sequence_length=8,
    )
    with pytest.raises(ValueError, match="WhisperCachedMultiHeadAttention"):
        performerize(backbone)


def test_keras_hub_backbone_with_a_predicate_raises():
    with pytest.raises(ValueError, match="predicate"):
        performerize(gpt2_backbone(), predicate=lambda mha: True)
