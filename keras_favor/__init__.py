"""keras_favor: Performer (FAVOR+) linear attention for Keras 3."""

from keras_favor import feature_maps
from keras_favor import ops
from keras_favor import projections
from keras_favor.layers import FavorAttention

__version__ = "0.1.0"
