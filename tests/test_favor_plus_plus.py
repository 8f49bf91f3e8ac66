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


def kernel_estimate(feature_map, x, y, projection, a):
    _, log_x = feature_map.log_scaled(x[None].astype("float32"), projection, a=a)
    _, log_y = feature_map.log_scaled(y[None].astype("float32"), projection, a=a)
    return float(
        np.sum(np.exp(np.asarray(log_x, np.float64) + np.asarray(log_y)))
    )


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
            getattr(plus, method)(x, w)[1], rtol=0, atol=1e-6,
        )


@pytest.mark.parametrize("norm", [0.7, 1.2])
def test_estimate_is_unbiased_at_the_optimal_coefficient(rng, norm):
    """The mean over seeded iid projections is within 5 standard errors
    of the softmax kernel (the draws are independent)."""
    x, y = unit_vectors(rng, norm)
    statistic = np.sum((x + y) ** 2) / math.sqrt(DIM)
    a = np.float32(optimal_coefficient(statistic, DIM))
    assert a < 0
    plus_plus = feature_maps.get("favor++")
    estimates = np.array(
        [
            kernel_estimate(
                plus_plus, x, y, projections.get("iid")((16, DIM), seed), a
            )
            for seed in range(2000)
        ]
    )
    exact = math.exp(x @ y / math.sqrt(DIM))
    error = 5 * estimates.std() / math.sqrt(len(estimates))
    assert abs(estimates.mean() - exact) < error


def attention_errors(feature_map, causal, seed, scale=0.8):
    """Relative error of a layer's output against exact softmax attention
    with the same weights; causal FAVOR++ gets the moving statistic of the
    data itself, as training would settle on it."""
    layer = keras_favor.FavorAttention(
        2, DIM, num_features=32, feature_map=feature_map, seed=seed,
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
        2, DIM, num_features=32,
        feature_map=feature_maps.FavorPlusPlusFeatures(momentum), seed=0,
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
        layer.input_statistic.numpy(), 0.5 * np.array([0.4, 0.9]) + 0.5 * batch,
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


def test_bidirectional_statistic_leaves_padded_keys_out(rng):
    layer = keras_favor.FavorAttention(
        2, DIM, num_features=32, feature_map="favor++", seed=0
    )
    x = rng.normal(size=(1, 9, 32)).astype("float32")
    padded = np.concatenate([x, 50 * np.ones((1, 4, 32), "float32")], axis=1)
    mask = np.arange(13)[None] < 9
    np.testing.assert_allclose(
        np.asarray(
            layer(padded, padded, query_mask=mask, value_mask=mask)
        )[:, :9],
        np.asarray(layer(x, x)), atol=1e-5,
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
