"""Performer-ReLU random features."""

import math

import keras
from keras import ops

from keras_favor.feature_maps.feature_map import FeatureMap


@keras.saving.register_keras_serializable(package="keras_favor")
class ReluFeatures(FeatureMap):
    """Performer-ReLU features `relu(W x) / sqrt(m) + epsilon`.

    A generalized (non-softmax) attention kernel that trains well and needs no
    stabilizer. `epsilon` keeps the normalizer away from zero.

    Args:
        epsilon: float, added to every feature. Defaults to `1e-3`.

    References:
        - [Choromanski et al., 2021](https://arxiv.org/abs/2009.14794)
    """

    def __init__(self, epsilon=1e-3):
        if not epsilon >= 0:
            raise ValueError(
                "`epsilon` must be a non-negative float. "
                f"Received: epsilon={epsilon}"
            )
        self.epsilon = epsilon

    def call(self, x, projection):
        projected = ops.einsum("...d,md->...m", x, projection)
        return ops.relu(projected) / math.sqrt(projection.shape[0]) + (
            self.epsilon
        )

    def get_config(self):
        return {"epsilon": self.epsilon}
