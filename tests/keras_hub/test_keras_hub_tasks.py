"""Converted keras-hub tasks stay keras-hub tasks: class, backbone,
preprocessor, compile defaults, fit and the `.keras` round trip."""

import keras
import keras_hub
import numpy as np
import pytest

from keras_favor.convert import performerize
from keras_favor.layers.favor_attention import FavorAttention

SIZES = dict(
    vocabulary_size=50,
    num_layers=2,
    num_heads=2,
    hidden_dim=16,
    intermediate_dim=32,
    max_sequence_length=16,
)
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"]
VOCABULARY = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS


def token_batch(seed=0):
    rng = np.random.RandomState(seed)
    padding = np.ones((4, 8), bool)
    padding[1, 5:] = False
    return {
        "token_ids": rng.randint(1, 50, (4, 8)).astype("int32"),
        "padding_mask": padding,
    }


def gpt2_causal_lm(**overrides):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(**{**SIZES, **overrides})
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def bert_classifier():
    """One layer: tracing `fit` costs in proportion to the weights, and
    every layer is converted alike (test_keras_hub_conversion.py converts
    a two-layer BERT)."""
    keras.utils.set_random_seed(1)
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=VOCABULARY)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=8
    )
    backbone = keras_hub.models.BertBackbone(
        **dict(SIZES, vocabulary_size=len(VOCABULARY), num_layers=1)
    )
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=3, preprocessor=preprocessor
    )


def assert_same_compile_defaults(converted, task):
    assert type(converted.optimizer) is type(task.optimizer)
    assert float(converted.optimizer.learning_rate) == float(
        task.optimizer.learning_rate
    )
    assert type(converted.loss) is type(task.loss)


def test_converted_gpt2_causal_lm_keeps_its_class_backbone_and_defaults():
    task = gpt2_causal_lm()
    converted = performerize(task, seed=0)
    assert isinstance(converted, keras_hub.models.GPT2CausalLM)
    assert isinstance(converted.backbone, keras_hub.models.GPT2Backbone)
    assert type(converted.backbone).__name__ == "FavorGPT2Backbone"
    assert converted.preprocessor is None
    assert all(
        isinstance(layer._self_attention_layer, FavorAttention)
        for layer in converted.backbone.transformer_layers
    )
    assert_same_compile_defaults(converted, task)
    # The converted task's graph runs the converted backbone: with a window
    # as long as the sequence, its logits are the original's.
    exact = performerize(task, local_window=8, seed=0)
    inputs = token_batch()
    np.testing.assert_allclose(
        np.asarray(exact(inputs))[inputs["padding_mask"]],
        np.asarray(task(inputs))[inputs["padding_mask"]],
        atol=1e-5,
    )


@pytest.mark.integration
def test_converted_gpt2_causal_lm_fits_and_round_trips(tmp_path):
    # One layer: tracing `fit` costs in proportion to the weights; the
    # conversion of each layer is the same.
    converted = performerize(gpt2_causal_lm(num_layers=1), seed=0)
    inputs = token_batch()
    labels = np.roll(inputs["token_ids"], -1, axis=1)
    converted.compile()  # keras-hub's defaults
    history = converted.fit(
        inputs,
        labels,
        sample_weight=inputs["padding_mask"],
        epochs=2,
        batch_size=4,
        verbose=0,
    )
    assert np.all(np.isfinite(history.history["loss"]))
    path = tmp_path / "converted.keras"
    converted.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(converted)
    assert type(loaded.backbone) is type(converted.backbone)
    assert loaded.backbone.favor_options == converted.backbone.favor_options
    np.testing.assert_allclose(
        np.asarray(loaded(inputs)), np.asarray(converted(inputs)), atol=1e-6
    )


@pytest.mark.integration
def test_converted_bert_classifier_keeps_class_preprocessor_and_head(tmp_path):
    task = bert_classifier()
    converted = performerize(task, local_window=8, seed=0)
    assert type(converted) is keras_hub.models.BertTextClassifier
    assert converted.preprocessor is task.preprocessor
    assert converted.num_classes == 3
    assert_same_compile_defaults(converted, task)
    sentences = np.array(["the quick brown fox", "lazy dog jumps", "the dog"])
    # Exact attention (window >= length) and the same head weights: the
    # same predictions from raw strings through the preprocessor.
    np.testing.assert_allclose(
        converted.predict(sentences, verbose=0),
        task.predict(sentences, verbose=0),
        atol=1e-5,
    )
    converted.fit(sentences, np.array([0, 1, 2]), epochs=1, verbose=0)
    path = tmp_path / "classifier.keras"
    converted.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is keras_hub.models.BertTextClassifier
    np.testing.assert_allclose(
        loaded.predict(sentences, verbose=0),
        converted.predict(sentences, verbose=0),
        atol=1e-6,
    )
