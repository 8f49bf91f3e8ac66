"""Converting trained softmax-attention models to FAVOR+:
`from_multi_head_attention` for one layer, `performerize` for a model."""

from keras_favor.convert.from_multi_head_attention import (
    from_multi_head_attention,
)
from keras_favor.convert.performerize import performerize
from keras_favor.convert.performerized_layer import PerformerizedLayer

__all__ = ["PerformerizedLayer", "from_multi_head_attention", "performerize"]
