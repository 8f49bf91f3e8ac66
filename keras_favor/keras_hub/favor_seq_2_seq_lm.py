"""`FavorSeq2SeqLM`: keras-hub's `generate()` for a converted
encoder-decoder task (BART), the decoder's FAVOR+ state as its cache."""

import keras
import keras_hub
from keras import ops

from keras_favor.keras_hub.favor_causal_lm import generated_mask
from keras_favor.keras_hub.favor_causal_lm import sampler_next

_CLASSES = {}


class FavorSeq2SeqLM:
    """The converted form of a keras-hub Seq2SeqLM class (BART): mixed in
    before it (`favor_seq_2_seq_lm_class`), it runs keras-hub's
    `generate()` and samplers on the converted decoders' recurrent state,
    feeding each decoder position once as `FavorCausalLM` does.

    The encoder runs once, and each decoder's cross-attention reduces its
    output once to a static cache of key sums
    (`FavorTransformerDecoder.encoder_cache`): a step's cost does not grow
    with the encoder's length, and the steps do not read the encoder's
    output. (With a feature map that has no static cache, FAVOR++, the
    encoder's output travels in the cache and each step reads it.)
    """

    def _check_generation(self):
        layers = getattr(self.backbone, "decoder_transformer_layers", None)
        if not layers or not hasattr(self, "call_decoder_with_cache"):
            raise ValueError(
                f"{type(self).__name__}.generate() is not supported after "
                "conversion: keras_favor generates with encoder-decoder "
                "tasks whose backbone has `decoder_transformer_layers` and "
                "whose task has `call_encoder` and `call_decoder_with_cache` "
                "(as BART's)."
            )

    def _decoder_state(self, batch_size):
        return ops.stack(
            [
                layer.empty_cache(batch_size, packed=True)
                for layer in self.backbone.decoder_transformer_layers
            ],
            axis=1,
        )

    def _cross_attention_caches(self, encoded, encoder_mask):
        """The decoders' static encoder caches stacked `(B, layers, P)`,
        and in place of the encoder's output an empty `(B, 0, dim)`; or,
        when a decoder has no static cache, the encoder's output and
        empty caches that make each step read it."""
        layers = self.backbone.decoder_transformer_layers
        batch_size = ops.shape(encoded)[0]
        if not all(layer.supports_static_cross_cache for layer in layers):
            return encoded, ops.zeros((batch_size, len(layers), 0))
        caches = ops.stack(
            [layer.encoder_cache(encoded, encoder_mask) for layer in layers],
            axis=1,
        )
        return encoded[:, :0], caches

    def _feed(self, token_ids, cache, position, is_real):
        """The decoder's cached call on the token at `position` of each
        sequence; sequences where `is_real` is False keep their state."""
        state, encoded, encoder_mask, placeholder = cache
        batch_size = ops.shape(token_ids)[0]
        token = ops.slice(token_ids, [0, position], [batch_size, 1])
        logits, hidden_states, new_state, _ = self.call_decoder_with_cache(
            encoder_hidden_states=encoded,
            encoder_padding_mask=encoder_mask,
            decoder_token_ids=token,
            self_attention_cache=state,
            self_attention_cache_update_index=position,
            cross_attention_cache=placeholder,
            cross_attention_cache_update_index=None,
        )
        new_state = ops.where(is_real[:, None, None], new_state, state)
        return (
            logits,
            hidden_states,
            (new_state, encoded, encoder_mask, placeholder),
        )

    def generate_step(self, inputs, stop_token_ids=None):
        """keras-hub's generation of one batch, each decoder position
        entering the recurrent state once."""
        self._check_generation()
        encoder_mask = inputs["encoder_padding_mask"]
        token_ids = inputs["decoder_token_ids"]
        padding_mask = ops.cast(inputs["decoder_padding_mask"], "bool")
        batch_size = ops.shape(token_ids)[0]
        encoded = self.call_encoder(
            token_ids=inputs["encoder_token_ids"], padding_mask=encoder_mask
        )
        encoded, placeholder = self._cross_attention_caches(
            encoded, encoder_mask
        )
        cache = (
            self._decoder_state(batch_size),
            encoded,
            encoder_mask,
            placeholder,
        )
        first_free = ops.min(ops.sum(ops.cast(padding_mask, "int32"), axis=-1))

        def prefill(position, cache):
            _, _, cache = self._feed(
                token_ids, cache, position, padding_mask[:, position]
            )
            return position + 1, cache

        _, cache = ops.while_loop(
            lambda position, cache: position < first_free - 1,
            prefill,
            (ops.zeros((), "int32"), cache),
        )

        token_ids = self.sampler(
            next=sampler_next(self._feed, padding_mask, first_free),
            prompt=token_ids,
            cache=cache,
            index=first_free,
            mask=padding_mask,
            stop_token_ids=stop_token_ids,
            hidden_states=None,
            model=self,
        )
        return {
            "decoder_token_ids": token_ids,
            "decoder_padding_mask": generated_mask(
                token_ids, padding_mask, stop_token_ids
            ),
        }


def favor_seq_2_seq_lm_class(task_class):
    """The registered `FavorSeq2SeqLM` subclass of the keras-hub Seq2SeqLM
    class `task_class`, `Favor<ClassName>`, made once."""
    if issubclass(task_class, FavorSeq2SeqLM):
        return task_class
    if task_class not in _CLASSES:
        name = "Favor" + task_class.__name__
        new_class = type(
            name,
            (FavorSeq2SeqLM, task_class),
            {"__module__": __name__, "__qualname__": name},
        )
        _CLASSES[task_class] = keras.saving.register_keras_serializable(
            package="keras_favor"
        )(new_class)
    return _CLASSES[task_class]


def register_seq_2_seq_lm_classes():
    """Registers the converted class of every Seq2SeqLM that keras-hub
    exports."""
    for value in vars(keras_hub.models).values():
        if (
            isinstance(value, type)
            and issubclass(value, keras_hub.models.Seq2SeqLM)
            and value is not keras_hub.models.Seq2SeqLM
        ):
            favor_seq_2_seq_lm_class(value)
