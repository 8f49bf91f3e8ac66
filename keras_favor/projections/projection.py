"""The `Projection` base class: a distribution over projection matrices."""

import keras

from keras_favor import backend
from keras_favor.lookup import Configurable


def as_seed_pair(seed):
    """Turns an int or a shape-`(2,)` tensor into a stateless seed pair (on
    TensorFlow int64; on JAX a uint32 key, see `keras_favor.backend`)."""
    return backend.seed_pair(seed)


@keras.saving.register_keras_serializable(package="keras_favor")
class Projection(Configurable):
    """Base class of the random projections `W` used by the feature maps.

    A projection draws a `(num_features, dim)` float32 matrix from a
    stateless seed, so that the same seed gives the same matrix on every
    device, replica and worker. Subclass it and implement `sample` to use
    a distribution of your own; return every `__init__` argument from
    `get_config` and register the class with
    `keras.saving.register_keras_serializable`.
    """

    def sample(self, shape, seed):
        """Draws a matrix of `shape` from a stateless `(2,)` int seed."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement `sample(shape, seed)`."
        )

    def __call__(self, shape, seed):
        if len(shape) != 2:
            raise ValueError(
                "A projection has shape (num_features, dim). "
                f"Received: shape={shape}"
            )
        matrix = self.sample(tuple(shape), as_seed_pair(seed))
        return backend.ensure_shape(
            keras.ops.cast(matrix, "float32"),
            shape,
            f"{type(self).__name__}.sample returned shape "
            f"{tuple(matrix.shape)}, not {tuple(shape)}.",
        )
