"""`FavorRotaryDecoder`: keras-hub's Llama, Qwen and Gemma decoder layers with
`FavorRotaryAttention`."""

import math

import keras

# keras-hub exports neither these decoders nor their attention classes;
# their modules are the only place to name them.
from keras_hub.src.models.gemma.gemma_attention import CachedGemmaAttention
from keras_hub.src.models.gemma.gemma_decoder_block import GemmaDecoderBlock
from keras_hub.src.models.llama.llama_attention import LlamaAttention
from keras_hub.src.models.llama.llama_decoder import LlamaTransformerDecoder
from keras_hub.src.models.qwen.qwen_attention import QwenAttention
from keras_hub.src.models.qwen.qwen_decoder import QwenTransformerDecoder

from keras_favor.convert.attention_paths import swap_attention
from keras_favor.keras_hub import packed_state
from keras_favor.keras_hub.favor_rotary_attention import FavorRotaryAttention

# Per decoder class: the attribute holding its attention, the attention's
# class, and the attention's attributes holding its query, key, value and
# output projections and its rotary embedding.
FAMILIES = {
    LlamaTransformerDecoder: (
        "_self_attention_layer",
        LlamaAttention,
        ("_query_dense", "_key_dense", "_value_dense", "_output_dense"),
        "rotary_embedding_layer",
    ),
    QwenTransformerDecoder: (
        "_self_attention_layer",
        QwenAttention,
        ("_query_dense", "_key_dense", "_value_dense", "_output_dense"),
        "rotary_embedding_layer",
    ),
    GemmaDecoderBlock: (
        "attention",
        CachedGemmaAttention,
        ("query_dense", "key_dense", "value_dense", "output_dense"),
        "rope_layer",
    ),
}


def _keras_mask(x):
    return getattr(x, "_keras_mask", None)


class FavorRotaryDecoder:
    """The converted form of keras-hub's `LlamaTransformerDecoder`,
    `QwenTransformerDecoder` and `GemmaDecoderBlock`: mixed in before the class (`convert_in_place`),
    with its attention a `FavorRotaryAttention`.

    keras-hub's decoder merges causality and padding into one dense
    `(B, T, T)` mask for its attention. This one hands its attention the
    padding mask alone: `FavorRotaryAttention` is causal by construction,
    exact without the quadratic mask, and needs no check of mask values
    that a compiled function could not raise from. A custom
    `decoder_attention_mask` therefore raises.

    Decoding: the cache is the attention's causal state, packed into one
    `(B, P)` float32 tensor (`empty_cache(batch_size, packed=True)`), the
    form keras-hub's CausalLM tasks slice and stack.
    """

    @property
    def favor_attention(self):
        return getattr(self, FAMILIES[_family(type(self))][0])

    def empty_cache(self, batch_size, max_length=None, packed=False):
        """The self-attention's causal state before any position, packed
        into one `(B, P)` float32 tensor with `packed=True`."""
        state = self.favor_attention.empty_cache(batch_size, max_length)
        return packed_state.pack(state) if packed else state

    def _compute_self_attention_mask(
        self,
        decoder_sequence,
        decoder_padding_mask,
        decoder_attention_mask,
        self_attention_cache,
        self_attention_cache_update_index,
    ):
        # Llama's and Qwen's decoders: the attention's mask is the keys'
        # padding.
        if decoder_attention_mask is not None:
            raise ValueError(
                "A custom `decoder_attention_mask` has no linear-time form: "
                f"the converted {type(self).__name__} is causal and takes "
                "padding from `decoder_padding_mask`. Received: "
                "decoder_attention_mask of shape "
                f"{tuple(decoder_attention_mask.shape)}"
            )
        if decoder_padding_mask is None:
            return _keras_mask(decoder_sequence)
        return decoder_padding_mask

    def _compute_attention_mask(
        self, x, padding_mask, cache, cache_update_index
    ):
        # Gemma's decoder block: the same.
        return _keras_mask(x) if padding_mask is None else padding_mask


def _family(decoder_class):
    """The keras-hub decoder class that `decoder_class` converts from."""
    for base in decoder_class.__mro__:
        if base in FAMILIES:
            return base
    return None


def is_rotary_decoder(layer):
    """Whether `layer` is one of the keras-hub decoders that convert here
    (exactly, not a subclass with a `call` of its own)."""
    return type(layer) in FAMILIES


def held_attention(decoder):
    """The attention layer that the rotary `decoder` holds."""
    return getattr(decoder, FAMILIES[type(decoder)][0])


def _rope_arguments(attention, rope):
    """The `FavorRotaryAttention` arguments of `attention`'s rotary
    embedding `rope`; a `ValueError` for a scaling it does not have."""
    if getattr(rope, "frequency_adjustment_factor", None) is not None:
        raise ValueError(
            f"The attention layer {attention.name!r} "
            f"({type(attention).__name__}) adjusts its rotary frequencies "
            "(Llama 3.1's RoPE scaling), which FavorRotaryAttention does not "
            "have, so it does not convert."
        )
    return {
        "rope_max_wavelength": rope.max_wavelength,
        "rope_scaling_factor": rope.scaling_factor,
    }


def _check_defaults(attention, defaults):
    """A `ValueError` naming the first option of `attention` (name:
    default, in `defaults`) set otherwise: those have no linear-time
    form (Gemma 2's soft cap, sliding windows)."""
    for option, default in defaults.items():
        if getattr(attention, option, default) != default:
            raise ValueError(
                f"The attention layer {attention.name!r} "
                f"({type(attention).__name__}) has {option}="
                f"{getattr(attention, option)!r}, which has no linear-time "
                "form, so it does not convert. Only "
                f"{option}={default!r} converts."
            )


def _gemma_arguments(attention):
    """The arguments that Gemma's attention adds."""
    _check_defaults(
        attention,
        {"logit_soft_cap": None, "use_sliding_window_attention": False},
    )
    score_scale = None
    if not attention.query_head_dim_normalize:
        heads = attention.num_query_heads
        score_scale = 1.0 / math.sqrt(attention.hidden_dim // heads)
    return {"interleave_rope": True, "score_scale": score_scale}


def converted_attention(attention, dense_names, rope_name, favor_options):
    """A `FavorRotaryAttention` with the configuration and the weights of
    the built keras-hub attention layer `attention`."""
    rope = getattr(attention, rope_name)
    query, key, _, output = (getattr(attention, n) for n in dense_names)
    arguments = dict(
        num_query_heads=attention.num_query_heads,
        num_key_value_heads=attention.num_key_value_heads,
        head_dim=query.kernel.shape[-1],
        query_equation=query.equation,
        key_equation=key.equation,
        output_equation=output.equation,
        query_bias_axes=query.bias_axes,
        key_bias_axes=key.bias_axes,
        kernel_initializer=query.kernel_initializer,
        bias_initializer=query.bias_initializer,
        dropout=attention.dropout,
        dtype=attention.dtype_policy,
        name=attention.name,
        **_rope_arguments(attention, rope),
    )
    if isinstance(attention, CachedGemmaAttention):
        arguments.update(_gemma_arguments(attention))
    _check_defaults(attention, {"use_sliding_window_attention": False})
    arguments.update(favor_options)
    favor = FavorRotaryAttention(**arguments)
    favor.build(query.get_build_config()["input_shape"])
    favor.load_attention_weights(attention, dense_names)
    return favor


def check_convertible(decoder):
    """A `ValueError` naming the attention of the rotary `decoder` if an
    option of it has no FAVOR+ form (checked before anything changes)."""
    attribute, _, dense_names, rope_name = FAMILIES[type(decoder)]
    attention = getattr(decoder, attribute)
    _rope_arguments(attention, getattr(attention, rope_name))
    if isinstance(attention, CachedGemmaAttention):
        _gemma_arguments(attention)
    _check_defaults(attention, {"use_sliding_window_attention": False})


_CLASSES = {}


def favor_rotary_decoder_class(decoder_class):
    """The registered `FavorRotaryDecoder` subclass of the keras-hub
    decoder class `decoder_class`, `Favor<ClassName>`, made once."""
    if decoder_class not in _CLASSES:
        name = "Favor" + decoder_class.__name__
        new_class = type(
            name,
            (FavorRotaryDecoder, decoder_class),
            {"__module__": __name__, "__qualname__": name},
        )
        _CLASSES[decoder_class] = keras.saving.register_keras_serializable(
            package="keras_favor"
        )(new_class)
    return _CLASSES[decoder_class]


def convert_in_place(decoder, favor_options):
    """Makes the built keras-hub Llama or Gemma decoder `decoder` its
    `FavorRotaryDecoder` subclass, its attention a `FavorRotaryAttention`
    with the same weights. Used where the decoder is a node of a
    backbone's fixed graph, which cannot take a new layer object."""
    decoder_class = type(decoder)
    attribute, attention_class, dense_names, rope_name = FAMILIES[decoder_class]
    attention = getattr(decoder, attribute)
    if type(attention) is not attention_class:
        raise ValueError(
            f"The {decoder_class.__name__} {decoder.name!r} holds a "
            f"{type(attention).__name__}, not a {attention_class.__name__}: "
            "its own call would be lost in conversion, so it does not "
            "convert."
        )
    favor = converted_attention(
        attention, dense_names, rope_name, favor_options
    )
    swap_attention(decoder, {attribute: favor})
    # The class changes to a subclass that adds methods; every other
    # sub-layer and weight stays.
    decoder.__class__ = favor_rotary_decoder_class(decoder_class)
    return decoder
