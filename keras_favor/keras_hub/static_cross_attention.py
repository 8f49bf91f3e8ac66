"""A converted decoder's cross-attention from its static encoder cache.

While a decoder generates, the encoder's keys and values stay fixed: its
FAVOR+ cross-attention reduces them once to the key sums `K'^T V` and
`K'^T 1` (with their per-feature shifts), and each new token's query only
meets these sums. A step then costs `features x head_dim` per head,
whatever the encoder's length, and never reads the encoder's output.
"""

import math

from keras import ops

from keras_favor import ops as favor_ops
from keras_favor.layers import favor_kernels


def supports_static_cache(attention):
    """Whether `attention` (a `FavorAttention`) can attend from key sums
    taken without its queries: not with a map whose coefficient depends
    on the queries (FAVOR++) nor with a local window (which compares
    query and key positions)."""
    return not (attention.feature_map.uses_statistics or attention.local_window)


def _check_supported(attention):
    if not supports_static_cache(attention):
        raise ValueError(
            "A static cross-attention cache needs key sums that do not "
            "depend on the queries: not a statistics feature map "
            "(FAVOR++) nor a `local_window`. Received: feature_map="
            f"{attention.feature_map!r}, local_window={attention.local_window}"
        )


def _heads(x):
    """`(B, T, N, h)` float32 heads as `(B, N, T, h)`."""
    return ops.transpose(ops.cast(x, "float32"), (0, 2, 1, 3))


def _sum_shapes(attention):
    """The shapes of the key sums without the batch axis."""
    heads = attention.num_heads
    features = attention.feature_map.feature_dim(
        attention.num_features, attention.key_dim
    )
    value_dim = attention.value_dim or attention.key_dim
    return [(heads, features, value_dim), (heads, features), (heads, features)]


def packed_size(attention):
    """The length of `attention`'s static cache packed per sequence."""
    return sum(math.prod(shape) for shape in _sum_shapes(attention))


def encoder_cache(attention, encoder_sequence, encoder_padding_mask=None):
    """`attention`'s static cache for `encoder_sequence`.

    Args:
        attention: the built cross-attention `FavorAttention`.
        encoder_sequence: `(B, S, dim)`, the encoder's output.
        encoder_padding_mask: `(B, S)`, True (or 1) at real positions, or
            None.

    Returns:
        `(B, P)` float32: the key sums, flattened per sequence.
    """
    _check_supported(attention)
    x = ops.copy(encoder_sequence)
    key = _heads(attention.key_dense(x))
    value = _heads(attention.value_dense(x))
    mask = None
    if encoder_padding_mask is not None:
        mask = ops.cast(encoder_padding_mask, "bool")[:, None, :]
    feature_fn, _ = favor_kernels.feature_fns(attention)
    sums = favor_ops.bidirectional_key_sums(key, value, feature_fn, mask)
    batch = ops.shape(key)[0]
    return ops.concatenate([ops.reshape(s, (batch, -1)) for s in sums], axis=1)


def _unpack(attention, cache):
    batch = ops.shape(cache)[0]
    sums, start = [], 0
    for shape in _sum_shapes(attention):
        size = math.prod(shape)
        sums.append(
            ops.reshape(cache[:, start : start + size], (batch,) + shape)
        )
        start += size
    return tuple(sums)


def attend_to_encoder_cache(attention, query, cache):
    """`attention(query, encoder_sequence)` from the encoder's static
    `cache` (`encoder_cache`), without the encoder's output.

    Args:
        attention: the built cross-attention `FavorAttention`.
        query: `(B, T, dim)`, the decoder's positions.
        cache: `(B, P)`, from `encoder_cache`.

    Returns:
        `(B, T, dim)` in the layer's compute dtype.
    """
    _check_supported(attention)
    size = packed_size(attention)
    if cache.shape[-1] != size:
        raise ValueError(
            "`cross_attention_cache` must be the `(batch, "
            f"{size})` static cache of this cross-attention "
            "(`FavorTransformerDecoder.encoder_cache`). Received: shape "
            f"{tuple(cache.shape)}"
        )
    _, query_feature_fn = favor_kernels.feature_fns(attention)
    outputs = favor_ops.attend_to_bidirectional_key_sums(
        _heads(attention.query_dense(ops.copy(query))),
        _unpack(attention, ops.cast(cache, "float32")),
        query_feature_fn,
    )
    outputs = ops.transpose(outputs, (0, 2, 1, 3))
    return attention._output_dense(ops.cast(outputs, attention.compute_dtype))
