"""Keras layers of keras_favor."""

from keras_favor.layers.favor_attention import FavorAttention
