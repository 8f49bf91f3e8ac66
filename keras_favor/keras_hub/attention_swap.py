"""FavorAttention in place of the attention layers that keras-hub's
Transformer layers hold."""

import keras

from keras_favor.convert.attention_paths import swap_attention
from keras_favor.convert.from_multi_head_attention import (
    from_multi_head_attention,
)
from keras_favor.layers.favor_attention import FavorAttention

# The attributes in which keras-hub 0.32's TransformerEncoder and
# TransformerDecoder hold their attention layers.
ATTENTION_ATTRIBUTES = ("_self_attention_layer", "_cross_attention_layer")


def check_dense_weights(mha):
    """A `ValueError` naming `mha`'s class unless it has the weights of a
    `MultiHeadAttention` of its configuration (four kernels, and four
    biases with `use_bias`): FavorAttention has no other layout."""
    expected = 8 if mha.use_bias else 4
    if mha.built and len(mha.weights) != expected:
        raise ValueError(
            f"The attention layer {mha.name!r} ({type(mha).__name__}) has "
            f"{len(mha.weights)} weights where a MultiHeadAttention with "
            f"use_bias={mha.use_bias} has {expected} (such as a key "
            "projection without bias): FavorAttention has no such layout, "
            "so it does not convert."
        )


def convert_held_attention(layer, favor_options):
    """Swaps, inside the built keras-hub Transformer `layer`, each
    MultiHeadAttention it holds for `from_multi_head_attention(mha,
    **favor_options)` (weights copied). Cross-attention takes no
    `local_window`: its queries and keys are different sequences, with no
    positions near each other.

    Returns:
        The number of attention layers converted.
    """
    converted = {}
    for attribute in ATTENTION_ATTRIBUTES:
        mha = getattr(layer, attribute, None)
        if isinstance(mha, FavorAttention) or not isinstance(
            mha, keras.layers.MultiHeadAttention
        ):
            continue
        check_dense_weights(mha)
        options = dict(favor_options)
        if attribute == "_cross_attention_layer":
            options["local_window"] = 0
        converted[attribute] = from_multi_head_attention(mha, **options)
    swap_attention(layer, converted)
    return len(converted)
