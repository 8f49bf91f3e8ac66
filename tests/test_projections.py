"""Random projections: orthogonality, the Haar sign fix, norms and seeds."""

import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import keras_favor
from keras_favor import projections


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


def test_chi_norms_have_the_chi_distribution():
    dim, rows = 16, 4096
    w = projections.OrthogonalProjection()((rows, dim), 2)
    norms = np.linalg.norm(w, axis=1)
    chi = tfp.distributions.Chi(df=float(dim))
    mean, variance = float(chi.mean()), float(chi.variance())
    # Norms are independent chi(d) draws: 4 standard errors.
    assert abs(norms.mean() - mean) < 4 * math.sqrt(variance / rows)
    assert abs(norms.var() - variance) < 0.1 * variance


def test_block_directions_are_haar_distributed():
    # Without the sign(diag(R)) correction the first entry of Q is biased
    # (about -0.4 for d = 4 with TensorFlow's QR); Haar rotations give
    # every entry mean 0 and variance 1/d.
    dim, draws = 4, 2000
    first = np.array(
        [
            projections.OrthogonalProjection("sqrt_d")((dim, dim), seed)[0, 0]
            / math.sqrt(dim)
            for seed in range(draws)
        ]
    )
    assert abs(first.mean()) < 4 * math.sqrt(1 / dim / draws)
    assert abs(first.var() - 1 / dim) < 0.1 / dim


def test_iid_entries_are_standard_normal():
    w = np.asarray(projections.IIDProjection()((256, 64), 9))
    assert abs(w.mean()) < 4 / math.sqrt(w.size)
    assert abs(w.var() - 1.0) < 0.02


@pytest.mark.parametrize("name", ["orthogonal", "iid"])
def test_same_seed_same_projection(name):
    projection = projections.get(name)
    np.testing.assert_array_equal(
        projection((32, 8), 11), projection((32, 8), 11)
    )
    np.testing.assert_array_equal(
        projection((32, 8), 11),
        projection((32, 8), tf.constant([11, 0])),
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
        return 2.0 * tf.eye(*shape)


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
