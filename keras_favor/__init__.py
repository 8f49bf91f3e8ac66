"""keras_favor: Performer (FAVOR+) linear attention for Keras 3."""

from keras_favor import callbacks
from keras_favor import distribute
from keras_favor import feature_maps
from keras_favor import models
from keras_favor import ops
from keras_favor import projections
from keras_favor.callbacks import FeatureRedraw
from keras_favor.layers import FavorAttention
from keras_favor.layers import PerformerBlock
from keras_favor.models import build_performer

__version__ = "0.1.0"
