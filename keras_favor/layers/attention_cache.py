"""Decoding caches of the attention layers: the checks they share and
`FavorAttention`'s causal state."""

import math

from keras_favor.layers import attention_arguments
from keras_favor.ops import causal_state
from keras_favor.validation import batch_size as validation_batch_size
from keras_favor.validation import is_int
from keras_favor.validation import positive_int


def check_causal_self_attention(query, value, key, use_causal_mask):
    """A cache holds the keys of causal self-attention over one position
    axis: a `ValueError` for any other call."""
    if not use_causal_mask:
        raise ValueError(
            "A `cache` holds the keys so far: call with "
            "`use_causal_mask=True`. Bidirectional queries also see later "
            "keys, which no cache holds."
        )
    if any(x is not None and x is not query for x in (value, key)):
        raise ValueError(
            "A `cache` is for causal self-attention: pass `query` alone "
            "(no `value` or `key`); cross-attention has no decoding cache."
        )
    if len(query.shape) != 3:
        raise ValueError(
            "A `cache` needs queries of shape (batch, length, dim), one "
            f"position axis. Received: query.shape={tuple(query.shape)}"
        )


def _sizes(layer):
    """`layer`'s number of features and value size."""
    features = layer.feature_map.feature_dim(layer.num_features, layer.key_dim)
    return features, layer.value_dim or layer.key_dim


def empty_favor_state(layer, batch_size, max_length=None):
    """`FavorAttention.empty_cache`: `layer`'s causal state of `batch_size`
    sequences before any key, as a plain tuple; with a local window,
    keeping `min(w, max_length)` keys."""
    batch_size = validation_batch_size(batch_size)
    max_length = positive_int(max_length, "max_length", allow_none=True)
    features, value_dim = _sizes(layer)
    if layer.local_window:
        state = causal_state.empty_local_window_state(
            batch_size,
            layer.num_heads,
            features,
            layer.key_dim,
            value_dim,
            min(layer.local_window, max_length or math.inf),
        )
    else:
        state = causal_state.empty_causal_state(
            batch_size, layer.num_heads, features, value_dim
        )
    return tuple(state)


def check_favor_state(layer, query, cache, cache_update_index=None):
    """A `ValueError` naming the tensor unless `cache` has the shapes of
    `layer.empty_cache` for `query`'s batch size (and the positions fit a
    window cache made for fewer than the window's)."""
    sizes = (query.shape[0], layer.num_heads, *_sizes(layer))
    if layer.local_window:
        # Any number of kept keys up to the window (`max_length`), checked
        # by `_check_window_slots`.
        shapes = causal_state.LocalWindowState.shapes(
            *sizes[:3], layer.key_dim, sizes[3], None
        )
    else:
        shapes = causal_state.CausalState.shapes(*sizes)
    causal_state.check_state(cache, shapes, "cache", "empty_cache(batch_size)")
    if layer.local_window:
        _check_window_slots(
            layer.local_window, cache, query, cache_update_index
        )


def _check_window_slots(window, cache, query, cache_update_index):
    """A window cache keeps at most `window` keys, and one of fewer keys
    (`empty_cache`'s `max_length`) serves that many positions: a key pushed
    out of it before it is `window` positions old would be lost."""
    slots = causal_state.LocalWindowState(*cache).window_keys.shape[2]
    if slots is None or slots == window:
        return
    if slots > window:
        raise ValueError(
            f"`cache` keeps {slots} keys, more than `local_window` "
            f"({window}): it is not this layer's "
            "`empty_cache(batch_size, max_length)`."
        )
    length = query.shape[1]
    if is_int(cache_update_index) and length is not None:
        if cache_update_index + length > slots:
            raise ValueError(
                f"`cache_update_index` ({cache_update_index}) and the "
                f"{length} new positions pass the {slots} positions the "
                "cache was made for (`empty_cache`'s `max_length`)."
            )


def checked_inputs(
    layer,
    query,
    value,
    key,
    return_attention_scores,
    use_causal_mask,
    cache,
    cache_update_index,
    **masks,
):
    """The checks of `FavorAttention`'s `call` and `compute_output_spec`
    (a `cache` only in causal self-attention, of `layer`'s state shapes):
    `value` and `key` with their defaults filled in, and the combined key
    mask (`attention_arguments.call_inputs`)."""
    if cache is not None:
        check_causal_self_attention(query, value, key, use_causal_mask)
        check_favor_state(layer, query, cache, cache_update_index)
    return attention_arguments.call_inputs(
        query, value, key, return_attention_scores, **masks
    )
