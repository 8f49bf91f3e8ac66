"""Ready-made Performer models: `build_performer`, its embedding layer and
the loss of its language model."""

from keras_favor.models.performer_builder import build_performer
from keras_favor.models.performer_builder import language_model_loss
from keras_favor.models.token_and_position_embedding import (
    TokenAndPositionEmbedding,
)

__all__ = [
    "TokenAndPositionEmbedding",
    "build_performer",
    "language_model_loss",
]
