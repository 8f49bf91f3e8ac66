"""FavorAttention as a Keras layer: the MultiHeadAttention contract, masks,
errors, projection state, dropout, precision, saving and training."""

import keras
import numpy as np
import pytest

import keras_favor
from tests.layer_test_case import run_layer_test


def self_attention_data(rng, length=8):
    x = rng.normal(size=(2, length, 16)).astype("float32")
    return {"query": x, "value": x}


def cross_attention_data(rng):
    return {
        "query": rng.normal(size=(2, 8, 16)).astype("float32"),
        "value": rng.normal(size=(2, 6, 12)).astype("float32"),
    }


# The documented exemptions from the dtype policy: the projection is float32
# under every policy, the redraw count int32.
PROJECTION_WEIGHT_DTYPES = {"projection": "float32", "redraw_count": "int32"}

RICH_CONFIG = dict(
    num_heads=3,
    key_dim=8,
    value_dim=4,
    use_bias=False,
    output_shape=(4, 3),
    kernel_initializer="he_normal",
    kernel_regularizer="l2",
    feature_map="softmax_hyperbolic",
    num_features=16,
    projection=keras_favor.projections.OrthogonalProjection("sqrt_d"),
    seed=9,
    chunk_size=4,
    name="favor",
)

LAYER_TEST_CASES = {
    "softmax-bidirectional-cross": (
        dict(num_heads=2, key_dim=8, num_features=16),
        cross_attention_data,
        False,
        (2, 8, 16),
        PROJECTION_WEIGHT_DTYPES,
    ),
    "softmax-causal-chunked": (
        dict(num_heads=2, key_dim=8, num_features=16, chunk_size=4),
        self_attention_data,
        True,
        (2, 8, 16),
        PROJECTION_WEIGHT_DTYPES,
    ),
    "hyperbolic-bidirectional-options": (
        RICH_CONFIG,
        self_attention_data,
        False,
        (2, 8, 4, 3),
        PROJECTION_WEIGHT_DTYPES,
    ),
    "elu-causal": (
        dict(num_heads=2, key_dim=8, feature_map="elu"),
        self_attention_data,
        True,
        (2, 8, 16),
        {"redraw_count": "int32"},
    ),
    "local-window-causal": (
        dict(num_heads=2, key_dim=8, num_features=16, local_window=3),
        self_attention_data,
        True,
        (2, 8, 16),
        PROJECTION_WEIGHT_DTYPES,
    ),
    "local-window-bidirectional": (
        dict(num_heads=2, key_dim=8, num_features=16, local_window=3),
        self_attention_data,
        False,
        (2, 8, 16),
        PROJECTION_WEIGHT_DTYPES,
    ),
}


@pytest.mark.parametrize(
    "init_kwargs, data, causal, expected_shape, dtype_exemptions",
    LAYER_TEST_CASES.values(),
    ids=LAYER_TEST_CASES.keys(),
)
def test_layer_test(
    rng, tmp_path, init_kwargs, data, causal, expected_shape, dtype_exemptions
):
    run_layer_test(
        keras_favor.FavorAttention,
        init_kwargs,
        data(rng),
        expected_shape,
        tmp_path,
        call_kwargs={"use_causal_mask": causal},
        variable_dtype_exemptions=dtype_exemptions,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        # Keras 3.15's MultiHeadAttention itself fails on JAX with a
        # value_dim other than key_dim.
        pytest.param(
            {"value_dim": 6, "output_shape": 10},
            marks=pytest.mark.tensorflow_only,
        ),
        {"use_bias": False},
    ],
)
def test_weights_have_multi_head_attention_shapes_and_copy_over(rng, kwargs):
    query = rng.normal(size=(2, 6, 16)).astype("float32")
    value = rng.normal(size=(2, 9, 12)).astype("float32")
    exact = keras.layers.MultiHeadAttention(num_heads=3, key_dim=8, **kwargs)
    exact(query, value)
    favor = keras_favor.FavorAttention(num_heads=3, key_dim=8, **kwargs)
    favor(query, value)
    for name in ("query_dense", "key_dense", "value_dense", "output_dense"):
        exact_weights = getattr(exact, name).get_weights()
        assert [w.shape for w in getattr(favor, name).get_weights()] == [
            w.shape for w in exact_weights
        ]
        getattr(favor, name).set_weights(exact_weights)
        np.testing.assert_array_equal(
            getattr(favor, name).kernel, getattr(exact, name).kernel
        )


def test_projection_is_a_saved_non_trainable_float32_weight():
    layer = keras_favor.FavorAttention(2, 8, num_features=24, seed=3)
    layer.build((None, 5, 16), (None, 5, 16))
    assert layer.projection.shape == (24, 8)
    assert layer.projection.dtype == "float32"
    assert not layer.projection.trainable
    assert any(w is layer.projection for w in layer.non_trainable_weights)
    assert all(w is not layer.projection for w in layer.trainable_weights)


def test_seed_fixes_the_initial_projection_and_redraws():
    def built(seed):
        layer = keras_favor.FavorAttention(2, 8, num_features=16, seed=seed)
        layer.build((None, 4, 8), (None, 4, 8))
        return layer

    a, b, c = built(5), built(5), built(6)
    np.testing.assert_array_equal(a.projection, b.projection)
    assert not np.allclose(a.projection, c.projection)
    before = np.asarray(a.projection)
    a.redraw_features()
    b.redraw_features()
    np.testing.assert_array_equal(a.projection, b.projection)
    assert not np.allclose(a.projection, before)
    assert int(a.redraw_count) == 1


def test_redraw_with_explicit_seed_is_reproducible_and_changes_output(rng):
    layer = keras_favor.FavorAttention(2, 8, num_features=16)
    x = rng.normal(size=(2, 6, 16)).astype("float32")
    first = np.asarray(layer(x, x))
    layer.redraw_features(seed=42)
    drawn = np.asarray(layer.projection)
    assert not np.allclose(layer(x, x), first)
    layer.redraw_features(seed=7)
    layer.redraw_features(seed=42)
    np.testing.assert_array_equal(layer.projection, drawn)
    assert int(layer.redraw_count) == 3


def test_projection_is_fixed_at_inference(rng):
    layer = keras_favor.FavorAttention(2, 8, num_features=16)
    x = rng.normal(size=(2, 6, 16)).astype("float32")
    np.testing.assert_array_equal(layer(x, x), layer(x, x))
    np.testing.assert_array_equal(
        layer(x, x, training=True), layer(x, x, training=False)
    )


def test_elu_layer_has_no_projection():
    layer = keras_favor.FavorAttention(2, 8, feature_map="elu")
    layer.build((None, 4, 8), (None, 4, 8))
    assert layer.projection is None
    assert layer.redraw_features() is None


def test_redraw_before_build_is_an_error():
    with pytest.raises(ValueError, match="built"):
        keras_favor.FavorAttention(2, 8).redraw_features()


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"num_heads": 0, "key_dim": 8}, "num_heads"),
        ({"num_heads": 2, "key_dim": 2.5}, "key_dim"),
        ({"num_heads": 2, "key_dim": 8, "value_dim": -1}, "value_dim"),
        ({"num_heads": 2, "key_dim": 8, "dropout": 1.0}, "dropout"),
        ({"num_heads": 2, "key_dim": 8, "num_features": 0}, "num_features"),
        ({"num_heads": 2, "key_dim": 8, "chunk_size": 0}, "chunk_size"),
        ({"num_heads": 2, "key_dim": 8, "seed": "a"}, "seed"),
        ({"num_heads": 2, "key_dim": 8, "output_shape": "x"}, "output_shape"),
        ({"num_heads": 2, "key_dim": 8, "feature_map": "rbf"}, "feature_map"),
        ({"num_heads": 2, "key_dim": 8, "projection": "sobol"}, "projection"),
    ],
)
def test_bad_arguments_are_named(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        keras_favor.FavorAttention(**kwargs)


def test_general_attention_mask_is_rejected(rng):
    layer = keras_favor.FavorAttention(2, 8)
    x = rng.normal(size=(2, 5, 16)).astype("float32")
    with pytest.raises(ValueError, match="key padding.*use_causal_mask"):
        layer(x, x, attention_mask=np.ones((2, 5, 5), bool))


def test_inputs_must_have_rank_three_or_more(rng):
    # Rank above 3 attends over all middle axes (tests/layers/test_drop_in.py);
    # causal attention over lengths that differ is tested there too.
    with pytest.raises(ValueError, match="rank 3 or more"):
        keras_favor.FavorAttention(2, 8)(
            rng.normal(size=(4, 8)).astype("float32"),
            rng.normal(size=(4, 8)).astype("float32"),
        )


def test_mask_forms_agree(rng):
    layer = keras_favor.FavorAttention(2, 8, num_features=16)
    query = rng.normal(size=(2, 5, 16)).astype("float32")
    value = rng.normal(size=(2, 7, 16)).astype("float32")
    mask = np.arange(7)[None, :] < np.array([[7], [4]])
    expected = layer(query, value[:, :4])[1]
    for kwargs in (
        {"value_mask": mask},
        {"key_mask": mask},
        {"attention_mask": mask},
        {"attention_mask": mask[:, None, :]},
    ):
        np.testing.assert_allclose(
            layer(query, value, **kwargs)[1], expected, rtol=1e-5, atol=1e-6
        )


def test_keras_mask_from_embedding_masks_keys_and_reaches_the_output():
    tokens = np.array([[5, 3, 8, 0, 0], [2, 9, 4, 7, 1]])
    embedding = keras.layers.Embedding(10, 16, mask_zero=True)
    layer = keras_favor.FavorAttention(2, 8, num_features=16)
    x = embedding(tokens)
    y = layer(x, x)
    np.testing.assert_array_equal(y._keras_mask, tokens != 0)
    # The padded keys are ignored: the first row equals attention over its
    # three real tokens.
    unpadded = embedding(tokens[:1, :3])
    np.testing.assert_allclose(
        y[0, :3], layer(unpadded, unpadded)[0], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_is_active_in_training_and_off_at_inference(rng, causal):
    layer = keras_favor.FavorAttention(2, 8, num_features=16, dropout=0.5)
    x = rng.normal(size=(2, 6, 16)).astype("float32")
    inference = layer(x, x, use_causal_mask=causal)
    no_dropout = keras_favor.FavorAttention(2, 8, num_features=16)
    no_dropout(x, x)
    no_dropout.set_weights(layer.get_weights())
    np.testing.assert_allclose(
        inference, no_dropout(x, x, use_causal_mask=causal), rtol=1e-6
    )
    trained = layer(x, x, use_causal_mask=causal, training=True)
    assert not np.allclose(trained, inference)
    assert np.all(np.isfinite(trained))


def test_config_round_trip_of_dropout_an_int_output_shape_and_objects():
    # Arguments the layer test cannot take: it trains without dropout, and
    # `get_config` normalizes an int `output_shape` to a tuple.
    layer = keras_favor.FavorAttention(
        **{**RICH_CONFIG, "dropout": 0.1, "output_shape": 12}
    )
    config = layer.get_config()
    restored = keras_favor.FavorAttention.from_config(config)
    assert restored.get_config() == config
    assert restored.dropout == 0.1
    assert restored.output_shape_ == (12,)
    assert restored.projection_distribution.norm == "sqrt_d"
    assert isinstance(
        restored.feature_map, keras_favor.feature_maps.SoftmaxHyperbolicFeatures
    )


def test_sequential_and_functional_models_agree(rng):
    tokens = rng.integers(1, 50, size=(4, 10))
    # Padding: the functional model masks keys through `value`'s mask, the
    # Sequential one through the query's, as value defaults to query.
    tokens[:2, 6:] = 0
    sequential = keras.Sequential(
        [
            keras.Input((10,), dtype="int32"),
            keras.layers.Embedding(50, 16, mask_zero=True),
            keras_favor.FavorAttention(2, 8, num_features=16),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(3),
        ]
    )
    inputs = keras.Input((10,), dtype="int32")
    x = keras.layers.Embedding(50, 16, mask_zero=True)(inputs)
    x = keras_favor.FavorAttention(2, 8, num_features=16)(x, x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    functional = keras.Model(inputs, keras.layers.Dense(3)(x))
    functional.set_weights(sequential.get_weights())
    np.testing.assert_allclose(
        sequential(tokens), functional(tokens), rtol=1e-5, atol=1e-6
    )


def first_token_task(length=12, vocabulary=8, samples=256, seed=0):
    """Predict, at each position, the sequence's first token: only attention
    to position 0 solves it, causal or not."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocabulary, size=(samples, length))
    return tokens, np.repeat(tokens[:, :1], length, axis=1)


@pytest.mark.integration
@pytest.mark.parametrize("causal", [False, True])
def test_fit_lowers_the_loss(causal):
    tokens, targets = first_token_task()
    inputs = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(8, 32)(inputs)
    positions = keras.layers.Embedding(12, 32)(keras.ops.arange(12)[None])
    x = x + positions
    x = x + keras_favor.FavorAttention(4, 8, num_features=32, seed=1)(
        x, x, use_causal_mask=causal
    )
    outputs = keras.layers.Dense(8)(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    initial = model.evaluate(tokens, targets, verbose=0)
    model.fit(tokens, targets, epochs=12, batch_size=32, verbose=0)
    final = model.evaluate(tokens, targets, verbose=0)
    assert final < 0.5 * initial


# The unit roundoff of each mixed policy's compute dtype.
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.tensorflow_only
def test_mixed_precision_is_finite_for_large_inputs(rng, policy, causal):
    import tensorflow as tf

    # |logits| ~ 1e3: features computed in float16 would overflow.
    x = rng.normal(scale=30.0, size=(2, 12, 16)).astype("float32")
    keras.config.set_dtype_policy(policy)
    layer = keras_favor.FavorAttention(2, 8, num_features=16, chunk_size=4)
    with tf.GradientTape() as tape:
        y = layer(x, x, use_causal_mask=causal)
        loss = tf.reduce_sum(tf.cast(y, "float32"))
    gradients = tape.gradient(loss, layer.trainable_weights)
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    assert all(np.all(np.isfinite(g)) for g in gradients)
    # Every query sees a key, and the output projection's bias is 0: an
    # exactly-zero row would be a lost normalizer.
    assert not np.any(np.all(np.asarray(y, np.float32) == 0.0, axis=-1))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_mixed_precision_matches_float32_up_to_rounding(rng, policy, causal):
    # Same weights in float32: the policy only rounds the projections'
    # inputs and outputs (about eight roundings of relative size u on the
    # path to the output). A rounding also moves a logit by |logit| u, which
    # at |logits| ~ 1 changes the weights by a factor within 1 + O(u). At
    # large logits (~1e3, input scale 30) it moves them by whole units in
    # float16 and changes near ties by far more than u: a difference of the
    # rounded inputs, not of the kernel, which computes in float32 (its
    # large-input accuracy is tested in test_large_inputs.py, and finite
    # results under every policy above).
    input_scale = 1.0
    x = rng.normal(scale=input_scale, size=(2, 12, 16)).astype("float32")
    reference = keras_favor.FavorAttention(2, 8, num_features=16, chunk_size=4)
    expected = np.asarray(reference(x, x, use_causal_mask=causal))
    keras.config.set_dtype_policy(policy)
    layer = keras_favor.FavorAttention(2, 8, num_features=16, chunk_size=4)
    layer(x, x)
    layer.set_weights(reference.get_weights())
    actual = np.asarray(layer(x, x, use_causal_mask=causal), np.float32)
    tolerance = 8 * UNIT_ROUNDOFF[policy.split("_")[1]]
    scale = np.max(np.abs(expected))
    assert np.max(np.abs(actual - expected)) < tolerance * scale


def test_regularizers_add_the_losses_of_multi_head_attention(rng):
    x = rng.normal(size=(2, 5, 16)).astype("float32")
    kwargs = {
        "kernel_regularizer": "l2",
        "bias_regularizer": "l1",
        "activity_regularizer": "l2",
        "bias_initializer": "ones",
    }
    exact = keras.layers.MultiHeadAttention(2, 8, **kwargs)
    exact(x, x)
    favor = keras_favor.FavorAttention(2, 8, **kwargs)
    favor(x, x)
    for name in ("query_dense", "key_dense", "value_dense", "output_dense"):
        getattr(favor, name).set_weights(getattr(exact, name).get_weights())
    exact(x, x)
    favor(x, x)
    # 4 kernel, 4 bias and 4 activity losses. All but the output
    # projection's activity loss (its input is the attention) are equal.
    assert len(favor.losses) == len(exact.losses) == 12
    actual = np.array([float(loss) for loss in favor.losses])
    expected = np.array([float(loss) for loss in exact.losses])
    matches = np.isclose(actual[:, None], expected[None, :], rtol=1e-5)
    assert matches.any(axis=1).sum() == 11


@pytest.mark.parametrize("causal", [False, True])
def test_a_window_over_the_whole_sequence_runs_keras_exact_attention(
    rng, monkeypatch, causal
):
    x = rng.normal(size=(3, 8, 16)).astype("float32")
    mask = np.ones((3, 8), bool)
    mask[1, :3] = False  # left padding: causal queries 0-2 see no key
    mask[2] = False  # no key at all
    exact = keras.layers.MultiHeadAttention(2, 8)
    exact(x, x)
    favor = keras_favor.FavorAttention(
        2, 8, num_features=16, local_window=8, seed=1
    )
    favor(x, x)
    favor.load_multi_head_attention_weights(exact)
    calls = []
    fused = keras.ops.dot_product_attention
    monkeypatch.setattr(
        keras.ops,
        "dot_product_attention",
        lambda *args, **kwargs: calls.append(1) or fused(*args, **kwargs),
    )
    actual = keras.ops.convert_to_numpy(
        favor(x, x, attention_mask=mask, use_causal_mask=causal)
    )
    assert calls, "a window over every key runs dot_product_attention"
    expected = keras.ops.convert_to_numpy(
        exact(
            x,
            x,
            attention_mask=np.broadcast_to(mask[:, None, :], (3, 8, 8)),
            use_causal_mask=causal,
        )
    )
    sees_a_key = np.cumsum(mask, axis=1) > 0 if causal else mask.any(1)[:, None]
    sees_a_key = np.broadcast_to(sees_a_key, (3, 8))
    np.testing.assert_allclose(
        actual[sees_a_key], expected[sees_a_key], rtol=1e-5, atol=1e-5
    )
    # A query that sees no key gets zero attention: the output bias alone.
    bias = keras.ops.convert_to_numpy(favor.output_dense.bias)
    unseeing = actual[~sees_a_key]
    np.testing.assert_allclose(
        unseeing, np.broadcast_to(bias, unseeing.shape), atol=1e-6
    )
