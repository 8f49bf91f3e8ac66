"""Ready-made Performer models: `build_performer` and its embedding layer."""

from keras_favor.models.performer_builder import build_performer
from keras_favor.models.token_and_position_embedding import (
    TokenAndPositionEmbedding,
)
