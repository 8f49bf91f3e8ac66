"""FAVOR++ features: unbiased for every A <= 0, FAVOR+ at A = 0, a lower
attention error than FAVOR+ at larger inputs, and, causal, a coefficient
from the moving statistic of past batches only (no leakage, exact state)."""

import math

import keras
import numpy as np
import pytest

import keras_favor
from keras_favor import feature_maps
from keras_favor import ops as favor_ops
from keras_favor import projections
from keras_favor.feature_maps.favor_plus_plus_features import (
    optimal_coefficient,
)

DIM = 16


def unit_vectors(rng, norm):
    """Two heads whose scaled forms `x d^(-1/4)` have norm `norm`."""
    return [
        v * norm * DIM**0.25 / np.linalg.norm(v)
        for v in rng.normal(size=(2, DIM))
    ]


def feature_products(feature_map, x, y, projection, a):
    """`phi(x)_m phi(y)_m` for each feature m, in float64."""
    _, log_x = feature_map.log_scaled(
        x[None].astype("float32"), projection, a=a
    )
    _, log_y = feature_map.log_scaled(
        y[None].astype("float32"), projection, a=a
    )
    return np.exp(np.asarray(log_x, np.float64) + np.asarray(log_y))[0]


def test_coefficient_is_zero_for_zero_inputs_and_falls_with_the_statistic():
    coefficients = np.asarray(
        optimal_coefficient(np.array([0.0, 0.5, 2.0, 8.0]), DIM)
    )
    assert coefficients[0] == 0
    assert np.all(np.diff(coefficients) < 0) and np.all(coefficients > -0.25)


def test_zero_coefficient_is_favor_plus(rng):
    x = rng.normal(size=(2, 3, 5, DIM)).astype("float32")
    w = projections.get("orthogonal")((32, DIM), 0)
    plus = feature_maps.get("softmax")
    plus_plus = feature_maps.get("favor++")
    for method in ("log_scaled", "query_log_scaled"):
        np.testing.assert_allclose(
            getattr(plus_plus, method)(x, w, a=np.float32(0.0))[1],
            getattr(plus, method)(x, w)[1],
            rtol=0,
            atol=1e-6,
        )


@pytest.mark.parametrize("norm", [0.7, 1.2])
def test_estimate_is_unbiased_at_the_optimal_coefficient(rng, norm):
    """The mean of 2000 independent estimates, each from 16 iid features,
    is within 5 standard errors of the softmax kernel. The rows of one iid
    projection are independent, so its blocks of 16 rows are independent
    projections; each block's estimate rescales the features' `1 /
    num_features` normalization (`log_scaled`) from all the rows to 16."""
    x, y = unit_vectors(rng, norm)
    statistic = np.sum((x + y) ** 2) / math.sqrt(DIM)
    a = np.float32(optimal_coefficient(statistic, DIM))
    assert a < 0
    count, block = 2000, 16
    projection = projections.get("iid")((count * block, DIM), 0)
    products = feature_products(
        feature_maps.get("favor++"), x, y, projection, a
    )
    estimates = products.reshape(count, block).sum(axis=1) * count
    exact = math.exp(x @ y / math.sqrt(DIM))
    error = 5 * estimates.std() / math.sqrt(len(estimates))
    assert abs(estimates.mean() - exact) < error


def attention_errors(feature_map, causal, seed, scale=0.8):
    """Relative error of a layer's output against exact softmax attention
    with the same weights; causal FAVOR++ gets the moving statistic of the
    data itself, as training would settle on it."""
    layer = keras_favor.FavorAttention(
        2,
        DIM,
        num_features=32,
        feature_map=feature_map,
        seed=seed,
        kernel_initializer=keras.initializers.GlorotUniform(seed),
    )
    x = (
        np.random.default_rng(100 + seed).normal(size=(2, 64, 32)) * scale
    ).astype("float32")
    layer(x, x)
    q, k, v = (
        np.transpose(np.asarray(dense(x)), (0, 2, 1, 3))
        for dense in (layer.query_dense, layer.key_dense, layer.value_dense)
    )
    if feature_map == "favor++" and causal:
        layer.input_statistic.assign(
            np.mean(np.asarray(layer.feature_map.statistic(q, k)), axis=0)
        )
    got = np.asarray(layer(x, x, use_causal_mask=causal))
    exact = np.asarray(favor_ops.softmax_attention(q, k, v, causal=causal))
    exact = np.asarray(layer.output_dense(np.transpose(exact, (0, 2, 1, 3))))
    return np.linalg.norm(got - exact) / np.linalg.norm(exact)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_error_is_below_favor_plus_at_larger_inputs(causal):
    """Paired by seed (the same weights, projection and inputs): the mean
    difference of relative errors is negative by more than 3 standard
    errors."""
    differences = np.array(
        [
            attention_errors("favor++", causal, seed)
            - attention_errors("softmax", causal, seed)
            for seed in range(16)
        ]
    )
    standard_error = differences.std() / math.sqrt(len(differences))
    assert differences.mean() < -3 * standard_error


def causal_layer(momentum=0.5):
    layer = keras_favor.FavorAttention(
        2,
        DIM,
        num_features=32,
        feature_map=feature_maps.FavorPlusPlusFeatures(momentum),
        seed=0,
    )
    layer(np.zeros((1, 4, 32), "float32"))
    return layer


def test_causal_training_call_uses_the_statistic_before_it_then_updates(rng):
    layer = causal_layer(momentum=0.5)
    layer.input_statistic.assign([0.4, 0.9])
    x = rng.normal(size=(2, 12, 32)).astype("float32")
    before = np.asarray(layer(x, use_causal_mask=True))
    np.testing.assert_array_equal(
        layer.input_statistic.numpy(), np.float32([0.4, 0.9])
    )
    trained = np.asarray(layer(x, use_causal_mask=True, training=True))
    np.testing.assert_allclose(trained, before, atol=1e-6)
    q, k = (
        np.transpose(np.asarray(dense(x)), (0, 2, 1, 3))
        for dense in (layer.query_dense, layer.key_dense)
    )
    batch = np.mean(np.asarray(layer.feature_map.statistic(q, k)), axis=0)
    np.testing.assert_allclose(
        layer.input_statistic.numpy(),
        0.5 * np.array([0.4, 0.9]) + 0.5 * batch,
        rtol=1e-6,
    )


def test_causal_favor_plus_plus_does_not_see_later_positions(rng):
    layer = causal_layer()
    layer.input_statistic.assign([0.6, 1.1])
    x = rng.normal(size=(2, 20, 32)).astype("float32")
    changed = x.copy()
    changed[:, 12:] *= 1e3
    want = np.asarray(layer(x, use_causal_mask=True))[:, :12]
    # Inference, then a training call, which uses the statistic as it
    # stood before the call (and only then takes in the later positions).
    for training in (False, True):
        got = layer(changed, use_causal_mask=True, training=training)
        np.testing.assert_allclose(np.asarray(got)[:, :12], want, atol=1e-6)


def test_decoding_cache_pieces_equal_the_whole(rng):
    layer = causal_layer()
    layer.input_statistic.assign([0.6, 1.1])
    x = rng.normal(size=(2, 10, 32)).astype("float32")
    whole = np.asarray(layer(x, use_causal_mask=True))
    outputs, cache = layer(
        x[:, :4], use_causal_mask=True, cache=layer.empty_cache(2)
    )
    pieces = [np.asarray(outputs)]
    for t in range(4, 10):
        outputs, cache = layer(
            x[:, t : t + 1], use_causal_mask=True, cache=cache
        )
        pieces.append(np.asarray(outputs))
    np.testing.assert_allclose(
        np.concatenate(pieces, axis=1), whole, atol=1e-5 * np.abs(whole).max()
    )


# Padding of self-attention, each way Keras takes it: the padding mask to
# the call's keyword arguments. Without a query mask the layer takes the
# keys' mask for the queries.
PADDING_WAYS = {
    "query_and_value_masks": lambda m: dict(query_mask=m, value_mask=m),
    "value_mask": lambda m: dict(value_mask=m),
    "key_mask": lambda m: dict(key_mask=m),
    "attention_mask": lambda m: dict(attention_mask=m),
    "broadcast_attention_mask": lambda m: dict(attention_mask=m[:, None]),
}


def favor_plus_plus_layer(dtype=None):
    return keras_favor.FavorAttention(
        2, DIM, num_features=32, feature_map="favor++", seed=0, dtype=dtype
    )


def padded_batch(rng, lengths, total):
    """Sequences of `lengths`, and the batch of them padded to `total`
    positions with large junk (which would move a statistic that took it
    in), with its padding mask."""
    sequences = [rng.normal(size=(n, 32)).astype("float32") for n in lengths]
    batch = 40 * rng.normal(size=(len(lengths), total, 32)).astype("float32")
    for row, sequence in zip(batch, sequences):
        row[: len(sequence)] = sequence
    mask = np.arange(total)[None] < np.array(lengths)[:, None]
    return sequences, batch, mask


@pytest.mark.parametrize("way", sorted(PADDING_WAYS))
@pytest.mark.parametrize("one_tensor", [False, True])
def test_bidirectional_self_attention_is_padding_invariant(
    rng, way, one_tensor
):
    """Real positions of a padded batch get the outputs of each sequence
    alone, however the padding is given; `one_tensor=False` passes the
    batch twice as NumPy arrays (two tensors once Keras converts them)."""
    layer = favor_plus_plus_layer()
    sequences, batch, mask = padded_batch(rng, [9, 6], 13)
    query = keras.ops.convert_to_tensor(batch) if one_tensor else batch
    value = query if one_tensor else batch.copy()
    got = np.asarray(layer(query, value, **PADDING_WAYS[way](mask)))
    for row, sequence in zip(got, sequences):
        want = np.asarray(layer(sequence[None], sequence[None]))[0]
        np.testing.assert_allclose(
            row[: len(sequence)], want, atol=1e-5 * np.abs(want).max()
        )


@pytest.mark.tensorflow_only
def test_padding_invariance_under_mixed_precision_and_unknown_lengths(rng):
    """A float32 tensor given twice to a float16 layer (cast once per
    argument), in a `tf.function` of unknown lengths: the attention mask's
    padding still leaves padded queries out; cross-attention of other
    lengths runs in the same function."""
    import tensorflow as tf

    layer = favor_plus_plus_layer("mixed_float16")
    sequences, batch, mask = padded_batch(rng, [9, 6], 13)
    spec = tf.TensorSpec((None, None, 32))
    attend = tf.function(
        lambda q, v, m: layer(q, v, attention_mask=m),
        input_signature=[spec, spec, tf.TensorSpec((None, None), tf.bool)],
    )
    batch = tf.constant(batch)
    got = np.asarray(attend(batch, batch, mask), np.float32)
    for row, sequence in zip(got, sequences):
        want = np.asarray(layer(sequence[None], sequence[None]), np.float32)[0]
        # The float32 attention differs by rounding only; float16's output
        # projection rounds to 2 ** -10 of the largest output.
        np.testing.assert_allclose(
            row[: len(sequence)], want, atol=2e-3 * np.abs(want).max()
        )
    assert attend(batch, batch[:, :5], mask[:, :5]).shape == (2, 13, 32)


def test_causal_training_statistic_leaves_padding_out(rng):
    """The moving statistic, which later calls use, takes in a padded batch
    as the sequences alone: padding given as an attention mask only. With
    momentum 0 it is the last batch's mean over its sequences."""
    layer = causal_layer(momentum=0.0)
    sequences, batch, mask = padded_batch(rng, [9, 6], 13)
    alone = []
    for sequence in sequences:
        layer(sequence[None], use_causal_mask=True, training=True)
        alone.append(layer.input_statistic.numpy())
    x = keras.ops.convert_to_tensor(batch)
    layer(x, x, use_causal_mask=True, training=True, attention_mask=mask)
    np.testing.assert_allclose(
        layer.input_statistic.numpy(), np.mean(alone, axis=0), rtol=1e-5
    )


def test_cross_attention_statistic_leaves_masked_queries_out(rng):
    layer = favor_plus_plus_layer()
    queries, query_batch, query_mask = padded_batch(rng, [7, 4], 10)
    keys, key_batch, key_mask = padded_batch(rng, [9, 6], 13)
    got = np.asarray(
        layer(query_batch, key_batch, query_mask=query_mask, key_mask=key_mask)
    )
    for row, query, key in zip(got, queries, keys):
        want = np.asarray(layer(query[None], key[None]))[0]
        np.testing.assert_allclose(
            row[: len(query)], want, atol=1e-5 * np.abs(want).max()
        )


def test_keras_padding_mask_leaves_padded_positions_out(rng):
    """`Embedding(mask_zero=True)`: Keras passes the masks itself."""
    tokens = rng.integers(1, 50, size=(1, 9))
    padded = np.concatenate([tokens, np.zeros((1, 4), "int64")], axis=1)
    inputs = keras.Input((None,), dtype="int32")
    embedded = keras.layers.Embedding(50, 32, mask_zero=True)(inputs)
    model = keras.Model(inputs, favor_plus_plus_layer()(embedded, embedded))
    np.testing.assert_allclose(
        np.asarray(model(padded))[:, :9], np.asarray(model(tokens)), atol=1e-5
    )


def test_configuration_and_the_statistic_are_saved(tmp_path):
    layer = causal_layer(momentum=0.9)
    layer.input_statistic.assign([0.6, 1.1])
    inputs = keras.Input((None, 32))
    model = keras.Model(inputs, layer(inputs, use_causal_mask=True))
    path = str(tmp_path / "favor_plus_plus.keras")
    model.save(path)
    loaded = keras.saving.load_model(path).layers[-1]
    assert loaded.feature_map.momentum == 0.9
    np.testing.assert_allclose(loaded.input_statistic.numpy(), [0.6, 1.1])
    with pytest.raises(ValueError, match="momentum"):
        feature_maps.FavorPlusPlusFeatures(momentum=1.0)
