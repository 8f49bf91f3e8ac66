"""Keras callbacks of keras_favor."""

from keras_favor.callbacks.feature_redraw import FeatureRedraw

__all__ = ["FeatureRedraw"]
