"""Independent Gaussian projections."""

import keras

from keras_favor import backend
from keras_favor.projections.projection import Projection


@keras.saving.register_keras_serializable(package="keras_favor")
class IIDProjection(Projection):
    """A matrix of independent standard normal entries."""

    def sample(self, shape, seed):
        return backend.stateless_normal(shape, seed)
