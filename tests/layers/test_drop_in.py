"""FavorAttention as a drop-in for MultiHeadAttention where linear attention
allows: MultiHeadAttention's weights and configs, inputs of rank above 3,
causal attention over lengths that differ, LoRA and int8 quantization."""

import keras
import numpy as np
import pytest

import keras_favor
from keras_favor.layers.multi_head_layout import causal_keys
from tests import reference
from tests.layer_test_case import run_layer_test

WEIGHT_DTYPES = {"projection": "float32", "redraw_count": "int32"}


def data(rng, *shape, scale=1.0):
    return (scale * rng.normal(size=shape)).astype("float32")


def exact_layer(x, value=None, **kwargs):
    exact = keras.layers.MultiHeadAttention(**kwargs)
    exact(x, x if value is None else value)
    return exact


# --- MultiHeadAttention's weights and configs -------------------------------


CONFIGS = [
    {},
    # Keras 3.15's MultiHeadAttention itself fails on JAX with a value_dim
    # other than key_dim (a reshape to key_dim in its attention).
    pytest.param(
        {"value_dim": 6, "output_shape": 10}, marks=pytest.mark.tensorflow_only
    ),
    {"use_bias": False},
    {"output_shape": (3, 4)},
]


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("copy", ["set_weights", "load"])
def test_multi_head_attention_weights_copy_over_exactly(rng, kwargs, copy):
    query, value = data(rng, 2, 6, 16), data(rng, 2, 9, 12)
    exact = exact_layer(query, value, num_heads=3, key_dim=8, **kwargs)
    favor = keras_favor.FavorAttention(
        num_heads=3, key_dim=8, num_features=16, **kwargs
    )
    favor(query, value)
    projection = np.asarray(favor.projection)
    if copy == "set_weights":
        favor.set_weights(exact.get_weights())
    else:
        favor.load_multi_head_attention_weights(exact)
    # MultiHeadAttention's weights come after the layer's own two.
    for mine, theirs in zip(favor.get_weights()[2:], exact.get_weights()):
        np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(favor.projection, projection)
    # The output is linear attention on MultiHeadAttention's own heads.
    heads = [
        np.transpose(np.asarray(dense(x), np.float64), (0, 2, 1, 3))
        for dense, x in (
            (exact.query_dense, query),
            (exact.key_dense, value),
            (exact.value_dense, value),
        )
    ]
    attended = reference.quadratic_feature_attention(favor, *heads)
    merged = np.transpose(attended, (0, 2, 1, 3)).astype("float32")
    np.testing.assert_allclose(
        favor(query, value), exact.output_dense(merged), rtol=1e-4, atol=1e-5
    )


def test_full_weight_lists_still_set_every_weight(rng):
    x = data(rng, 2, 5, 8)
    a, b = (keras_favor.FavorAttention(2, 4, seed=s) for s in (1, 2))
    a(x, x), b(x, x)
    b.set_weights(a.get_weights())
    np.testing.assert_array_equal(b.projection, a.projection)
    np.testing.assert_array_equal(b(x, x), a(x, x))


def test_copied_weights_estimate_softmax_better_with_more_features(rng):
    x = data(rng, 2, 32, 32, scale=0.5)
    exact = exact_layer(x, num_heads=2, key_dim=16)
    expected = np.asarray(exact(x, x))
    errors = {}
    for num_features in (16, 1024):
        favor = keras_favor.FavorAttention(
            2, 16, num_features=num_features, projection="iid"
        )
        favor(x, x)
        favor.set_weights(exact.get_weights())
        squared = []
        for seed in range(6):
            favor.redraw_features(seed)
            squared.append(np.mean((np.asarray(favor(x, x)) - expected) ** 2))
        errors[num_features] = np.mean(squared)
    # The MSE falls like 1 / num_features: a 64x ratio, allowing for noise.
    assert errors[1024] < errors[16] / 16, errors


@pytest.mark.parametrize(
    "kwargs", [{"num_heads": 2}, {"key_dim": 4}, {"use_bias": False}]
)
def test_weights_of_another_configuration_raise(rng, kwargs):
    x = data(rng, 2, 5, 16)
    config = {"num_heads": 3, "key_dim": 8, **kwargs}
    exact = exact_layer(x, **config)
    favor = keras_favor.FavorAttention(3, 8)
    favor(x, x)
    with pytest.raises(ValueError, match="Configure both layers alike"):
        favor.set_weights(exact.get_weights())
    with pytest.raises(ValueError, match="Configure both layers alike"):
        favor.load_multi_head_attention_weights(exact)


def test_load_needs_built_layers(rng):
    exact = keras.layers.MultiHeadAttention(2, 4)
    favor = keras_favor.FavorAttention(2, 4)
    with pytest.raises(ValueError, match="built"):
        favor.load_multi_head_attention_weights(exact)
    with pytest.raises(ValueError, match="`mha` must be a keras.layers"):
        favor.load_multi_head_attention_weights("mha")


def test_a_multi_head_attention_config_builds_a_favor_attention(rng):
    x = data(rng, 2, 5, 16)
    exact = exact_layer(x, num_heads=2, key_dim=8, output_shape=12, seed=3)
    favor = keras_favor.FavorAttention.from_config(exact.get_config())
    assert favor(x, x).shape == (2, 5, 12)
    favor.set_weights(exact.get_weights())


# --- inputs of rank above 3 -------------------------------------------------


def flat(x):
    return x.reshape((x.shape[0], -1) + x.shape[-1:])


def test_multi_head_attention_attends_over_all_middle_axes_jointly(rng):
    # What FavorAttention matches: MultiHeadAttention on (B, H, W, C) is
    # MultiHeadAttention on (B, H * W, C).
    x = data(rng, 2, 3, 4, 8)
    image = exact_layer(x, num_heads=2, key_dim=4)
    sequence = exact_layer(flat(x), num_heads=2, key_dim=4)
    sequence.set_weights(image.get_weights())
    np.testing.assert_allclose(
        flat(np.asarray(image(x, x))),
        sequence(flat(x), flat(x)),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_rank_four_equals_the_flattened_sequence(rng, causal, masked):
    query, value = data(rng, 2, 3, 4, 8), data(rng, 2, 3, 4, 6)
    image = keras_favor.FavorAttention(2, 4, num_features=16, chunk_size=4)
    sequence = keras_favor.FavorAttention(2, 4, num_features=16, chunk_size=4)
    kwargs, flat_kwargs = {}, {}
    if masked:
        mask = rng.uniform(size=(2, 3, 4)) < 0.7
        kwargs = {"value_mask": mask}
        flat_kwargs = {"value_mask": mask.reshape(2, 12)}
    outputs = image(query, value, use_causal_mask=causal, **kwargs)
    assert outputs.shape == (2, 3, 4, 8)
    assert image.compute_output_shape(query.shape, value.shape) == (2, 3, 4, 8)
    sequence(flat(query), flat(value))
    assert [w.shape for w in sequence.weights] == [
        w.shape for w in image.weights
    ]
    sequence.set_weights(image.get_weights())
    np.testing.assert_allclose(
        flat(np.asarray(outputs)),
        sequence(
            flat(query), flat(value), use_causal_mask=causal, **flat_kwargs
        ),
        rtol=1e-5,
        atol=1e-6,
    )


def test_rank_four_uses_multi_head_attention_equations(rng):
    x = data(rng, 2, 3, 4, 8)
    exact = exact_layer(x, num_heads=2, key_dim=4, output_shape=(2, 5))
    favor = keras_favor.FavorAttention(2, 4, output_shape=(2, 5))
    assert favor(x, x).shape == (2, 3, 4, 2, 5)
    for name in ("query_dense", "key_dense", "value_dense", "output_dense"):
        assert getattr(favor, name).equation == getattr(exact, name).equation
    favor.set_weights(exact.get_weights())


def test_rank_four_masks_of_the_wrong_shape_raise(rng):
    x = data(rng, 2, 3, 4, 8)
    layer = keras_favor.FavorAttention(2, 4)
    with pytest.raises(ValueError, match=r"`key_mask`.*\(2, 3, 4\)"):
        layer(x, x, key_mask=np.ones((2, 12), bool))
    layer(x, x, attention_mask=np.ones((2, 1, 1, 3, 4), bool))


# The harness's compiled fits of rank-4 inputs take minutes of XLA
# compilation on JAX; rank 4 on JAX is checked by
# test_rank_four_in_a_functional_model_of_unknown_sizes.
@pytest.mark.tensorflow_only
def test_rank_four_layer_test(rng, tmp_path):
    run_layer_test(
        keras_favor.FavorAttention,
        dict(num_heads=2, key_dim=4, num_features=8, chunk_size=4),
        {"query": data(rng, 2, 3, 4, 8), "value": data(rng, 2, 2, 5, 6)},
        (2, 3, 4, 8),
        tmp_path,
        call_kwargs={"use_causal_mask": True},
        variable_dtype_exemptions=WEIGHT_DTYPES,
    )


def test_rank_four_in_a_functional_model_of_unknown_sizes(rng):
    x = data(rng, 2, 3, 4, 8)
    inputs = keras.Input((None, None, 8))
    layer = keras_favor.FavorAttention(2, 4, num_features=8)
    model = keras.Model(inputs, layer(inputs, inputs, use_causal_mask=True))
    np.testing.assert_allclose(
        model.predict(x, verbose=0),
        layer(x, x, use_causal_mask=True),
        rtol=1e-5,
        atol=1e-6,
    )


# --- causal attention over lengths that differ ------------------------------


def causal_reference(layer, query, value, mask=None):
    """MultiHeadAttention's lower-triangular (T, S) mask, query i seeing
    keys j <= i, through the quadratic form with the layer's features."""
    q, k, v = reference.heads(layer, query, value)
    attended = reference.quadratic_feature_attention(
        layer, q, k, v, mask=mask, causal=True
    )
    merged = np.transpose(attended, (0, 2, 1, 3)).astype("float32")
    return np.asarray(layer.output_dense(merged))


def test_multi_head_attention_causal_mask_is_lower_triangular():
    exact = keras.layers.MultiHeadAttention(1, 4)
    for t, s in ((3, 5), (5, 3)):
        mask = exact._compute_causal_mask(
            np.zeros((1, t, 4)), np.zeros((1, s, 4))
        )
        np.testing.assert_array_equal(mask[0], np.tril(np.ones((t, s), bool)))


@pytest.mark.parametrize("lengths", [(3, 7), (7, 3), (5, 5)])
@pytest.mark.parametrize("masked", [False, True])
def test_causal_attention_over_lengths_that_differ(rng, lengths, masked):
    t, s = lengths
    layer = keras_favor.FavorAttention(2, 4, num_features=16, chunk_size=2)
    query, value = data(rng, 2, t, 8), data(rng, 2, s, 8)
    mask = (rng.uniform(size=(2, s)) < 0.7) if masked else None
    actual = layer(query, value, value_mask=mask, use_causal_mask=True)
    expected = causal_reference(layer, query, value, mask)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("lengths", [(3, 7), (7, 3), (5, 5)])
def test_keys_align_to_the_query_length_also_when_lengths_are_unknown(
    rng, lengths
):
    import tensorflow as tf

    # The layer-level check above has static lengths; tracing the causal
    # kernel for unknown lengths is slow, so the alignment is checked alone.
    t, s = lengths
    key, value = data(rng, 2, s, 2, 4), data(rng, 2, s, 2, 3)
    mask = rng.uniform(size=(2, s)) < 0.7
    static = causal_keys(t, key, value, tf.constant(mask))
    spec = tf.TensorSpec((None, None, 2, None))

    @tf.function(
        input_signature=[
            tf.TensorSpec((None, None, 8)),
            spec,
            spec,
            tf.TensorSpec((None, None), tf.bool),
        ],
        autograph=False,
    )
    def align(query, key, value, mask):
        return causal_keys(tf.shape(query)[1], key, value, mask)

    dynamic = align(data(rng, 2, t, 8), key, value, mask)
    for a, b in zip(static, dynamic):
        assert a.shape[1] == t
        np.testing.assert_array_equal(a, b)
    keep = min(t, s)
    np.testing.assert_array_equal(static[0][:, :keep], key[:, :keep])
    np.testing.assert_array_equal(static[2][:, :keep], mask[:, :keep])
    assert not np.any(np.asarray(static[2])[:, keep:])


# --- LoRA -------------------------------------------------------------------


def test_enable_lora_trains_only_the_low_rank_factors(rng):
    x, y = data(rng, 8, 5, 8), data(rng, 8, 5, 8)
    inputs = keras.Input((5, 8))
    layer = keras_favor.FavorAttention(2, 4, num_features=8, name="attention")
    model = keras.Model(inputs, layer(inputs, inputs))
    before = model.predict(x, verbose=0)
    frozen = {w.path: np.asarray(w) for w in layer.weights}
    layer.enable_lora(2)
    assert layer.lora_rank == 2
    trainable = sorted(w.path for w in model.trainable_weights)
    assert trainable == sorted(
        f"attention/{dense}/lora_kernel_{ab}"
        for dense in ("query", "key", "value", "attention_output")
        for ab in "ab"
    )
    # The low-rank update starts at zero.
    np.testing.assert_allclose(model.predict(x, verbose=0), before, atol=1e-6)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    for name in ("query_dense", "key_dense", "value_dense", "output_dense"):
        assert np.any(np.asarray(getattr(layer, name).lora_kernel_b)), name
    for weight in layer.weights:
        if "lora" not in weight.path:
            np.testing.assert_array_equal(
                weight, frozen[weight.path], err_msg=weight.path
            )
    assert not np.allclose(model.predict(x, verbose=0), before)


def test_lora_survives_a_keras_round_trip(rng, tmp_path):
    x, y = data(rng, 4, 5, 8), data(rng, 4, 5, 8)
    inputs = keras.Input((5, 8))
    layer = keras_favor.FavorAttention(2, 4, num_features=8, name="attention")
    model = keras.Model(inputs, layer(inputs, inputs))
    layer.enable_lora(2, lora_alpha=4)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    model.save(tmp_path / "lora.keras")
    restored = keras.saving.load_model(tmp_path / "lora.keras")
    np.testing.assert_allclose(
        restored.predict(x, verbose=0),
        model.predict(x, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )
    loaded = restored.get_layer("attention")
    assert (loaded.lora_rank, loaded.lora_alpha) == (2, 4)
    assert all("lora" in w.path for w in restored.trainable_weights)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_lora_rank_in_the_config_builds_lora_layers(rng, policy):
    # Not `run_layer_test`: saving merges the low-rank update into the
    # kernels (Keras's LoRA), so the saved weights differ by design.
    x, y = data(rng, 4, 6, 8), data(rng, 4, 6, 8)
    layer = keras_favor.FavorAttention(2, 4, lora_rank=2, dtype=policy)
    config = layer.get_config()
    assert (config["lora_rank"], config["lora_alpha"]) == (2, None)
    inputs = keras.Input((6, 8))
    model = keras.Model(inputs, layer(inputs, inputs))
    assert len(model.trainable_weights) == 8
    assert {w.dtype for w in model.trainable_weights} == {"float32"}
    before = {w.path: np.asarray(w) for w in model.trainable_weights}
    model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=True)
    history = model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    for w in model.trainable_weights:
        assert not np.array_equal(w, before[w.path]), w.path
    restored = keras_favor.FavorAttention.from_config(config)
    restored(x, x)
    assert restored.query_dense.lora_enabled


def test_enable_lora_before_build_or_with_a_bad_rank_raises(rng):
    layer = keras_favor.FavorAttention(2, 4)
    with pytest.raises(ValueError, match="built"):
        layer.enable_lora(2)
    layer(data(rng, 2, 5, 8), data(rng, 2, 5, 8))
    with pytest.raises(ValueError, match="`rank` must be a positive"):
        layer.enable_lora(0)
    with pytest.raises(ValueError, match="`lora_alpha` must be"):
        layer.enable_lora(2, lora_alpha=0)


# --- int8 quantization ------------------------------------------------------


def quantized_model(rng, how, x):
    inputs = keras.Input(x.shape[1:])
    layer = keras_favor.FavorAttention(2, 8, num_features=16, name="attention")
    model = keras.Model(inputs, layer(inputs, inputs, use_causal_mask=True))
    # An eager call: `predict` would keep its traced function, which
    # `layer.quantize` (unlike `model.quantize`) does not reset.
    before = np.asarray(model(x))
    if how == "layer":
        layer.quantize("int8")
    else:
        model.quantize("int8")
    return model, layer, before


@pytest.mark.parametrize("how", ["layer", "model"])
def test_int8_quantization_serves_and_round_trips(rng, tmp_path, how):
    x = data(rng, 2, 6, 16)
    model, layer, before = quantized_model(rng, how, x)
    for dense in (layer.query_dense, layer.output_dense):
        assert dense.quantization_mode == "int8"
        assert dense.kernel.dtype == "int8"
    after = model.predict(x, verbose=0)
    assert not np.array_equal(after, before)
    error = np.linalg.norm(after - before) / np.linalg.norm(before)
    assert error < 0.05, error
    model.save(tmp_path / "int8.keras")
    restored = keras.saving.load_model(tmp_path / "int8.keras")
    loaded = restored.get_layer("attention")
    assert loaded.query_dense.quantization_mode == "int8"
    np.testing.assert_array_equal(restored.predict(x, verbose=0), after)
    # A loaded layer saves its quantized sub-layers again.
    restored.save(tmp_path / "again.keras")
    again = keras.saving.load_model(tmp_path / "again.keras")
    np.testing.assert_array_equal(again.predict(x, verbose=0), after)


def test_int8_quantization_inside_sequential_round_trips(rng, tmp_path):
    x = data(rng, 2, 6, 16)
    model = keras.Sequential(
        [keras.Input((6, 16)), keras_favor.FavorAttention(2, 8, name="a")]
    )
    model.quantize("int8")
    expected = model.predict(x, verbose=0)
    model.save(tmp_path / "int8.keras")
    restored = keras.saving.load_model(tmp_path / "int8.keras")
    assert restored.get_layer("a").value_dense.quantization_mode == "int8"
    np.testing.assert_array_equal(restored.predict(x, verbose=0), expected)


def test_quantizing_twice_raises(rng):
    x = data(rng, 2, 6, 16)
    layer = keras_favor.FavorAttention(2, 8)
    layer(x, x)
    layer.quantize("int8")
    with pytest.raises(ValueError, match="already quantized"):
        layer.quantize("int8")
