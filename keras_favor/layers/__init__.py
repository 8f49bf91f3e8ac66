"""Keras layers of keras_favor."""

from keras_favor.layers.cached_softmax_attention import CachedSoftmaxAttention
from keras_favor.layers.favor_attention import FavorAttention
from keras_favor.layers.performer_block import PerformerBlock

__all__ = ["CachedSoftmaxAttention", "FavorAttention", "PerformerBlock"]
