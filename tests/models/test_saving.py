"""Serving (SavedModel) of `build_performer` models."""

import numpy as np
import pytest
import tensorflow as tf

import keras_favor

MAX_LENGTH = 16
CASES = [
    (task, api)
    for task in ("classification", "language_model")
    for api in ("functional", "sequential")
]


@pytest.fixture(scope="module", params=CASES, ids="-".join)
def model_and_tokens(request):
    """A tiny model whose weights are all moved away from their initial
    values, with redrawn projections, and padded token ids."""
    task, api = request.param
    model = keras_favor.build_performer(
        vocabulary_size=40,
        max_length=MAX_LENGTH,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        task=task,
        num_classes=3,
        num_features=16,
        seed=2,
        api=api,
    )
    rng = np.random.RandomState(0)
    for weight in model.trainable_weights:
        weight.assign(weight + 0.1 * rng.normal(size=weight.shape))
    for layer in model.layers:
        if isinstance(layer, keras_favor.PerformerBlock):
            layer.attention_layer.redraw_features(seed=7)
    tokens = rng.randint(1, 40, (8, MAX_LENGTH)).astype("int32")
    tokens[:, 12:] = 0
    return model, tokens


def test_saved_model_serves_any_batch_and_length(model_and_tokens, tmp_path):
    model, tokens = model_and_tokens
    path = str(tmp_path / "saved_model")
    model.export(path, verbose=False)
    reloaded = tf.saved_model.load(path)
    signature = reloaded.signatures["serving_default"]
    (input_spec,) = signature.structured_input_signature[1].values()
    assert input_spec.shape.as_list() == [None, None]
    assert input_spec.dtype == tf.int32
    for batch, length in [(8, MAX_LENGTH), (1, 3), (5, 11)]:
        inputs = tokens[:batch, :length]
        np.testing.assert_allclose(
            reloaded.serve(tf.constant(inputs)).numpy(),
            model(inputs),
            atol=1e-5,
        )
