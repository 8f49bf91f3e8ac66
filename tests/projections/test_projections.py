"""Random projections: orthogonality, the Haar sign fix, norms and seeds."""

import json
import math
import zipfile

import keras
import numpy as np
import pytest
from keras import ops

import keras_favor
from keras_favor import projections

pytestmark = pytest.mark.backend_independent


@pytest.mark.parametrize("norm", ["chi", "sqrt_d"])
def test_rows_inside_a_block_are_orthogonal(norm):
    dim, num_features = 16, 40  # two full blocks and a partial one
    w = np.asarray(
        projections.OrthogonalProjection(norm)((num_features, dim), 5),
        np.float64,
    )
    assert w.shape == (num_features, dim)
    for start in range(0, num_features, dim):
        block = w[start : start + dim]
        directions = block / np.linalg.norm(block, axis=1, keepdims=True)
        gram = directions @ directions.T
        np.testing.assert_allclose(gram, np.eye(len(block)), atol=1e-5)


def test_sqrt_d_norms():
    w = projections.OrthogonalProjection("sqrt_d")((24, 9), 1)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 3.0, rtol=1e-5)


def chi_mean_and_variance(dim):
    """The mean `sqrt(2) Gamma((d + 1) / 2) / Gamma(d / 2)` of the chi
    distribution with `d` degrees of freedom, and its variance `d - mean^2`."""
    mean = math.sqrt(2) * math.exp(
        math.lgamma((dim + 1) / 2) - math.lgamma(dim / 2)
    )
    return mean, dim - mean**2


def test_chi_norms_have_the_chi_distribution():
    dim, rows = 16, 4096
    w = projections.OrthogonalProjection()((rows, dim), 2)
    norms = np.linalg.norm(w, axis=1)
    mean, variance = chi_mean_and_variance(dim)
    # Norms are independent chi(d) draws: 4 standard errors.
    assert abs(norms.mean() - mean) < 4 * math.sqrt(variance / rows)
    assert abs(norms.var() - variance) < 0.1 * variance


def test_block_directions_are_haar_distributed():
    # Without the sign(diag(R)) correction the first entry of Q is biased
    # (about -0.4 for d = 4 with TensorFlow's QR); Haar rotations give
    # every entry mean 0 and variance 1/d. The blocks of one projection
    # are independent rotations: the first entry of each is one draw.
    dim, draws = 4, 2000
    w = np.asarray(
        projections.OrthogonalProjection("sqrt_d")((dim * draws, dim), 0)
    )
    first = w[::dim, 0] / math.sqrt(dim)
    assert abs(first.mean()) < 4 * math.sqrt(1 / dim / draws)
    assert abs(first.var() - 1 / dim) < 0.1 / dim


def test_iid_entries_are_standard_normal():
    w = np.asarray(projections.IIDProjection()((256, 64), 9))
    assert abs(w.mean()) < 4 / math.sqrt(w.size)
    assert abs(w.var() - 1.0) < 0.02


@pytest.mark.parametrize("name", ["orthogonal", "iid", "simplex"])
def test_same_seed_same_projection(name):
    projection = projections.get(name)
    np.testing.assert_array_equal(
        projection((32, 8), 11), projection((32, 8), 11)
    )
    np.testing.assert_array_equal(
        projection((32, 8), 11), projection((32, 8), np.array([11, 0]))
    )
    assert not np.allclose(projection((32, 8), 11), projection((32, 8), 12))


def test_validation_and_look_up():
    with pytest.raises(ValueError, match="norm"):
        projections.OrthogonalProjection(norm="unit")
    with pytest.raises(ValueError, match="projection.*orthogonal"):
        projections.get("hadamard")
    restored = projections.get(
        projections.serialize(projections.OrthogonalProjection("sqrt_d"))
    )
    assert restored.norm == "sqrt_d"
    with pytest.raises(ValueError, match="num_features, dim"):
        projections.get("iid")((8,), 0)


class ScaledIdentityProjection(projections.Projection):
    def sample(self, shape, seed):
        return 2.0 * ops.eye(*shape)


def test_user_projection():
    w = ScaledIdentityProjection()((3, 5), 0)
    np.testing.assert_array_equal(w, 2.0 * np.eye(3, 5))


def test_layer_draws_from_a_user_projection():
    layer = keras_favor.FavorAttention(
        2, 5, num_features=3, projection=ScaledIdentityProjection()
    )
    layer.build((None, 4, 8), (None, 4, 8))
    np.testing.assert_array_equal(layer.projection, 2.0 * np.eye(3, 5))
    layer.redraw_features(seed=1)
    np.testing.assert_array_equal(layer.projection, 2.0 * np.eye(3, 5))


@pytest.mark.parametrize("norm", ["chi", "sqrt_d"])
def test_simplex_rows_of_a_block_have_dot_products_minus_one_over_d_minus_one(
    norm,
):
    dim, num_features = 8, 20  # two full blocks and a partial one
    w = np.asarray(
        projections.SimplexProjection(norm)((num_features, dim), 5), np.float64
    )
    assert w.shape == (num_features, dim)
    for start in range(0, num_features, dim):
        block = w[start : start + dim]
        directions = block / np.linalg.norm(block, axis=1, keepdims=True)
        gram = directions @ directions.T
        want = np.full(gram.shape, -1 / (dim - 1))
        np.fill_diagonal(want, 1.0)
        np.testing.assert_allclose(gram, want, atol=1e-5)
    # Blocks are independent rotations: the first two are not the same.
    assert not np.allclose(w[:dim], w[dim : 2 * dim], atol=0.1)


def test_simplex_norms_have_the_chi_distribution_and_rows_are_isotropic():
    dim, rows = 16, 4096
    w = np.asarray(projections.SimplexProjection()((rows, dim), 2), np.float64)
    norms = np.linalg.norm(w, axis=1)
    mean, variance = chi_mean_and_variance(dim)
    assert abs(norms.mean() - mean) < 4 * math.sqrt(variance / rows)
    assert abs(norms.var() - variance) < 0.1 * variance
    # Each row is marginally N(0, I): entries of mean 0 and variance 1 (the
    # rows of one block are dependent: 256 blocks of 16, 8-sigma bounds).
    blocks = rows // dim
    assert abs(w.mean()) < 8 / math.sqrt(blocks * dim)
    assert abs(w.var() - 1.0) < 8 * math.sqrt(2 / (blocks * dim))


def test_simplex_of_dimension_one_is_the_orthogonal_projection():
    np.testing.assert_array_equal(
        projections.SimplexProjection()((3, 1), 4),
        projections.OrthogonalProjection()((3, 1), 4),
    )


def kernel_squared_errors(projection, x, y, draws):
    """Squared errors of the positive random-feature estimate of
    `exp(x . y)`, one per block of `len(x)` features, from `draws`
    independent blocks of one projection."""
    dim = len(x)
    w = np.asarray(projection((dim * draws, dim), 0), np.float64)

    def phi(z):
        return np.exp(w @ z - z @ z / 2).reshape(draws, dim) / math.sqrt(dim)

    return (np.sum(phi(x) * phi(y), axis=1) - math.exp(x @ y)) ** 2


def test_simplex_features_estimate_small_kernels_better_than_orthogonal():
    """Reid et al. (2023), Theorem 4.3: at equal rotations and norms the
    simplex's negative correlations lower the estimator's variance; the
    gain is largest for small |x + y|. The same seed gives both projections
    the same rotations and norms, block by block, so the comparison is
    paired: the mean
    difference of squared errors must be negative by more than 4 standard
    errors."""
    rng = np.random.default_rng(0)
    dim, draws = 8, 600
    x, y = (v * 0.3 / np.linalg.norm(v) for v in rng.normal(size=(2, dim)))
    simplex = kernel_squared_errors(
        projections.SimplexProjection(), x, y, draws
    )
    orthogonal = kernel_squared_errors(
        projections.OrthogonalProjection(), x, y, draws
    )
    difference = simplex - orthogonal
    assert difference.mean() < -4 * difference.std() / math.sqrt(draws)
    assert simplex.mean() < 0.5 * orthogonal.mean()


def test_layer_with_simplex_features_saves_its_projection(tmp_path):
    layer = keras_favor.FavorAttention(
        2, 8, num_features=16, projection="simplex", seed=0
    )
    x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype("float32")
    layer(x, x)
    assert isinstance(
        layer.projection_distribution, projections.SimplexProjection
    )
    restored = keras_favor.FavorAttention.from_config(layer.get_config())
    assert isinstance(
        restored.projection_distribution, projections.SimplexProjection
    )


def test_a_projection_held_by_two_layers_saves_without_shared_ids(tmp_path):
    # Keras's saving marks an object serialized twice as shared and writes
    # a `shared_object_id` into each of its configs, keyed by `id()`, which
    # temporaries reuse: options configs must not depend on it.
    projection = projections.OrthogonalProjection("sqrt_d")
    inputs = keras.Input((6, 8))
    hidden = inputs
    for _ in range(2):
        layer = keras_favor.FavorAttention(
            2, 4, num_features=8, projection=projection, seed=0
        )
        hidden = layer(hidden, hidden)
    model = keras.Model(inputs, hidden)
    path = tmp_path / "model.keras"
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        saved = json.loads(archive.read("config.json"))
    expected = projections.serialize(projection)
    assert [
        layer["config"]["projection"] for layer in saved["config"]["layers"][1:]
    ] == [expected, expected]
    loaded = keras.saving.load_model(path)
    for layer in model.layers[1:] + loaded.layers[1:]:
        assert layer.get_config()["projection"] == expected
