"""`performerize` on keras-hub's encoder backbones built from small
configs: DistilBERT, RoBERTa, XLM-RoBERTa, ALBERT and ELECTRA convert
every attention layer, keep every other weight, and equal the original
where FAVOR+ is exact (a local window as long as the sequence)."""

import keras
import keras_hub
import numpy as np
import pytest

from keras_favor.convert import performerize
from keras_favor.convert.attention_paths import all_layers
from keras_favor.layers.favor_attention import FavorAttention

LENGTH = 8
# With a local window as long as the sequence, FAVOR+ is exact softmax
# attention: outputs equal the original's up to float32 rounding.
EXACT = dict(local_window=LENGTH, seed=0)
TOLERANCE = 1e-5
COMMON = dict(
    num_layers=2,
    num_heads=2,
    hidden_dim=16,
    intermediate_dim=32,
    max_sequence_length=16,
)
BACKBONES = {
    "DistilBertBackbone": dict(vocabulary_size=50, **COMMON),
    "RobertaBackbone": dict(vocabulary_size=50, **COMMON),
    "XLMRobertaBackbone": dict(vocabulary_size=50, **COMMON),
    # Two layers of one group: one TransformerEncoder applied twice.
    "AlbertBackbone": dict(
        vocabulary_size=50, embedding_dim=8, num_groups=1, **COMMON
    ),
    "ElectraBackbone": dict(vocab_size=50, embedding_dim=8, **COMMON),
}


def inputs_for(backbone):
    rng = np.random.RandomState(0)
    padding_mask = np.ones((2, LENGTH), bool)
    padding_mask[1, LENGTH - 3 :] = False
    inputs = {
        "token_ids": rng.randint(1, 50, (2, LENGTH)).astype("int32"),
        "padding_mask": padding_mask,
    }
    if "segment_ids" in backbone.input:
        inputs["segment_ids"] = np.zeros((2, LENGTH), "int32")
    return inputs


def attention_layers(model):
    return [
        layer
        for _, layer in all_layers(model)
        if isinstance(layer, (keras.layers.MultiHeadAttention, FavorAttention))
    ]


def non_attention_weights(model):
    """Every weight outside attention layers, by path."""
    inside = {
        id(weight)
        for layer in attention_layers(model)
        for weight in layer.weights
    }
    return {
        weight.path: np.asarray(weight)
        for weight in model.weights
        if id(weight) not in inside
    }


def sequence_output(outputs):
    if isinstance(outputs, dict):
        outputs = outputs["sequence_output"]
    return np.asarray(outputs)


@pytest.mark.parametrize("backbone_class", sorted(BACKBONES))
def test_encoder_backbone_converts_every_attention_and_keeps_the_rest(
    backbone_class,
):
    keras.utils.set_random_seed(3)
    backbone = getattr(keras_hub.models, backbone_class)(
        **BACKBONES[backbone_class]
    )
    converted = performerize(backbone, **EXACT)
    assert type(converted).__name__ == "Favor" + backbone_class
    original_attention = attention_layers(backbone)
    attention = attention_layers(converted)
    assert len(attention) == len(original_attention) > 0
    assert all(isinstance(layer, FavorAttention) for layer in attention)
    for layer, original in zip(attention, original_attention):
        # FavorAttention lists its projection first, then
        # MultiHeadAttention's weights in its order.
        copied = layer.get_weights()[-len(original.weights) :]
        for new, old in zip(copied, original.get_weights(), strict=True):
            np.testing.assert_array_equal(new, old)
    expected_weights = non_attention_weights(backbone)
    weights = non_attention_weights(converted)
    assert weights.keys() == expected_weights.keys()
    for path, value in expected_weights.items():
        np.testing.assert_array_equal(weights[path], value)
    inputs = inputs_for(backbone)
    real = inputs["padding_mask"]
    np.testing.assert_allclose(
        sequence_output(converted(inputs))[real],
        sequence_output(backbone(inputs))[real],
        atol=TOLERANCE,
    )


def test_albert_shared_layer_stays_shared():
    keras.utils.set_random_seed(4)
    backbone = keras_hub.models.AlbertBackbone(**BACKBONES["AlbertBackbone"])
    converted = performerize(backbone, **EXACT)
    # One group: a single encoder, hence a single attention layer, serves
    # both layers.
    assert len(attention_layers(converted)) == 1
    assert len(converted.trainable_weights) == len(backbone.trainable_weights)
