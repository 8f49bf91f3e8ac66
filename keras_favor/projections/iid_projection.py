"""Independent Gaussian projections."""

import keras
import tensorflow as tf

from keras_favor.projections.projection import Projection


@keras.saving.register_keras_serializable(package="keras_favor")
class IIDProjection(Projection):
    """A matrix of independent standard normal entries."""

    def sample(self, shape, seed):
        return tf.random.stateless_normal(shape, seed=seed)
