"""Simplex random features (SimRF)."""

import keras
from keras import ops

from keras_favor.projections.orthogonal_projection import OrthogonalProjection


def regular_simplex(dim):
    """`(dim, dim)`: `dim` unit vectors with pairwise dot products
    `-1 / (dim - 1)`, the basis vectors minus their centroid, normalized."""
    centred = ops.eye(dim) - 1.0 / dim
    return centred / ops.norm(centred, axis=-1, keepdims=True)


@keras.saving.register_keras_serializable(package="keras_favor")
class SimplexProjection(OrthogonalProjection):
    """Simplex random features: each block of `dim` directions is a randomly
    rotated regular simplex (Reid et al., 2023).

    Within a block the `dim` unit directions have pairwise dot products
    `-1 / (dim - 1)` (the most negatively correlated `dim` directions
    there are), where orthogonal features have 0. Each block is a fresh
    Haar rotation of the same simplex, and each row is scaled by a `chi(dim)`
    norm as in `OrthogonalProjection`, so each row is still marginally
    `N(0, I)` and the softmax estimate unbiased; its variance is lower than
    orthogonal features', most of all where `|x + y|` is small
    (BENCHMARKS.md, "Approximation error"). With `dim = 1` there is no
    simplex and the rows are those of `OrthogonalProjection`.

    Args:
        norm: `"chi"` (default) or `"sqrt_d"`, the row norms, as for
            `OrthogonalProjection`.

    Example:

    ```python
    layer = keras_favor.FavorAttention(
        num_heads=8, key_dim=64, num_features=64, projection="simplex"
    )
    ```

    References:
        - [Reid et al., 2023](https://arxiv.org/abs/2301.13856)
        - [Choromanski et al., 2021](https://arxiv.org/abs/2009.14794)
    """

    def block_directions(self, blocks):
        dim = blocks.shape[-1]
        if dim == 1:
            return super().block_directions(blocks)
        # Row i of S Q^T is Q s_i: the simplex vector s_i rotated by Q.
        return ops.matmul(
            regular_simplex(dim)[None], ops.transpose(blocks, (0, 2, 1))
        )
