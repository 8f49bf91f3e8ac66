"""Kernel feature maps for `FavorAttention`, and `get` to look them up."""

import keras

from keras_favor.feature_maps.elu_features import EluFeatures
from keras_favor.feature_maps.favor_plus_plus_features import (
    FavorPlusPlusFeatures,
)
from keras_favor.feature_maps.feature_map import FeatureMap
from keras_favor.feature_maps.relu_features import ReluFeatures
from keras_favor.feature_maps.softmax_features import SoftmaxFeatures
from keras_favor.feature_maps.softmax_hyperbolic_features import (
    SoftmaxHyperbolicFeatures,
)
from keras_favor.feature_maps.softmax_trig_features import SoftmaxTrigFeatures
from keras_favor.lookup import lookup
from keras_favor.lookup import serialize_option

__all__ = [
    "ALL_FEATURE_MAPS",
    "EluFeatures",
    "FavorPlusPlusFeatures",
    "FeatureMap",
    "ReluFeatures",
    "SoftmaxFeatures",
    "SoftmaxHyperbolicFeatures",
    "SoftmaxTrigFeatures",
    "deserialize",
    "get",
    "serialize",
]

ALL_FEATURE_MAPS = {
    "softmax": SoftmaxFeatures,
    "softmax_hyperbolic": SoftmaxHyperbolicFeatures,
    "softmax_trig": SoftmaxTrigFeatures,
    "relu": ReluFeatures,
    "elu": EluFeatures,
    "favor++": FavorPlusPlusFeatures,
}


def serialize(feature_map):
    """Returns the Keras config of a `FeatureMap`."""
    return serialize_option(feature_map)


def deserialize(config):
    """Builds a `FeatureMap` from the output of `serialize`."""
    return keras.saving.deserialize_keras_object(config)


def get(identifier):
    """Returns a `FeatureMap` from a name, a config dict or an instance.

    Args:
        identifier: one of `"softmax"`, `"softmax_hyperbolic"`,
            `"softmax_trig"`, `"relu"`, `"elu"`, `"favor++"`, a dict made
            by `serialize`, or a `FeatureMap` instance (returned as is).
    """
    return lookup(identifier, FeatureMap, ALL_FEATURE_MAPS, "feature_map")
