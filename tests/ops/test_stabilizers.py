"""The log-domain shifts (`keras_favor.ops.stabilizers`): each cancels in
the attention ratio, keeps exponentials and normalizers representable, and
masked or unseen positions give exact zeros with finite gradients."""

import numpy as np
import pytest
from keras import ops

from keras_favor.ops import stabilizers
from keras_favor.ops.stabilizers import NO_KEY_LEVEL
from tests import reference

pytestmark = pytest.mark.backend_independent


def test_levels_are_masked_maxima_without_gradient(rng):
    log_scale = rng.normal(size=(2, 3, 6, 4)).astype("float32")
    mask = np.ones((2, 1, 6), bool)
    mask[1, :, 2:] = False
    mask[0, :, :] = False
    rows = ops.convert_to_numpy(stabilizers.row_log_level(log_scale, mask))
    np.testing.assert_array_equal(
        rows, np.where(mask, log_scale.max(-1), NO_KEY_LEVEL)
    )
    columns = ops.convert_to_numpy(
        stabilizers.column_log_level(log_scale, mask)
    )
    # Batch row 0 has no valid position: every feature at NO_KEY_LEVEL.
    np.testing.assert_array_equal(
        columns[0], np.full((3, 4), NO_KEY_LEVEL, "float32")
    )
    np.testing.assert_array_equal(columns[1], log_scale[1, :, :2].max(axis=1))
    for level in (stabilizers.row_log_level, stabilizers.column_log_level):
        (grad,) = reference.gradients(
            lambda x, level=level: ops.sum(level(x, mask)), [log_scale]
        )
        assert not grad.any(), level.__name__


def test_log_key_sum_is_finite_at_zero():
    got = ops.convert_to_numpy(
        stabilizers.log_key_sum(np.array([0.0, 1e-40, 2.0], "float32"))
    )
    assert np.all(np.isfinite(got)) and got[0] < -80
    np.testing.assert_allclose(got[2], np.log(2.0), rtol=1e-6)


def test_query_shift_cancels_and_keeps_the_normalizer_at_least_one(rng):
    # Exponential query features far above and below the key sums' bounds:
    # after the shift, the normalizer against the bound w is >= 1 and the
    # features are exp(-shift) times the unshifted ones.
    log_scale = rng.normal(scale=40.0, size=(2, 3, 5, 4)).astype("float32")
    log_w = rng.normal(scale=20.0, size=(2, 3, 1, 4)).astype("float32")
    features, shift = (
        ops.convert_to_numpy(x)
        for x in stabilizers.query_features(
            None, log_scale, [(log_w, None)], return_shift=True
        )
    )
    log_normalizer = np.log(np.sum(features * np.exp(log_w), axis=-1))
    capped = log_scale.max(-1) - stabilizers.MAX_QUERY_LOG_FEATURE
    uncapped = (log_scale + log_w).max(-1) >= capped
    # Where the cap does not bind, the normalizer is at least 1 (0 in
    # logarithms, up to round-off); the features never exceed exp(30).
    assert np.all(log_normalizer[uncapped] >= -1e-5)
    exponent = log_scale - shift[..., None]
    assert np.all(exponent <= stabilizers.MAX_QUERY_LOG_FEATURE + 1e-4)
    # Features that float32 represents (above exp(-80)) are exp(exponent).
    kept = exponent > -80
    assert kept.mean() > 0.3
    np.testing.assert_allclose(
        np.log(features[kept]), exponent[kept], rtol=1e-6, atol=1e-4
    )


def test_query_shift_without_bounds_is_the_row_max(rng):
    values = rng.uniform(size=(2, 3, 5, 4)).astype("float32")
    log_scale = rng.normal(scale=10.0, size=(2, 3, 5, 4)).astype("float32")
    features, shift = stabilizers.query_features(
        values, log_scale, return_shift=True
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(shift), log_scale.max(-1), rtol=1e-6
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(features),
        values * np.exp(log_scale - log_scale.max(-1, keepdims=True)),
        rtol=1e-5,
    )
    # Without a log-scale the values pass unchanged, with shift 0.
    same, zero = stabilizers.query_features(values, None, return_shift=True)
    np.testing.assert_array_equal(ops.convert_to_numpy(same), values)
    assert not ops.convert_to_numpy(zero).any()


def test_masked_keys_are_exact_zeros_with_zero_gradient(rng):
    # A masked key with an overflowing log-scale: exactly 0, and a
    # gradient of 0 (not NaN), with and without values.
    log_scale = rng.normal(size=(1, 2, 4, 3)).astype("float32")
    log_scale[0, :, 3] = 500.0
    values = rng.uniform(size=(1, 2, 4, 3)).astype("float32")
    mask = np.array([[True, True, False, False]])[:, None, :]
    shift = np.zeros((1, 2, 1, 1), "float32")
    for key_values in (None, values):

        def keys(log_scale, key_values=key_values):
            return stabilizers.shifted_key_features(
                key_values, log_scale, shift, mask
            )

        got = ops.convert_to_numpy(keys(log_scale))
        expected = np.exp(np.minimum(log_scale, 80.0)) * (
            1 if key_values is None else values
        )
        np.testing.assert_allclose(got[:, :, :2], expected[:, :, :2], rtol=1e-6)
        assert not got[:, :, 2:].any()
        (grad,) = reference.gradients(lambda x: ops.sum(keys(x)), [log_scale])
        assert np.all(np.isfinite(grad)) and not grad[:, :, 2:].any()
        np.testing.assert_allclose(
            grad[:, :, :2], expected[:, :, :2], rtol=1e-6
        )
    relu = ops.convert_to_numpy(
        stabilizers.shifted_key_features(values, None, None, mask)
    )
    np.testing.assert_array_equal(relu[:, :, :2], values[:, :, :2])
    assert not relu[:, :, 2:].any()


def test_normalize_divides_and_gives_zero_where_nothing_is_seen(rng):
    numerator = rng.normal(size=(2, 5, 3)).astype("float32")
    denominator = rng.uniform(0.5, 2.0, size=(2, 5)).astype("float32")
    # Queries that see no key (0), or whose products all underflowed.
    denominator[0, 1] = 0.0
    denominator[1, 3] = 1e-14
    target = rng.normal(size=(2, 5, 3)).astype("float32")
    sees = np.abs(denominator) >= stabilizers.TINY_NORMALIZER

    def loss(normalize):
        def total(numerator, denominator):
            outputs = normalize(numerator, denominator)
            return ops.sum(outputs * target), outputs

        return total

    def plain(numerator, denominator):
        # The plain ratio where the query sees keys, 0 elsewhere.
        safe = ops.where(sees, denominator, 1.0)
        return ops.where(sees[..., None], numerator / safe[..., None], 0.0)

    grads, outputs = reference.gradients(
        loss(stabilizers.normalize), [numerator, denominator], has_aux=True
    )
    expected_grads, expected = reference.gradients(
        loss(plain), [numerator, denominator], has_aux=True
    )
    np.testing.assert_allclose(outputs, expected, rtol=1e-6)
    assert not outputs[~sees].any()
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert not grads[0][~sees].any() and not grads[1][~sees].any()
