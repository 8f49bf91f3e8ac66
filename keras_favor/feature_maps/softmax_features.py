"""FAVOR+ positive random features for the softmax kernel."""

import math

import keras
from keras import ops

from keras_favor.feature_maps.feature_map import FeatureMap


def temperature_scaled(x):
    """`x * d**-0.25`, so that `x~ . y~ = x . y / sqrt(d)`."""
    return x * (x.shape[-1] ** -0.25)


def random_projection(x, projection):
    """`W x~` for the softmax-kernel feature maps."""
    return ops.einsum("...d,md->...m", temperature_scaled(x), projection)


def half_sq_norm(x):
    """`|x~|^2 / 2 = |x|^2 / (2 sqrt(d))`, shape `(..., 1)`.

    Scales the reduced norms rather than `x`, which `random_projection`
    already scales once.
    """
    sq_norm = ops.sum(ops.square(x), axis=-1, keepdims=True)
    return sq_norm * (0.5 * x.shape[-1] ** -0.5)


@keras.saving.register_keras_serializable(package="keras_favor")
class SoftmaxFeatures(FeatureMap):
    """FAVOR+ positive random features: `exp(W x~ - |x~|^2 / 2) / sqrt(m)`.

    An unbiased estimate of the softmax kernel `exp(x . y / sqrt(d))` whose
    error vanishes where the kernel is small (Performer, Lemma 1 and 2).

    Example:

    ```python
    layer = keras_favor.FavorAttention(2, 16, feature_map="softmax")
    ```

    References:
        - [Choromanski et al., 2021](https://arxiv.org/abs/2009.14794)
    """

    estimates_softmax = True

    def log_scaled(self, x, projection):
        num_features = projection.shape[0]
        row_term = half_sq_norm(x) + 0.5 * math.log(num_features)
        return None, random_projection(x, projection) - row_term

    def query_log_scaled(self, x, projection):
        return None, random_projection(x, projection)
