"""Tests of `PerformerBlock`."""

import keras
import numpy as np
import pytest

import keras_favor
from keras_favor import layer_tree
from keras_favor.initializers import clone_initializer
from keras_favor.layers import PerformerBlock
from tests.layer_test_case import run_layer_test

pytestmark = pytest.mark.backend_independent

HIDDEN = 16
SMALL = dict(num_heads=2, intermediate_dim=32, num_features=16, seed=3)


def block(**kwargs):
    return PerformerBlock(**{**SMALL, **kwargs})


def inputs(batch=2, length=8, seed=0):
    return (
        np.random.RandomState(seed)
        .normal(size=(batch, length, HIDDEN))
        .astype("float32")
    )


# FavorAttention's projection is float32 under every policy, its redraw
# count int32.
FAVOR_WEIGHT_DTYPES = {"projection": "float32", "redraw_count": "int32"}

# Softmax is unchanged when all logits of a query shift: exact attention's
# key bias gets no gradient.
EXACT_KEY_BIAS = ("self_attention/key/bias",)

# On JAX, where each case compiles for seconds, the first and the last case
# run (`backend_samples`): FAVOR and exact attention, norms before and
# after the residuals. The middle case adds only the ReLU feature map,
# whose code is the same Keras ops on every backend; TensorFlow runs all
# three.
LAYER_TEST_CASES = {
    "favor-bidirectional-pre-norm": (dict(), FAVOR_WEIGHT_DTYPES, ()),
    "favor-relu-post-norm": (
        dict(normalize_first=False, feature_map="relu", chunk_size=4),
        FAVOR_WEIGHT_DTYPES,
        (),
    ),
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
}


@pytest.mark.backend_samples(2)
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
    ffn = layer.output_dense(
        layer.intermediate_dense(layer.feedforward_norm(h))
    )
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


def test_identity_attention_is_a_benchmark_baseline():
    with pytest.raises(ValueError, match="benchmarks/models.py"):
        block(attention="identity")


def test_lora_of_the_attention_survives_saving(tmp_path):
    model = keras.Sequential([keras.Input((None, HIDDEN)), block(causal=True)])
    layer = model.layers[0]
    layer.attention_layer.enable_lora(2)
    for weight in layer.attention_layer.trainable_weights:
        weight.assign(weight + 0.1)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path).layers[0]
    assert loaded.attention_layer.lora_rank == 2
    assert loaded.attention_layer.query_dense.lora_enabled
    assert len(loaded.trainable_weights) == len(layer.trainable_weights)
    np.testing.assert_allclose(
        loaded(inputs()), layer(inputs()), rtol=1e-5, atol=1e-5
    )


def test_config_with_options_at_the_top_level_loads():
    # The FAVOR options as keyword arguments, as configs written before
    # `attention_options` have them.
    config = block(causal=True).get_config()
    options = config.pop("attention_options")
    config.update(options, local_window=2, num_features=8)
    restored = PerformerBlock.from_config(config)
    restored(inputs())
    assert restored.attention_layer.local_window == 2
    assert restored.attention_layer.num_features == 8
    assert restored.get_config()["attention_options"]["local_window"] == 2


def test_option_given_twice_or_unknown_raises():
    with pytest.raises(ValueError, match="`num_features` was given twice"):
        block(attention_options={"num_features": 8})
    with pytest.raises(ValueError, match="num_feature"):
        block(attention_options={"num_feature": 8})


@pytest.mark.parametrize("attention", ["favor", "exact"])
def test_attention_kind_and_weight_shapes(attention):
    layer = block(attention=attention)
    layer(inputs())
    expected = (
        keras_favor.FavorAttention
        if attention == "favor"
        else keras_favor.layers.CachedSoftmaxAttention
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
    layer = block(
        feature_map="relu", num_features=8, projection="iid", chunk_size=4
    )
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


def test_checking_the_options_leaves_automatic_names_alone():
    first = keras_favor.FavorAttention(2, 8)
    block()
    second = keras_favor.FavorAttention(2, 8)
    prefix = "favor_attention"
    numbers = [
        int(layer.name[len(prefix) + 1 :] or 0) if layer.name != prefix else 0
        for layer in (first, second)
    ]
    assert numbers[1] == numbers[0] + 1


def test_clone_initializer_copies_class_and_config_not_the_object():
    seeded = keras.initializers.GlorotUniform(seed=3)
    clone = clone_initializer(seeded)
    assert clone is not seeded
    assert type(clone) is keras.initializers.GlorotUniform
    assert clone.get_config() == seeded.get_config()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(clone((4, 3))),
        keras.ops.convert_to_numpy(seeded((4, 3))),
    )
    assert isinstance(clone_initializer("zeros"), keras.initializers.Zeros)


def test_every_dense_layer_gets_its_own_initializer():
    layer = block(kernel_initializer=keras.initializers.GlorotUniform(seed=5))
    layer.build((2, 8, HIDDEN))
    walk = layer_tree.depth_first(
        layer, lambda node: enumerate(layer_tree.sublayers(node))
    )
    initializers = [layer.kernel_initializer] + [
        dense.kernel_initializer
        for _, dense in walk
        if isinstance(dense, (keras.layers.Dense, keras.layers.EinsumDense))
    ]
    assert len(initializers) >= 6
    assert len({id(i) for i in initializers}) == len(initializers)
