"""Orthogonal random features (ORF)."""

import math

import keras
from keras import ops

from keras_favor import backend
from keras_favor.projections.projection import Projection

ROW_NORMS = ("chi", "sqrt_d")


def haar_orthogonal_blocks(num_blocks, dim, seed):
    """`num_blocks` independent Haar-distributed `dim x dim` rotations.

    `Q` from the QR of a Gaussian matrix is Haar-distributed only after its
    columns are multiplied by `sign(diag(R))` (Mezzadri, 2007).
    """
    gaussian = backend.stateless_normal((num_blocks, dim, dim), seed)
    q, r = ops.qr(gaussian)
    diagonal = ops.diagonal(r, axis1=-2, axis2=-1)
    signs = ops.where(diagonal < 0.0, -1.0, 1.0)
    return q * signs[:, None, :]


@keras.saving.register_keras_serializable(package="keras_favor")
class OrthogonalProjection(Projection):
    """Orthogonal Gaussian projections (Performer, Theorem 2).

    Rows come in blocks of `dim` mutually orthogonal directions; blocks are
    independent Haar rotations. Each row is then scaled so that its norm is
    distributed like that of a Gaussian vector, which keeps every row
    marginally `N(0, I)` and the softmax estimate unbiased
    (docs/numerics.md, section 8).

    Args:
        norm: `"chi"` (default) scales each row by the norm of a fresh
            Gaussian vector (a `chi(dim)` sample, independent of the
            directions); `"sqrt_d"` scales every row by `sqrt(dim)`, the
            deterministic variant (its estimate is not exactly unbiased,
            but has lower variance).

    References:
        - [Choromanski et al., 2021](https://arxiv.org/abs/2009.14794)
        - [Yu et al., 2016](https://arxiv.org/abs/1610.09072)
    """

    def __init__(self, norm="chi"):
        if norm not in ROW_NORMS:
            raise ValueError(
                f"`norm` must be one of {ROW_NORMS}. Received: norm={norm!r}"
            )
        self.norm = norm

    def sample(self, shape, seed):
        num_features, dim = shape
        block_seed, norm_seed = backend.split(seed, 2)
        num_blocks = math.ceil(num_features / dim)
        blocks = haar_orthogonal_blocks(num_blocks, dim, block_seed)
        directions = ops.reshape(
            self.block_directions(blocks), (num_blocks * dim, dim)
        )[:num_features]
        if self.norm == "sqrt_d":
            return directions * math.sqrt(dim)
        gaussian = backend.stateless_normal((num_features, dim), norm_seed)
        return directions * ops.norm(gaussian, axis=-1, keepdims=True)

    def block_directions(self, blocks):
        """The unit directions of each block, `(num_blocks, dim, dim)` rows,
        from its Haar rotation `Q`: the rows of `Q^T`, orthonormal."""
        return ops.transpose(blocks, (0, 2, 1))

    def get_config(self):
        return {"norm": self.norm}
