"""`FavorCausalLM`: keras-hub's `generate()` for a converted CausalLM, with
the FAVOR+ recurrent state as its cache."""

import keras
import keras_hub
from keras import ops

_CLASSES = {}


class FavorCausalLM:
    """The converted form of a keras-hub CausalLM class (GPT-2, OPT,
    Llama, Gemma):
    mixed in before it (`favor_causal_lm_class`), it makes keras-hub's
    `generate()`, samplers and preprocessing run on the converted
    decoders' recurrent state.

    keras-hub's `generate_step` builds a key/value cache with one pass over
    the whole padded buffer, then feeds the token before the shortest
    prompt's end again and the longer prompts' tokens one by one. A slot of
    a key/value cache is simply written again; a recurrent state would
    absorb those tokens twice and the padding once. Here each position
    enters the state exactly once, in order: the positions before the
    shortest prompt's last token one at a time through the task's own
    `call_with_cache` (a prefill of constant cost per token), then each
    token that `next` feeds. A position that is padding (masked in the
    prompt and before the shortest prompt's end, as with left padding)
    leaves each sequence's state as it was; where such a position comes
    just before a generated one, its token is still read to predict it, as
    keras-hub feeds it. So greedy tokens are the argmax
    of repeated full forward passes of the converted model, and the cost
    per new token does not grow with the position.

    The cache is one `(B, num_layers, P)` float32 tensor, the layers'
    states packed (`FavorTransformerDecoder.empty_cache(packed=True)`).
    """

    def _check_generation(self):
        """A `ValueError` unless the backbone's `transformer_layers` are
        converted self-attention decoders, the layers this generation
        feeds."""
        layers = getattr(self.backbone, "transformer_layers", None)
        if not layers:
            raise ValueError(
                f"{type(self).__name__}.generate() is not supported after "
                "conversion: keras_favor generates with decoder-only "
                "keras-hub CausalLMs (such as GPT-2, OPT, Llama and "
                "Gemma), whose backbone's `transformer_layers` are "
                "self-attention decoders."
            )

    def _empty_state(self, batch_size):
        return ops.stack(
            [
                layer.empty_cache(batch_size, packed=True)
                for layer in self.backbone.transformer_layers
            ],
            axis=1,
        )

    def _feed(self, token_ids, cache, position, is_real):
        """The task's cached call on the token at `position` of each
        sequence; sequences where `is_real` is False keep their state."""
        batch_size = ops.shape(token_ids)[0]
        token = ops.slice(token_ids, [0, position], [batch_size, 1])
        logits, hidden_states, new_cache = self.call_with_cache(
            token, cache, position
        )
        new_cache = ops.where(is_real[:, None, None], new_cache, cache)
        return logits, hidden_states, new_cache

    def _prefill(self, token_ids, padding_mask, index):
        """The state after the positions before `index - 1`, and the
        backbone's hidden states of the whole buffer (for contrastive
        search)."""
        cache = self._empty_state(ops.shape(token_ids)[0])

        def body(position, cache):
            _, _, cache = self._feed(
                token_ids, cache, position, padding_mask[:, position]
            )
            return position + 1, cache

        _, cache = ops.while_loop(
            lambda position, cache: position < index - 1,
            body,
            (ops.zeros((), "int32"), cache),
        )
        hidden_states = self.backbone(
            {"token_ids": token_ids, "padding_mask": padding_mask}
        )
        return hidden_states, cache

    def generate_step(self, inputs, stop_token_ids=None):
        """keras-hub's generation of one batch (`CausalLM.generate_step`),
        each position entering the recurrent state once."""
        self._check_generation()
        token_ids = inputs["token_ids"]
        padding_mask = ops.cast(inputs["padding_mask"], "bool")
        first_free = ops.min(ops.sum(ops.cast(padding_mask, "int32"), axis=-1))
        hidden_states, cache = self._prefill(
            token_ids, padding_mask, first_free
        )

        token_ids = self.sampler(
            next=sampler_next(self._feed, padding_mask, first_free),
            prompt=token_ids,
            cache=cache,
            index=first_free,
            mask=padding_mask,
            stop_token_ids=stop_token_ids,
            hidden_states=hidden_states,
            model=self,
        )
        return {
            "token_ids": token_ids,
            "padding_mask": generated_mask(
                token_ids, padding_mask, stop_token_ids
            ),
        }


def sampler_next(feed, padding_mask, first_free):
    """The `next` function that keras-hub's samplers call: it feeds the
    token at `index - 1` through `feed(prompt, cache, position, is_real)`,
    the state absorbing it only where it is real: a prompt's token, or from
    the shortest prompt's end on (`first_free`) a sampled one."""

    def next(prompt, cache, index):
        position = index - 1
        # A beam search runs `num_beams` copies of each sequence, next to
        # each other in the batch.
        copies = ops.shape(prompt)[0] // ops.shape(padding_mask)[0]
        is_real = ops.logical_or(
            ops.repeat(padding_mask[:, position], copies, axis=0),
            position >= first_free,
        )
        logits, hidden, cache = feed(prompt, cache, position, is_real)
        return (ops.squeeze(logits, axis=1), ops.squeeze(hidden, axis=1), cache)

    return next


def generated_mask(token_ids, prompt_mask, stop_token_ids):
    """The padding mask of the generated sequences: every position, or with
    stop tokens, the positions up to and with each sequence's first stop
    token after its prompt (as keras-hub's tasks return it)."""
    if stop_token_ids is None:
        return ops.ones_like(token_ids, dtype="bool")
    is_stop = ops.zeros_like(token_ids, dtype="bool")
    for stop in stop_token_ids:
        is_stop = ops.logical_or(is_stop, ops.equal(token_ids, stop))
    is_stop = ops.cast(
        ops.logical_and(is_stop, ops.logical_not(prompt_mask)), "int32"
    )
    stops_before = ops.cumsum(is_stop, axis=-1) - is_stop
    return ops.equal(stops_before, 0)


def favor_causal_lm_class(task_class):
    """The registered `FavorCausalLM` subclass of the keras-hub CausalLM
    class `task_class`, `Favor<ClassName>`, made once."""
    if issubclass(task_class, FavorCausalLM):
        return task_class
    if task_class not in _CLASSES:
        name = "Favor" + task_class.__name__
        new_class = type(
            name,
            (FavorCausalLM, task_class),
            {"__module__": __name__, "__qualname__": name},
        )
        _CLASSES[task_class] = keras.saving.register_keras_serializable(
            package="keras_favor"
        )(new_class)
    return _CLASSES[task_class]


def register_causal_lm_classes():
    """Registers the converted class of every CausalLM that keras-hub
    exports, so a converted task's `.keras` file loads."""
    for value in vars(keras_hub.models).values():
        if (
            isinstance(value, type)
            and issubclass(value, keras_hub.models.CausalLM)
            and not issubclass(value, keras_hub.models.Seq2SeqLM)
            and (value is not keras_hub.models.CausalLM)
        ):
            favor_causal_lm_class(value)
