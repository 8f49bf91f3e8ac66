"""Deterministic `elu(x) + 1` features of the linear transformer."""

import keras
from keras import ops

from keras_favor.feature_maps.feature_map import FeatureMap


@keras.saving.register_keras_serializable(package="keras_favor")
class EluFeatures(FeatureMap):
    """Deterministic features `elu(x) + 1` (one per input dimension).

    The kernel of the linear transformer. It uses no random projection, so a
    `FavorAttention` layer with this map has no `projection` weight and
    `redraw_features` does nothing.

    References:
        - [Katharopoulos et al., 2020](https://arxiv.org/abs/2006.16236)
    """

    requires_projection = False

    def feature_dim(self, num_features, input_dim):
        return input_dim

    def call(self, x, projection=None):
        return ops.elu(x) + 1.0

    def log_scaled(self, x, projection):
        # elu(x) + 1 = (1 + relu(x)) exp(min(x, 0)): for very negative
        # inputs the feature is an exponential, kept as its logarithm so
        # that it does not underflow before the kernel's shifts.
        return 1.0 + ops.relu(x), ops.minimum(x, 0.0)
