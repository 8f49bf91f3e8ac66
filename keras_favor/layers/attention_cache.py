"""Decoding caches of the attention layers: the checks they share and
`FavorAttention`'s causal state."""

from keras_favor import ops as favor_ops
from keras_favor.validation import batch_size as validation_batch_size
from keras_favor.validation import check_cache_shapes


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
    features = layer.feature_map.feature_dim(layer.num_features, layer.key_dim)
    return features, layer.value_dim or layer.key_dim


def empty_favor_state(layer, batch_size):
    """`FavorAttention.empty_cache`: `layer`'s causal state of `batch_size`
    sequences before any key."""
    batch_size = validation_batch_size(batch_size)
    features, value_dim = _sizes(layer)
    if layer.local_window:
        return favor_ops.empty_local_window_state(
            batch_size, layer.num_heads, features, layer.key_dim, value_dim,
            layer.local_window,
        )
    return favor_ops.empty_causal_state(
        batch_size, layer.num_heads, features, value_dim
    )


def check_favor_state(layer, query, cache):
    """A `ValueError` naming the tensor unless `cache` has the shapes of
    `layer.empty_cache` for `query`'s batch size."""
    batch = query.shape[0]
    heads = (batch, layer.num_heads)
    features, value_dim = _sizes(layer)
    shapes = [
        heads + (features, value_dim), heads + (features,),
        heads + (features,),
    ]
    if layer.local_window:
        window = layer.local_window
        shapes += [
            heads + (window, layer.key_dim), heads + (window, value_dim),
            (batch, 1, window),
        ]
    check_cache_shapes(cache, shapes, "query", "empty_cache(batch_size)")
