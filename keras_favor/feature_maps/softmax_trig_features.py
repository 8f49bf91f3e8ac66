"""Trigonometric random features for the softmax kernel."""

import math

import keras
from keras import ops

from keras_favor.feature_maps.feature_map import FeatureMap
from keras_favor.feature_maps.softmax_features import half_sq_norm
from keras_favor.feature_maps.softmax_features import random_projection


@keras.saving.register_keras_serializable(package="keras_favor")
class SoftmaxTrigFeatures(FeatureMap):
    """Trigonometric features `exp(|x~|^2/2)/sqrt(m) * [sin(W x~), cos(W x~)]`.

    The classical random Fourier features applied to the softmax kernel. They
    are signed, so their estimate of the attention normalizer can be close to
    zero or negative where attention weights are small; they are provided as
    the baseline that FAVOR+ improves on, not for training.

    References:
        - [Rahimi and Recht, 2007](https://papers.nips.cc/paper/3182)
        - [Choromanski et al., 2021](https://arxiv.org/abs/2009.14794)
    """

    estimates_softmax = True

    def feature_dim(self, num_features, input_dim):
        return 2 * num_features

    def log_scaled(self, x, projection):
        return self.query_log_scaled(x, projection)[0], half_sq_norm(x)

    def query_log_scaled(self, x, projection):
        projected = random_projection(x, projection)
        num_features = projection.shape[0]
        values = ops.concatenate(
            [ops.sin(projected), ops.cos(projected)], axis=-1
        ) / math.sqrt(num_features)
        return values, None
