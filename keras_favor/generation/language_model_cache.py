"""The cached forward pass of a `build_performer` language model.

A causal language model from `build_performer(task="language_model")`
(functional or sequential) is a chain: `TokenAndPositionEmbedding`, a
dropout, causal `PerformerBlock`s, an optional final normalization and the
logits. Decoding runs the same layers on the new positions only, each block
reading and returning its cache: FAVOR+'s recurrent state (the same size at
every position) or, for `attention="exact"`, a key/value cache of
`max_length` positions.
"""

import keras
from keras import ops

from keras_favor import validation
from keras_favor.layers.performer_block import PerformerBlock
from keras_favor.models.token_and_position_embedding import (
    TokenAndPositionEmbedding,
)

_WITHOUT_POSITIONS = (keras.layers.LayerNormalization, keras.layers.Dense)


def _not_a_language_model(model, reason):
    return ValueError(
        "Decoding with a cache needs a causal language model as "
        "`build_performer(task='language_model')` builds it: "
        "TokenAndPositionEmbedding, causal PerformerBlocks, then "
        f"normalization and logits, one after another. {reason} "
        f"Received: model={getattr(model, 'name', model)!r}"
    )


def language_model_layers(model):
    """The layers of `model` in order, checked: a `ValueError` naming the
    problem unless it is a causal language model (module docstring).

    Returns:
        `(embedding, layers)`: the `TokenAndPositionEmbedding` and the
        layers after it, dropouts left out (decoding runs without them).
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            "`model` must be a keras.Model from `build_performer`. "
            f"Received: model={model!r}"
        )
    layers = [
        layer
        for layer in model.layers
        if not isinstance(layer, (keras.layers.InputLayer,))
    ]
    if not layers or not isinstance(layers[0], TokenAndPositionEmbedding):
        raise _not_a_language_model(
            model, "Its first layer is not a TokenAndPositionEmbedding."
        )
    rest = [
        layer
        for layer in layers[1:]
        if not isinstance(layer, keras.layers.Dropout)
    ]
    blocks = [layer for layer in rest if isinstance(layer, PerformerBlock)]
    if not blocks:
        raise _not_a_language_model(model, "It has no PerformerBlock.")
    for layer in rest:
        if isinstance(layer, PerformerBlock):
            if not layer.causal:
                raise _not_a_language_model(
                    model, f"Its block {layer.name!r} is not causal."
                )
        elif not isinstance(layer, _WITHOUT_POSITIONS):
            raise _not_a_language_model(
                model,
                f"Its layer {layer.name!r} ({type(layer).__name__}) is not "
                "one of these.",
            )
    if not isinstance(rest[-1], keras.layers.Dense):
        raise _not_a_language_model(model, "Its last layer is not Dense.")
    return layers[0], rest


def max_length(model):
    """The most positions `model` embeds (`build_performer`'s
    `max_length`)."""
    embedding, _ = language_model_layers(model)
    return embedding.sequence_length


def empty_cache(model, batch_size):
    """The cache of `batch_size` sequences before any token.

    Args:
        model: a language model from `build_performer(task=
            "language_model")`, functional or sequential, built.
        batch_size: int.

    Returns:
        A tuple with one cache per `PerformerBlock`
        (`PerformerBlock.empty_cache`): FAVOR+'s recurrent state, or for
        exact attention a key/value cache of `max_length` positions.
    """
    embedding, layers = language_model_layers(model)
    batch_size = validation.batch_size(batch_size)
    return tuple(
        layer.empty_cache(batch_size, embedding.sequence_length)
        for layer in layers
        if isinstance(layer, PerformerBlock)
    )


def call_with_cache(
    model, token_ids, cache, cache_update_index, padding_mask=None
):
    """The language model's logits for the positions after `cache`.

    Token `i` of `token_ids` is position `cache_update_index + i`; it sees
    the positions before it, from `cache`, and the new tokens up to itself.
    Run in pieces, each given the cache the previous one returned, a
    sequence gets the logits of one call of `model` over the whole of it
    (to float32 round-off). Dropout is off.

    Args:
        model: a language model from `build_performer(task=
            "language_model")`.
        token_ids: `(batch, length)` int token ids.
        cache: `empty_cache(model, batch)` or a cache this function
            returned.
        cache_update_index: int or scalar int tensor, the number of
            positions in `cache` (the position of `token_ids[:, 0]`);
            `cache_update_index + length` may not exceed `max_length`
            (checked when it is an int).
        padding_mask: optional `(batch, length)` bool, False at padding
            (left padding of a prompt): padded positions are no keys of any
            later position. Defaults to `token_ids != 0` for a model built
            with `mask_zero=True`, and to no padding otherwise.

    Returns:
        `(logits, new_cache)`: `(batch, length, vocabulary_size)` logits and
        the cache after the last position.
    """
    embedding, layers = language_model_layers(model)
    token_ids = ops.convert_to_tensor(token_ids, "int32")
    blocks = [layer for layer in layers if isinstance(layer, PerformerBlock)]
    if not isinstance(cache, (tuple, list)) or len(cache) != len(blocks):
        raise ValueError(
            f"`cache` must hold one cache per PerformerBlock ({len(blocks)} "
            "here), as `empty_cache(model, batch_size)` returns it. "
            f"Received: {type(cache).__name__} of "
            f"{len(cache) if isinstance(cache, (tuple, list)) else 1}"
        )
    if padding_mask is None and embedding.mask_zero:
        padding_mask = ops.not_equal(token_ids, 0)
    if padding_mask is not None:
        padding_mask = ops.cast(padding_mask, "bool")
    x = embedding(token_ids, start_index=cache_update_index)
    caches = iter(cache)
    new_cache = []
    for layer in layers:
        if isinstance(layer, PerformerBlock):
            x, layer_cache = layer(
                x,
                mask=padding_mask,
                cache=next(caches),
                cache_update_index=cache_update_index,
            )
            new_cache.append(layer_cache)
        else:
            x = layer(x)
    return x, tuple(new_cache)
