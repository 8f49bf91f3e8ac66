"""Tests of `TokenAndPositionEmbedding`."""

import numpy as np
import pytest

from keras_favor.models import TokenAndPositionEmbedding
from tests.layer_test_case import run_layer_test

pytestmark = pytest.mark.backend_independent


@pytest.mark.parametrize("mask_zero", [False, True])
def test_layer_test(tmp_path, mask_zero):
    tokens = np.array([[5, 3, 8, 1, 0, 0, 0, 0], [2, 9, 4, 7, 1, 6, 3, 2]])
    run_layer_test(
        TokenAndPositionEmbedding,
        dict(
            vocabulary_size=10,
            sequence_length=12,
            embedding_dim=16,
            embeddings_initializer="glorot_uniform",
            mask_zero=mask_zero,
        ),
        tokens.astype("int32"),
        (2, 8, 16),
        tmp_path,
    )


def test_embedding_adds_positions_and_masks_zeros():
    layer = TokenAndPositionEmbedding(10, 6, 4, mask_zero=True)
    x = np.array([[3, 3, 0]], "int32")
    out = np.asarray(layer(x))
    positions = np.asarray(layer.position_embeddings)
    token = np.asarray(layer.token_embedding.embeddings)
    np.testing.assert_allclose(
        out[0], token[[3, 3, 0]] + positions[:3], atol=1e-6
    )
    np.testing.assert_array_equal(layer.compute_mask(x), x != 0)
    assert TokenAndPositionEmbedding(10, 6, 4).compute_mask(x) is None
