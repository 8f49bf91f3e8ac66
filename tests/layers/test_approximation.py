"""FAVOR+ against exact softmax attention with the same weights."""

import keras
import numpy as np
import pytest

import keras_favor
from keras_favor import backend

pytestmark = pytest.mark.backend_independent

NUM_HEADS, KEY_DIM = 2, 16


def favor_and_exact(num_features, projection, x, seed=None):
    """A MultiHeadAttention and a FavorAttention holding the same weights,
    drawn from `seed` when it is given."""
    if seed is not None:
        keras.utils.set_random_seed(seed)
    exact = keras.layers.MultiHeadAttention(NUM_HEADS, KEY_DIM)
    exact(x, x)
    favor = keras_favor.FavorAttention(
        NUM_HEADS, KEY_DIM, num_features=num_features, projection=projection
    )
    favor(x, x)
    for name in ("query_dense", "key_dense", "value_dense", "output_dense"):
        getattr(favor, name).set_weights(getattr(exact, name).get_weights())
    return favor, exact


def mean_squared_errors(
    num_features, projection, x, draws, causal=False, model_seed=None
):
    """MSE against exact attention for `draws` seeded projections."""
    favor, exact = favor_and_exact(num_features, projection, x, model_seed)
    expected = np.asarray(exact(x, x, use_causal_mask=causal))
    # Compiled: `draws` eager calls would take most of the test's time.
    call = backend.compile_function(
        lambda inputs: favor(inputs, inputs, use_causal_mask=causal),
        favor.weights,
    )
    errors = []
    for seed in range(draws):
        favor.redraw_features(seed)
        errors.append(np.mean((np.asarray(call(x)) - expected) ** 2))
    return np.array(errors)


@pytest.fixture
def small_norm_inputs(rng):
    # Small-norm inputs keep the kernel values near 1, where the estimator's
    # relative variance is of order 1/m (Performer, Lemma 2).
    return rng.normal(scale=0.5, size=(2, 32, 32)).astype("float32")


@pytest.mark.parametrize("causal", [False, True])
def test_error_falls_like_one_over_sqrt_num_features(small_norm_inputs, causal):
    sizes = np.array([64, 256, 1024, 4096])
    mse = [
        # One model for every number of features: only m changes.
        mean_squared_errors(
            m, "iid", small_norm_inputs, 12, causal, model_seed=0
        ).mean()
        for m in sizes
    ]
    # The delta method gives MSE = c/m + O(1/m^2) for the ratio estimator:
    # a log-log slope of -1 for the MSE, -1/2 for the RMS error. Outputs are
    # convex combinations of values, so the error saturates at small m and
    # the slope over a finite range is somewhat shallower than -1; an error
    # floor (the bug that makes more features useless) would flatten it.
    slope = np.polyfit(np.log(sizes), np.log(mse), 1)[0]
    assert -1.2 < slope < -0.75, (slope, mse)
    assert mse[-1] < mse[0] / 20


def test_orthogonal_features_beat_iid_on_average(small_norm_inputs):
    # Performer, Theorem 2: orthogonal rows strictly lower the kernel
    # estimate's MSE. Both arms use one model (the same weights), so only
    # the projection's distribution differs. Through the layer's normalized
    # outputs the gain measured 15-23 % for inputs of scale 0.5 and two
    # blocks of features (m = 2d), but 1-10 % at scale 1 and about 1 % at
    # scale 2, where the error hardly falls with m. Per draw the difference
    # of the means is 0.3-0.5 standard deviations of the draws' errors, so
    # 256 draws per arm put it 4-7 standard errors above 0; the test asks
    # for 2.
    draws = 256
    iid, orthogonal = (
        mean_squared_errors(
            2 * KEY_DIM, projection, small_norm_inputs, draws, model_seed=0
        )
        for projection in ("iid", "orthogonal")
    )
    standard_error = np.sqrt(
        iid.var(ddof=1) / draws + orthogonal.var(ddof=1) / draws
    )
    assert iid.mean() - orthogonal.mean() > 2 * standard_error, (
        iid.mean(),
        orthogonal.mean(),
        standard_error,
    )


def test_many_features_approach_exact_attention(small_norm_inputs):
    favor, exact = favor_and_exact(4096, "orthogonal", small_norm_inputs)
    expected = np.asarray(exact(small_norm_inputs, small_norm_inputs))
    actual = np.asarray(favor(small_norm_inputs, small_norm_inputs))
    relative_rms = np.sqrt(np.mean((actual - expected) ** 2)) / np.sqrt(
        np.mean(expected**2)
    )
    assert relative_rms < 0.05
