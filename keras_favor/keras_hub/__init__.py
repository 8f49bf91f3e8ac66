"""keras-hub models with FAVOR+ attention.

`keras_favor.convert.performerize` converts keras-hub backbones, tasks and
Transformer layers through this package. Importing it imports keras-hub
(the `keras-hub` extra) and registers the converted classes, so that a
converted model's `.keras` file loads: import it before
`keras.saving.load_model`.
"""

from keras_favor.keras_hub import favor_backbone
from keras_favor.keras_hub import favor_causal_lm
from keras_favor.keras_hub import favor_seq_2_seq_lm
from keras_favor.keras_hub.favor_backbone import FavorBackbone
from keras_favor.keras_hub.favor_backbone import favor_backbone_class
from keras_favor.keras_hub.favor_causal_lm import FavorCausalLM
from keras_favor.keras_hub.favor_causal_lm import favor_causal_lm_class
from keras_favor.keras_hub.favor_rotary_attention import FavorRotaryAttention
from keras_favor.keras_hub.favor_seq_2_seq_lm import FavorSeq2SeqLM
from keras_favor.keras_hub.favor_seq_2_seq_lm import favor_seq_2_seq_lm_class
from keras_favor.keras_hub.favor_transformer_decoder import (
    FavorTransformerDecoder,
)

# The converted classes of every keras-hub backbone and task, registered
# for `keras.saving.load_model`.
favor_backbone.register_backbone_classes()
favor_causal_lm.register_causal_lm_classes()
favor_seq_2_seq_lm.register_seq_2_seq_lm_classes()

__all__ = [
    "FavorBackbone",
    "FavorCausalLM",
    "FavorRotaryAttention",
    "FavorSeq2SeqLM",
    "FavorTransformerDecoder",
    "favor_backbone_class",
    "favor_causal_lm_class",
    "favor_seq_2_seq_lm_class",
]
