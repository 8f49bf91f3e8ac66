"""FavorAttention's state on every backend: redraws, dropout, mixed
precision, and SavedModel export (which needs TensorFlow for lengths known
only at run time)."""

import os

import keras
import numpy as np
import pytest

import keras_favor

pytestmark = pytest.mark.backend_independent

BATCH, LENGTH, DIM = 2, 20, 8


@pytest.fixture
def inputs():
    rng = np.random.default_rng(0)
    query = rng.normal(size=(BATCH, LENGTH, DIM)).astype("float32")
    value = rng.normal(size=(BATCH, LENGTH, DIM)).astype("float32")
    mask = np.ones((BATCH, LENGTH), bool)
    mask[1, 13:] = False
    return query, value, mask


def make_layer(seed=7, **kwargs):
    return keras_favor.FavorAttention(
        num_heads=2, key_dim=4, num_features=12, seed=seed, **kwargs
    )


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def test_seeded_redraws_repeat_and_unseeded_ones_differ(inputs):
    query, value, mask = inputs
    layer, twin = make_layer(), make_layer()
    for each in (layer, twin):
        each(query, value, attention_mask=mask)
    before = numpy(layer.projection)
    layer.redraw_features()
    twin.redraw_features()
    assert not np.array_equal(numpy(layer.projection), before)
    np.testing.assert_array_equal(
        numpy(layer.projection), numpy(twin.projection)
    )
    assert int(numpy(layer.redraw_count)) == 1
    unseeded = make_layer(seed=None)
    unseeded(query, value, attention_mask=mask)
    first = numpy(unseeded.redraw_features())
    assert not np.array_equal(first, numpy(unseeded.redraw_features()))


def test_dropout_acts_in_training_only(inputs):
    query, value, mask = inputs
    layer = make_layer(dropout=0.5)
    inference = numpy(layer(query, value, attention_mask=mask))
    np.testing.assert_array_equal(
        numpy(layer(query, value, attention_mask=mask, training=False)),
        inference,
    )
    for causal in (False, True):
        training = numpy(
            layer(
                query,
                value,
                attention_mask=mask,
                training=True,
                use_causal_mask=causal,
            )
        )
        assert np.isfinite(training).all(), causal
        if not causal:
            assert not np.allclose(training, inference)
    grouped = make_layer(dropout=0.5, recompute_length=8)
    out = grouped(
        query, value, attention_mask=mask, training=True, use_causal_mask=True
    )
    assert np.isfinite(numpy(out)).all()


def test_mixed_precision_is_close_to_float32(inputs):
    query, value, mask = inputs
    full = make_layer()
    expected = numpy(
        full(query, value, attention_mask=mask, use_causal_mask=True)
    )
    keras.config.set_dtype_policy("mixed_float16")
    mixed = make_layer()
    mixed(query, value, attention_mask=mask)
    mixed.set_weights(full.get_weights())
    out = mixed(query, value, attention_mask=mask, use_causal_mask=True)
    assert keras.backend.standardize_dtype(out.dtype) == "float16"
    # float16 inputs and dense layers: about 1e-3 of the output's scale.
    error = np.abs(numpy(out).astype("float32") - expected).max()
    assert error < 1e-2 * np.abs(expected).max()


def test_export_of_unknown_lengths_needs_tensorflow(tmp_path, inputs):
    query = inputs[0]
    fixed = keras.Input((LENGTH, DIM))
    model = keras.Model(fixed, make_layer()(fixed, fixed, use_causal_mask=True))
    # A fixed length exports on every backend (through jax2tf on JAX).
    model.export(str(tmp_path / "fixed"))
    import tensorflow as tf

    served = tf.saved_model.load(str(tmp_path / "fixed"))
    np.testing.assert_allclose(
        served.serve(tf.constant(query)).numpy(), numpy(model(query)), atol=1e-5
    )
    unknown = keras.Input((None, DIM))
    models = {
        "favor_attention": keras.Model(unknown, make_layer()(unknown, unknown)),
        "build_performer": keras_favor.build_performer(
            vocabulary_size=20,
            max_length=12,
            num_layers=1,
            num_heads=2,
            hidden_dim=16,
            num_features=8,
            seed=3,
        ),
    }
    for name, model in models.items():
        path = os.path.join(tmp_path, name)
        if keras.backend.backend() == "tensorflow":
            model.export(path)
            continue
        with pytest.raises(RuntimeError) as error:
            model.export(path)
        message = str(error.value)
        assert "needs the TensorFlow backend" in message, name
        assert f"'{keras.backend.backend()}' backend" in message, name
