"""Hyperbolic positive random features for the softmax kernel."""

import math

import keras
from keras import ops

from keras_favor.feature_maps.feature_map import FeatureMap
from keras_favor.feature_maps.softmax_features import half_sq_norm
from keras_favor.feature_maps.softmax_features import random_projection


@keras.saving.register_keras_serializable(package="keras_favor")
class SoftmaxHyperbolicFeatures(FeatureMap):
    """Hyperbolic positive features, `2 * num_features` of them.

    `phi(x) = exp(-|x~|^2 / 2) / sqrt(2m) * [exp(W x~), exp(-W x~)]`: unbiased
    for `exp(x . y / sqrt(d))`, with lower variance than `SoftmaxFeatures` at
    the same number of projections (Performer, Lemma 1).

    References:
        - [Choromanski et al., 2021](https://arxiv.org/abs/2009.14794)
    """

    estimates_softmax = True

    def feature_dim(self, num_features, input_dim):
        return 2 * num_features

    def log_scaled(self, x, projection):
        num_features = projection.shape[0]
        row_term = half_sq_norm(x) + 0.5 * math.log(2 * num_features)
        return None, both_signs(random_projection(x, projection)) - row_term

    def query_log_scaled(self, x, projection):
        return None, both_signs(random_projection(x, projection))


def both_signs(projected):
    """`[W x~, -W x~]` along the features."""
    return ops.concatenate([projected, -projected], axis=-1)
