"""`FavorTransformerDecoder`: keras-hub's TransformerDecoder with FAVOR+
attention."""

import keras
import keras_hub

from keras_favor.keras_hub import packed_state
from keras_favor.keras_hub import static_cross_attention
from keras_favor.keras_hub.attention_swap import convert_held_attention
from keras_favor.layers.favor_options import checked_options


def _keras_mask(x):
    """The Keras mask that Keras attached to `x`, if any."""
    return getattr(x, "_keras_mask", None)


@keras.saving.register_keras_serializable(package="keras_favor")
class FavorTransformerDecoder(keras_hub.layers.TransformerDecoder):
    """keras-hub's `TransformerDecoder` with `FavorAttention` as its self-
    and cross-attention.

    The same sub-layers, weights and configuration as
    `keras_hub.layers.TransformerDecoder`, plus `favor_options`; its
    attention layers are `FavorAttention`s. keras-hub's decoder merges
    causality and padding into one dense `(B, T, T)` mask for its
    attention; this one asks its attention for causal attention
    (`use_causal_mask=True`) and passes the padding as a key mask instead.
    Recognising a causal-and-padding mask from its values would need a
    data-dependent check, which cannot raise inside a compiled function:
    asking for causality is exact by construction and never builds the
    quadratic mask. So a custom `decoder_attention_mask` or
    `encoder_attention_mask` (a general mask has no linear-time form)
    raises a `ValueError` when the layer is called.

    Decoding: the self-attention cache is `FavorAttention`'s causal state
    (a tuple whose size does not grow with the position), from
    `empty_cache`, or the same packed into one `(B, P)` float32 tensor
    (`empty_cache(batch_size, packed=True)`), the form keras-hub's
    CausalLM tasks slice and stack. keras-hub's
    `(B, 2, S, heads, head_dim)` key/value cache does not apply. Positions
    masked by `decoder_padding_mask` leave the state as it is.

    Args:
        favor_options: dict of `FavorAttention` options (`num_features`,
            `feature_map`, `seed`, `local_window`, ...) for both attention
            layers. Defaults to FavorAttention's defaults.
        **kwargs: `keras_hub.layers.TransformerDecoder`'s arguments.

    Call arguments:
        As `keras_hub.layers.TransformerDecoder`'s, except that
        `decoder_attention_mask` and `encoder_attention_mask` must be None,
        `self_attention_cache` is a FAVOR state and `cross_attention_cache`
        the cross-attention's static encoder cache (`encoder_cache`): with
        `cross_attention_cache_update_index=0` it is computed from
        `encoder_sequence` and returned; with None the cross-attention
        attends from it alone, at a cost independent of the encoder's
        length, and `encoder_sequence` is not read. A cache with an empty
        last axis is passed through, and the cross-attention then reads
        `encoder_sequence` (for feature maps that have no static cache,
        `supports_static_cross_cache` False).

    Example:

    ```python
    decoder = keras_favor.keras_hub.FavorTransformerDecoder(
        intermediate_dim=64, num_heads=2, favor_options={"seed": 0}
    )
    outputs = decoder(keras.random.normal((2, 10, 16)))
    ```
    """

    def __init__(self, *args, favor_options=None, **kwargs):
        # Set before the base class builds the layer (it does so in
        # `__init__` when the config carries the input shape).
        self._favor_options = checked_options(dict(favor_options or {}))
        super().__init__(*args, **kwargs)

    @property
    def favor_options(self):
        return dict(self._favor_options)

    def build(self, decoder_sequence_shape, encoder_sequence_shape=None):
        super().build(decoder_sequence_shape, encoder_sequence_shape)
        convert_held_attention(self, self._favor_options)

    def empty_cache(self, batch_size, max_length=None, packed=False):
        """The self-attention's causal state before any position:
        `FavorAttention.empty_cache`, packed into one `(B, P)` float32
        tensor with `packed=True`."""
        state = self._self_attention_layer.empty_cache(batch_size, max_length)
        return packed_state.pack(state) if packed else state

    @property
    def supports_static_cross_cache(self):
        """Whether the cross-attention can decode from `encoder_cache`."""
        return static_cross_attention.supports_static_cache(
            self._cross_attention_layer
        )

    def encoder_cache(self, encoder_sequence, encoder_padding_mask=None):
        """The cross-attention's static cache for `encoder_sequence`: its
        key sums, `(B, P)` float32, computed once for all decoding steps."""
        return static_cross_attention.encoder_cache(
            self._cross_attention_layer, encoder_sequence, encoder_padding_mask
        )

    def call(
        self,
        decoder_sequence,
        encoder_sequence=None,
        decoder_padding_mask=None,
        decoder_attention_mask=None,
        encoder_padding_mask=None,
        encoder_attention_mask=None,
        self_attention_cache=None,
        self_attention_cache_update_index=None,
        cross_attention_cache=None,
        cross_attention_cache_update_index=None,
        use_causal_mask=True,
        training=None,
    ):
        self._check_call(
            encoder_sequence,
            decoder_attention_mask,
            encoder_attention_mask,
            self_attention_cache,
            cross_attention_cache,
            use_causal_mask,
            cross_attention_cache_update_index,
        )
        if decoder_padding_mask is None:
            decoder_padding_mask = _keras_mask(decoder_sequence)
        x = decoder_sequence
        x, self_attention_cache = self._residual(
            x,
            self._self_attention_layer_norm,
            lambda y: self._self_attention(
                y,
                decoder_padding_mask,
                use_causal_mask,
                self_attention_cache,
                self_attention_cache_update_index,
                training,
            ),
            self._self_attention_dropout,
            training,
        )
        if self._cross_attention_layer is not None:
            if encoder_padding_mask is None:
                encoder_padding_mask = _keras_mask(encoder_sequence)
            x, cross_attention_cache = self._residual(
                x,
                self._cross_attention_layer_norm,
                lambda y: self._cross_attention(
                    y,
                    encoder_sequence,
                    encoder_padding_mask,
                    cross_attention_cache,
                    cross_attention_cache_update_index,
                    training,
                ),
                self._cross_attention_dropout,
                training,
            )
        x, _ = self._residual(
            x,
            self._feedforward_layer_norm,
            lambda y: (
                self._feedforward_output_dense(
                    self._feedforward_intermediate_dense(y)
                ),
                None,
            ),
            self._feedforward_dropout,
            training,
        )
        if self_attention_cache is None:
            return x
        if self._cross_attention_layer is not None:
            return x, self_attention_cache, cross_attention_cache
        return x, self_attention_cache

    def _residual(self, x, norm, sublayer, dropout, training):
        """`x` plus the dropped-out `sublayer` output, normalized before
        (`normalize_first`) or after, as keras-hub's decoder does; the
        sublayer's cache passes through."""
        residual = x
        if self.normalize_first:
            x = norm(x)
        x, cache = sublayer(x)
        x = dropout(x, training=training) + residual
        if not self.normalize_first:
            x = norm(x)
        return x, cache

    def _cross_attention(
        self, x, encoder_sequence, padding_mask, cache, update_index, training
    ):
        attention = self._cross_attention_layer
        if cache is not None and update_index is not None:
            cache = self.encoder_cache(encoder_sequence, padding_mask)
        if cache is None or cache.shape[-1] == 0:
            outputs = attention(
                x, encoder_sequence, value_mask=padding_mask, training=training
            )
            return outputs, cache
        outputs = static_cross_attention.attend_to_encoder_cache(
            attention, x, cache
        )
        return outputs, cache

    def _self_attention(
        self,
        x,
        padding_mask,
        use_causal_mask,
        cache,
        cache_update_index,
        training,
    ):
        attention = self._self_attention_layer
        if cache is not None:
            packed = not isinstance(cache, (tuple, list))
            if packed:
                cache = packed_state.unpack(attention, cache)
            outputs, cache = attention(
                x,
                query_mask=padding_mask,
                use_causal_mask=True,
                cache=cache,
                cache_update_index=cache_update_index,
            )
            return outputs, packed_state.pack(cache) if packed else cache
        outputs = attention(
            x,
            x,
            value_mask=padding_mask,
            use_causal_mask=use_causal_mask,
            training=training,
        )
        return outputs, None

    def _check_call(
        self,
        encoder_sequence,
        decoder_attention_mask,
        encoder_attention_mask,
        self_attention_cache,
        cross_attention_cache,
        use_causal_mask,
        cross_attention_cache_update_index,
    ):
        has_cross = self._cross_attention_layer is not None
        if has_cross != (encoder_sequence is not None):
            raise ValueError(
                "`encoder_sequence` must be passed exactly when the decoder "
                f"was built with cross-attention (it was built "
                f"{'with' if has_cross else 'without'}). Received: "
                f"encoder_sequence={encoder_sequence!r}"
            )
        for name, mask in (
            ("decoder_attention_mask", decoder_attention_mask),
            ("encoder_attention_mask", encoder_attention_mask),
        ):
            if mask is not None:
                raise ValueError(
                    f"A custom `{name}` has no linear-time form: "
                    "FavorTransformerDecoder takes causality from "
                    "`use_causal_mask` and padding from the padding masks. "
                    f"Received: {name} of shape {tuple(mask.shape)}"
                )
        index = cross_attention_cache_update_index
        if index is not None and not (isinstance(index, int) and index == 0):
            raise ValueError(
                "`cross_attention_cache_update_index` must be 0 (compute the "
                "static encoder cache) or None (attend from it): the "
                "encoder's keys are summed once, not position by position. "
                "Received: cross_attention_cache_update_index="
                f"{cross_attention_cache_update_index!r}"
            )
        if self_attention_cache is not None and not use_causal_mask:
            raise ValueError(
                "A `self_attention_cache` holds the positions so far: it "
                "needs `use_causal_mask=True`."
            )

    def get_config(self):
        config = super().get_config()
        config["favor_options"] = self.favor_options
        return config


def convert_in_place(decoder, favor_options):
    """Makes the built keras-hub `TransformerDecoder` `decoder` a
    `FavorTransformerDecoder`: its attention layers become FavorAttention
    (weights copied). Used where the decoder is a node of a backbone's
    fixed graph, which cannot take a new layer object."""
    options = checked_options(dict(favor_options))
    # The class changes to a subclass that adds methods and one attribute;
    # every sub-layer and weight stays.
    decoder.__class__ = FavorTransformerDecoder
    decoder._favor_options = options
    convert_held_attention(decoder, options)
    return decoder
