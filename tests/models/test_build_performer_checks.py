"""`build_performer`'s robustness: the language model's loss skips padding
targets, each bad argument is named, and too-long sequences are rejected
with an error naming `max_length` (in Keras and in an exported SavedModel)."""

import keras
import numpy as np
import pytest

from keras_favor.models import language_model_loss
from tests.models.test_build_performer import SIZES
from tests.models.test_build_performer import build as build_small

pytestmark = pytest.mark.backend_independent


def build(**kwargs):
    """The tests' small model of `test_build_performer`, with one block."""
    return build_small(**{"num_layers": 1, **kwargs})


def padded_batch():
    """Token windows of 13 with 9, 5 and 13 real tokens (then padding), as
    the README's `(tokens[:, :-1], tokens[:, 1:])` pairs."""
    rng = np.random.RandomState(0)
    tokens = rng.randint(1, 30, (3, 13)).astype("int32")
    for row, length in enumerate([9, 5, 13]):
        tokens[row, length:] = 0
    return tokens[:, :-1], tokens[:, 1:]


def keras_mask(tensor):
    return getattr(tensor, "_keras_mask", None)


def mean_loss_over_real_targets(logits, targets):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    losses = -np.take_along_axis(log_probabilities, targets[..., None], -1)
    return losses[..., 0][targets != 0].mean()


@pytest.mark.parametrize("api", ["functional", "sequential"])
def test_language_model_loss_is_the_mean_over_real_targets(api):
    model = build(task="language_model", api=api)
    model.compile(loss=language_model_loss())
    inputs, targets = padded_batch()
    # The input mask would keep the last real token's prediction of padding
    # (2 of them here) and differ from the target mask.
    assert ((inputs != 0) != (targets != 0)).sum() == 2
    expected = mean_loss_over_real_targets(
        keras.ops.convert_to_numpy(model(inputs)), targets
    )
    loss = model.evaluate(inputs, targets, batch_size=3, verbose=0)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_language_model_logits_carry_no_input_mask():
    model = build(task="language_model")
    inputs, _ = padded_batch()
    assert keras_mask(model(inputs)) is None
    # The classifier's and encoder's masks are unchanged.
    encoder = build(task="encoder")
    mask = keras_mask(encoder(inputs))
    np.testing.assert_array_equal(mask, inputs != 0)


def test_language_model_loss_is_sparse_crossentropy_ignoring_zero():
    loss = language_model_loss()
    assert isinstance(loss, keras.losses.SparseCategoricalCrossentropy)
    config = loss.get_config()
    assert config["from_logits"] and config["ignore_class"] == 0


def test_language_model_trains_and_saves(tmp_path):
    model = build(task="language_model")
    model.compile("adam", language_model_loss())
    inputs, targets = padded_batch()
    model.fit(inputs, targets, epochs=1, verbose=0)
    path = str(tmp_path / "lm.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(restored(inputs), model(inputs), atol=1e-6)
    assert keras_mask(restored(inputs)) is None


@pytest.mark.parametrize(
    "argument, values",
    [
        ("intermediate_dim", [0, -4, 2.5, "32", True]),
        ("dropout", [1.0, -0.1, "0.1", None, True]),
        ("vocabulary_size", [0, -1, 30.0, None]),
        ("max_length", [0, -12, 12.0, None]),
        ("num_layers", [0, 1.5]),
        ("num_heads", [0, -2, None]),
        ("hidden_dim", [0, 16.0]),
        ("num_classes", [0, -3, 2.0, None]),
        ("num_features", [0, 1.5, None]),
        ("chunk_size", [0, -1]),
        ("recompute_length", [0, 1.5]),
        ("seed", [1.5, "0", True]),
        ("normalize_first", ["yes", 1, None]),
        ("mask_zero", ["no", 0, None]),
        ("name", [3]),
        ("task", ["translation"]),
        ("api", ["subclass"]),
        ("attention", ["sparse"]),
        ("feature_map", ["gaussian"]),
        ("projection", ["uniform"]),
    ],
)
def test_bad_argument_is_named(argument, values):
    for value in values:
        with pytest.raises(ValueError, match=f"`{argument}`"):
            build(**{argument: value})


def test_defaults_are_accepted():
    model = build(intermediate_dim=None, dropout=0.0, seed=None)
    block = model.get_layer("performer_block_0")
    assert block.intermediate_dim == 4 * SIZES["hidden_dim"]
    # An unused num_classes is not checked for the other tasks.
    build(task="language_model", num_classes=None)
    build(normalize_first=np.bool_(False), mask_zero=np.bool_(True))


@pytest.mark.parametrize("api", ["functional", "sequential"])
def test_too_long_input_names_max_length_in_keras(api):
    model = build(task="language_model", api=api)
    too_long = np.ones((2, 13), "int32")
    with pytest.raises(ValueError, match="max_length"):
        model(too_long)
    with pytest.raises(ValueError, match="max_length"):
        model.predict(too_long, verbose=0)


@pytest.mark.tensorflow_only(
    reason="a tf.function of lengths known only at run time"
)
@pytest.mark.parametrize("api", ["functional", "sequential"])
def test_too_long_input_names_max_length_in_a_tf_function(api):
    import tensorflow as tf

    model = build(task="language_model", api=api)
    too_long = np.ones((2, 13), "int32")
    # Compiled for any length, as an exported model is.
    serve = tf.function(
        lambda ids: model(ids),
        input_signature=[tf.TensorSpec((None, None), tf.int32)],
    )
    np.testing.assert_allclose(
        serve(too_long[:, :12]), model(too_long[:, :12]), atol=1e-6
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_length"):
        serve(too_long)


@pytest.mark.tensorflow_only(
    reason="a SavedModel of lengths known only at run time"
)
def test_too_long_input_names_max_length_in_a_saved_model(tmp_path):
    import tensorflow as tf

    model = build(task="classification")
    path = str(tmp_path / "saved_model")
    model.export(path, verbose=False)
    served = tf.saved_model.load(path)
    ids = np.ones((2, 12), "int32")
    np.testing.assert_allclose(
        served.serve(tf.constant(ids)), model(ids), atol=1e-5
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_length"):
        served.serve(tf.constant(np.ones((2, 13), "int32")))
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_length"):
        served.signatures["serving_default"](
            tf.constant(np.ones((1, 40), "int32"))
        )
