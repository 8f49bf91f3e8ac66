"""Random projections for the feature maps, and `get` to look them up."""

import keras

from keras_favor.lookup import lookup
from keras_favor.lookup import serialize_option
from keras_favor.projections.iid_projection import IIDProjection
from keras_favor.projections.orthogonal_projection import OrthogonalProjection
from keras_favor.projections.projection import Projection
from keras_favor.projections.simplex_projection import SimplexProjection

__all__ = [
    "ALL_PROJECTIONS",
    "IIDProjection",
    "OrthogonalProjection",
    "Projection",
    "SimplexProjection",
    "deserialize",
    "get",
    "serialize",
]

ALL_PROJECTIONS = {
    "orthogonal": OrthogonalProjection,
    "iid": IIDProjection,
    "simplex": SimplexProjection,
}


def serialize(projection):
    """Returns the Keras config of a `Projection`."""
    return serialize_option(projection)


def deserialize(config):
    """Builds a `Projection` from the output of `serialize`."""
    return keras.saving.deserialize_keras_object(config)


def get(identifier):
    """Returns a `Projection` from a name, a config dict or an instance.

    Args:
        identifier: `"orthogonal"` (`OrthogonalProjection()`, chi norms),
            `"iid"`, `"simplex"` (`SimplexProjection()`, chi norms), a dict
            made by `serialize`, or a `Projection` instance.
    """
    return lookup(identifier, Projection, ALL_PROJECTIONS, "projection")
