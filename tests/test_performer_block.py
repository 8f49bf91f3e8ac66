"""Tests of `PerformerBlock`."""

import keras
import numpy as np
import pytest

import keras_favor
from keras_favor.layers import PerformerBlock
from tests.layer_test_case import run_layer_test

HIDDEN = 16
SMALL = dict(num_heads=2, intermediate_dim=32, num_features=16, seed=3)


def block(**kwargs):
    return PerformerBlock(**{**SMALL, **kwargs})


def inputs(batch=2, length=8, seed=0):
    return np.random.RandomState(seed).normal(size=(batch, length, HIDDEN)).astype(
        "float32"
    )


# FavorAttention's projection is float32 under every policy, its redraw
# count int32.
FAVOR_WEIGHT_DTYPES = {"projection": "float32", "redraw_count": "int32"}

# Softmax is unchanged when all logits of a query shift: exact attention's
# key bias gets no gradient.
EXACT_KEY_BIAS = ("self_attention/key/bias",)

LAYER_TEST_CASES = {
    "favor-bidirectional-pre-norm": (dict(), FAVOR_WEIGHT_DTYPES, ()),
    "exact-causal-post-norm-options": (
        dict(
            attention="exact",
            causal=True,
            normalize_first=False,
            key_dim=4,
            activation="relu",
            layer_norm_epsilon=1e-3,
            kernel_initializer="he_normal",
            bias_initializer="ones",
            feature_map="relu",
            projection="iid",
            chunk_size=4,
            name="block",
        ),
        {},
        EXACT_KEY_BIAS,
    ),
    "identity-post-norm": (
        dict(attention="identity", normalize_first=False),
        {},
        (),
    ),
}


@pytest.mark.parametrize(
    "kwargs, dtype_exemptions, weights_without_gradient",
    LAYER_TEST_CASES.values(),
    ids=LAYER_TEST_CASES.keys(),
)
def test_layer_test(
    tmp_path, kwargs, dtype_exemptions, weights_without_gradient
):
    run_layer_test(
        PerformerBlock,
        {**SMALL, **kwargs},
        inputs(),
        (2, 8, HIDDEN),
        tmp_path,
        variable_dtype_exemptions=dtype_exemptions,
        weights_without_gradient=weights_without_gradient,
    )


def test_pre_norm_matches_manual_computation():
    layer = block(activation="relu")
    x = inputs()
    layer.build(x.shape)
    normed = layer.attention_norm(x)
    h = x + np.asarray(layer.attention_layer(normed, normed))
    ffn = layer.output_dense(layer.intermediate_dense(layer.feedforward_norm(h)))
    np.testing.assert_allclose(layer(x), h + np.asarray(ffn), atol=1e-5)


def test_post_norm_matches_manual_computation():
    layer = block(normalize_first=False, activation="relu")
    x = inputs()
    layer.build(x.shape)
    h = layer.attention_norm(x + np.asarray(layer.attention_layer(x, x)))
    expected = layer.feedforward_norm(
        h + np.asarray(layer.output_dense(layer.intermediate_dense(h)))
    )
    np.testing.assert_allclose(layer(x), expected, atol=1e-5)


def test_identity_attention_keeps_only_value_and_output_projections():
    layer = block(attention="identity")
    layer(inputs())
    assert layer.attention_layer is None
    assert layer.value_dense.kernel.shape == (HIDDEN, HIDDEN)
    assert layer.attention_output_dense.kernel.shape == (HIDDEN, HIDDEN)
    x = inputs(batch=1, length=5)
    # No mixing of positions: each position's output depends on itself only.
    single = layer(x[:, 2:3])
    np.testing.assert_allclose(layer(x)[:, 2:3], single, atol=1e-6)


@pytest.mark.parametrize("attention", ["favor", "exact"])
def test_attention_kind_and_weight_shapes(attention):
    layer = block(attention=attention)
    layer(inputs())
    expected = (
        keras_favor.FavorAttention
        if attention == "favor"
        else keras.layers.MultiHeadAttention
    )
    assert type(layer.attention_layer) is expected
    assert layer.attention_layer.query_dense.kernel.shape == (HIDDEN, 2, 8)


@pytest.mark.parametrize("attention", ["favor", "exact"])
def test_causal_block_ignores_the_future(attention):
    layer = block(causal=True, attention=attention)
    x = inputs(batch=1, length=10)
    changed = x.copy()
    changed[:, 6:] += 5.0
    np.testing.assert_allclose(
        layer(x)[:, :6], layer(changed)[:, :6], atol=1e-5
    )
    assert not np.allclose(layer(x)[:, 6:], layer(changed)[:, 6:])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("attention", ["favor", "exact"])
def test_padding_does_not_change_real_positions(causal, attention):
    layer = block(causal=causal, attention=attention)
    x = inputs(batch=1, length=10)
    mask = np.arange(10)[None] < 6
    padded = x.copy()
    padded[:, 6:] = 100.0
    np.testing.assert_allclose(
        layer(padded, mask=mask)[:, :6], layer(x[:, :6])[:, :6], atol=1e-5
    )


def test_mask_flows_through_a_stack_in_sequential():
    model = keras.Sequential(
        [
            keras.Input((None,), dtype="int32"),
            keras.layers.Embedding(20, HIDDEN, mask_zero=True),
            block(),
            block(seed=4),
            keras.layers.GlobalAveragePooling1D(),
        ]
    )
    short = np.array([[3, 4, 5]], "int32")
    padded = np.array([[3, 4, 5, 0, 0, 0]], "int32")
    np.testing.assert_allclose(model(short), model(padded), atol=1e-5)


def test_compute_mask_returns_the_input_mask():
    layer = block()
    mask = np.array([[True, True, False]])
    np.testing.assert_array_equal(
        layer.compute_mask(inputs(batch=1, length=3), mask), mask
    )


def test_dropout_only_in_training():
    layer = block(dropout=0.5)
    x = inputs()
    np.testing.assert_allclose(layer(x), layer(x), atol=1e-6)
    assert not np.allclose(layer(x, training=True), layer(x), atol=1e-3)


def test_key_dim_defaults_to_hidden_over_heads_and_can_be_set():
    default = block(num_heads=4)
    default(inputs())
    assert default.attention_layer.key_dim == HIDDEN // 4
    explicit = block(num_heads=3, key_dim=5)
    explicit(inputs())
    assert explicit.attention_layer.key_dim == 5


def test_favor_options_reach_the_attention_layer():
    layer = block(feature_map="relu", num_features=8, projection="iid",
                  chunk_size=4)
    layer(inputs())
    attention = layer.attention_layer
    assert type(attention.feature_map).__name__ == "ReluFeatures"
    assert attention.projection.shape == (8, 8)
    assert attention.chunk_size == 4
    assert attention.seed == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(attention="linear"), "attention"),
        (dict(dropout=1.0), "dropout"),
        (dict(intermediate_dim=0), "intermediate_dim"),
        (dict(num_heads=-1), "num_heads"),
        (dict(feature_map="cosine"), "feature_map"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        block(**kwargs)


def test_indivisible_hidden_size_raises():
    with pytest.raises(ValueError, match="key_dim"):
        block(num_heads=3)(inputs())


def test_rank_two_input_raises():
    with pytest.raises(ValueError, match="hidden_dim"):
        block()(np.zeros((2, HIDDEN), "float32"))
