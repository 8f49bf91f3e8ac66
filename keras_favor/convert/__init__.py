"""Converting trained softmax-attention models to FAVOR+:
`from_multi_head_attention` for one layer, `performerize` for a model, and
`transfer_attention` to train the converted attention layers on their
teacher's outputs before finetuning."""

from keras_favor.convert.from_multi_head_attention import (
    from_multi_head_attention,
)
from keras_favor.convert.performerize import performerize
from keras_favor.convert.performerized_layer import PerformerizedLayer
from keras_favor.convert.transfer_attention import transfer_attention

__all__ = [
    "PerformerizedLayer", "from_multi_head_attention", "performerize",
    "transfer_attention",
]
