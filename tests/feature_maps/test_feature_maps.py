"""Feature maps: unbiased kernel estimates, look-up and serialization."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_favor
from keras_favor import feature_maps
from keras_favor import projections
from tests import reference

pytestmark = pytest.mark.backend_independent

SOFTMAX_MAPS = ["softmax", "softmax_hyperbolic", "softmax_trig"]


def kernel_estimates(feature_map, projection, x, y, num_features, draws):
    """`phi(x) . phi(y)` for `draws` independent projections of
    `num_features` rows, computed at once: they are the consecutive row
    groups of one projection of `draws * num_features` rows (iid rows, or
    independent orthogonal blocks of `dim` rows with independent norms,
    `num_features` a multiple of `dim`). A feature map's parts (`[exp(Wx),
    exp(-Wx)]`, `[sin, cos]`) follow each other along the features, and its
    `1 / rows` normalization is rescaled to each group's `1 / num_features`.
    """
    dim = x.shape[-1]
    rows = draws * num_features
    assert num_features % dim == 0
    w = projection((rows, dim), 0)
    phi_x = feature_map(ops.convert_to_tensor(x), w)
    phi_y = feature_map(ops.convert_to_tensor(y), w)
    products = np.asarray(phi_x * phi_y, np.float64)
    parts = feature_map.feature_dim(rows, dim) // rows
    groups = products.reshape(parts, draws, num_features).sum(axis=(0, 2))
    return groups * draws


@pytest.mark.parametrize("name", SOFTMAX_MAPS)
@pytest.mark.parametrize("projection", ["iid", "orthogonal"])
def test_softmax_kernel_estimate_is_unbiased(rng, name, projection):
    dim, num_features, draws = 8, 16, 400
    x = rng.normal(scale=0.6, size=dim).astype("float32")
    y = rng.normal(scale=0.6, size=dim).astype("float32")
    exact = np.exp(x @ y / np.sqrt(dim))
    estimates = kernel_estimates(
        feature_maps.get(name),
        projections.get(projection),
        x,
        y,
        num_features,
        draws,
    )
    # Draws are independent, so the mean's standard error is std/sqrt(n);
    # 4 standard errors fail an unbiased estimator with probability 6e-5.
    standard_error = estimates.std(ddof=1) / np.sqrt(draws)
    assert standard_error > 0
    assert abs(estimates.mean() - exact) < 4 * standard_error


def test_positive_features_are_positive_and_trig_are_signed(rng):
    x = ops.convert_to_tensor(rng.normal(size=(64, 8)).astype("float32"))
    w = projections.get("iid")((32, 8), 0)
    assert np.all(feature_maps.get("softmax")(x, w) > 0)
    assert np.all(feature_maps.get("softmax_hyperbolic")(x, w) > 0)
    assert np.any(feature_maps.get("softmax_trig")(x, w) < 0)


@pytest.mark.parametrize(
    "name, num_outputs",
    [
        ("softmax", 32),
        ("softmax_hyperbolic", 64),
        ("softmax_trig", 64),
        ("relu", 32),
        ("elu", 8),
    ],
)
def test_feature_dimensions(rng, name, num_outputs):
    feature_map = feature_maps.get(name)
    assert feature_map.feature_dim(32, 8) == num_outputs
    w = projections.get("iid")((32, 8), 0)
    x = ops.convert_to_tensor(rng.normal(size=(3, 5, 8)).astype("float32"))
    assert feature_map(x, w).shape == (3, 5, num_outputs)


def test_relu_features_match_their_formula(rng):
    x = rng.normal(size=(4, 8)).astype("float32")
    projection = projections.get("iid")((16, 8), 3)
    w = np.asarray(projection, np.float64)
    expected = np.maximum(x @ w.T, 0) / 4.0 + 1e-3
    got = np.asarray(feature_maps.get("relu")(x, projection))
    assert got.dtype == np.float32
    # float32 round-off of an 8-term dot product (each backend sums in its
    # own order), then of the scaling and the offset.
    bound = 8 * 2.0**-24 * (np.abs(x) @ np.abs(w).T) / 4.0 + 2.0**-24 * expected
    assert np.all(np.abs(got - expected) <= bound)


def test_elu_features_match_their_formula(rng):
    x = rng.normal(size=(4, 8)).astype("float32")
    expected = np.where(x > 0, x + 1, np.exp(x))
    np.testing.assert_allclose(
        feature_maps.get("elu")(ops.convert_to_tensor(x)), expected, rtol=1e-6
    )


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="feature_map.*softmax_hyperbolic"):
        feature_maps.get("gaussian")
    with pytest.raises(ValueError, match="feature_map"):
        keras_favor.FavorAttention(2, 8, feature_map=3)


@pytest.mark.parametrize("name", sorted(feature_maps.ALL_FEATURE_MAPS))
def test_serialize_round_trip(name):
    original = feature_maps.get(name)
    restored = feature_maps.get(feature_maps.serialize(original))
    assert type(restored) is type(original)
    assert restored.get_config() == original.get_config()


def test_relu_epsilon_is_validated_and_serialized():
    with pytest.raises(ValueError, match="epsilon"):
        feature_maps.ReluFeatures(epsilon=-1.0)
    restored = feature_maps.get(
        feature_maps.serialize(feature_maps.ReluFeatures(epsilon=0.01))
    )
    assert restored.epsilon == 0.01


@keras.saving.register_keras_serializable(package="keras_favor_tests")
class SquaredReluFeatures(feature_maps.FeatureMap):
    def __init__(self, offset=1e-3):
        self.offset = offset

    def call(self, x, projection):
        projected = keras.ops.einsum("...d,md->...m", x, projection)
        return keras.ops.square(keras.ops.relu(projected)) + self.offset

    def get_config(self):
        return {"offset": self.offset}


def test_user_feature_map_trains_and_saves(rng, tmp_path):
    inputs = keras.Input((6, 8))
    outputs = keras_favor.FavorAttention(
        2, 4, num_features=8, feature_map=SquaredReluFeatures(0.5)
    )(inputs, inputs)
    model = keras.Model(inputs, outputs)
    x = rng.normal(size=(2, 6, 8)).astype("float32")
    path = str(tmp_path / "custom.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    layer = restored.layers[-1]
    assert isinstance(layer.feature_map, SquaredReluFeatures)
    assert layer.feature_map.offset == 0.5
    np.testing.assert_allclose(restored(x), model(x), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(feature_maps.ALL_FEATURE_MAPS))
def test_query_features_differ_only_by_a_factor_per_query(rng, name):
    # The factor cancels in attention's normalization, so it may be dropped;
    # anything else would change the attention weights.
    feature_map = feature_maps.get(name)
    x, projection = (
        ops.cast(rng.normal(size=shape), reference.FLOAT64)
        for shape in ((3, 5, 8), (16, 8))
    )
    values, log_scale = feature_map.query_log_scaled(x, projection)
    query = np.ones(()) if values is None else np.asarray(values)
    if log_scale is not None:
        query = query * np.exp(np.asarray(log_scale))
    ratio = query / np.asarray(feature_map(x, projection))
    assert np.all(ratio > 0)
    np.testing.assert_allclose(
        ratio,
        np.broadcast_to(ratio[..., :1], ratio.shape),
        rtol=1e-10 if reference.FLOAT64 == "float64" else 1e-5,
    )
