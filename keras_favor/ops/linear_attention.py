"""Numerically stable linear attention, bidirectional and causal.

Tensors are laid out `(batch, heads, length, channels)` and computed in
float32. Features arrive as `(values, log_scale)` pairs from
`FeatureMap.log_scaled`, `phi = values * exp(log_scale)`, and every shift
subtracted from `log_scale` here cancels exactly in the ratio
`phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1)` (favor-math.md, section 4).
"""

import tensorflow as tf
import tensorflow_probability as tfp

# Stands for "no key yet" in running maxima: finite, so differences of it
# stay finite, and exp of (anything real) - 1e30 is exactly 0.
NO_KEY_LEVEL = -1e30
# Guards the normalizer of a query that sees no key (fully padded rows).
EPSILON = 1e-6


def exp_times_values(values, exponent):
    scale = tf.exp(exponent)
    return scale if values is None else values * scale


def row_log_level(log_scale):
    """The largest log-scale of each row (position), shape `(B, H, L)`."""
    return tf.reduce_max(log_scale, axis=-1)


def query_features(values, log_scale):
    """Query features shifted by their own row max (cancels per query)."""
    if log_scale is None:
        return values
    shift = tf.stop_gradient(row_log_level(log_scale))[..., None]
    return exp_times_values(values, log_scale - shift)


def masked_key_features(values, log_scale, shift, mask):
    """`values * exp(log_scale - shift)`, exactly zero at masked keys.

    The exponent is masked before `exp`, so padded keys produce neither an
    overflow nor a NaN gradient.
    """
    if log_scale is None:
        features = values
    else:
        exponent = log_scale - shift[..., None]
        if mask is not None:
            exponent = tf.where(mask[..., None], exponent, NO_KEY_LEVEL)
        features = exp_times_values(values, exponent)
    if mask is not None:
        features = tf.where(mask[..., None], features, 0.0)
    return features


def masked_row_level(log_scale, mask):
    level = tf.stop_gradient(row_log_level(log_scale))
    if mask is None:
        return level
    return tf.where(mask, level, NO_KEY_LEVEL)


def bidirectional_key_features(values, log_scale, mask):
    """Key features with one shift per (batch, head): the max over valid keys.

    Args:
        values, log_scale: the key feature parts, `(B, H, S, F)` or `None`.
        mask: bool `(B, 1 or H, S)` with True at real keys, or `None`.
    """
    if log_scale is None:
        return masked_key_features(values, None, None, mask)
    level = masked_row_level(log_scale, mask)
    shift = tf.reduce_max(level, axis=-1, keepdims=True)
    # A batch row without any key gets shift 0: its features are all zero.
    shift = tf.where(shift > NO_KEY_LEVEL / 2, shift, 0.0)
    shift = tf.broadcast_to(shift, tf.shape(level))
    return masked_key_features(values, log_scale, shift, mask)


def causal_key_features(values, log_scale, mask):
    """Key features shifted by the running max of the keys so far.

    The shift of key `s` is the max over valid keys `s' <= s`, so no key is
    scaled by anything it has not seen yet (favor-math.md, section 4).

    Returns:
        `(features, levels)`: features `(B, H, S, F)` and the running max
        `(B, H, S)` used as each key's shift (zeros when `log_scale` is None).
    """
    if log_scale is None:
        features = masked_key_features(values, None, None, mask)
        return features, tf.zeros(tf.shape(features)[:-1], features.dtype)
    level = masked_row_level(log_scale, mask)
    running_max = tfp.math.scan_associative(
        tf.maximum, level, axis=-1, max_num_levels=30
    )
    return (
        masked_key_features(values, log_scale, running_max, mask),
        running_max,
    )


def normalize(numerator, denominator):
    """`numerator / denominator` with the denominator kept off zero."""
    guard = tf.where(denominator < 0.0, -EPSILON, EPSILON)
    return numerator / (denominator + guard)[..., None]


def bidirectional_linear_attention(query_feats, key_feats, values, key_feats_for_sum=None):
    """`Q'(K'^T V) / Q'(K'^T 1)` without forming any `L x S` matrix.

    Args:
        query_feats: `(B, H, L, F)`.
        key_feats: `(B, H, S, F)`, zero at masked keys; used in the
            numerator.
        values: `(B, H, S, D)`.
        key_feats_for_sum: features used for the normalizer when they differ
            from `key_feats` (feature dropout); defaults to `key_feats`.
    """
    if key_feats_for_sum is None:
        key_feats_for_sum = key_feats
    key_values = tf.einsum("bhsf,bhsd->bhfd", key_feats, values)
    key_sum = tf.reduce_sum(key_feats_for_sum, axis=2)
    numerator = tf.einsum("bhlf,bhfd->bhld", query_feats, key_values)
    denominator = tf.einsum("bhlf,bhf->bhl", query_feats, key_sum)
    return normalize(numerator, denominator)


def split_chunks(x, num_chunks, chunk_size):
    """`(B, H, L, ...)` to `(B, H, num_chunks, chunk_size, ...)`."""
    shape = tf.shape(x)
    new_shape = tf.concat(
        [shape[:2], [num_chunks, chunk_size], shape[3:]], axis=0
    )
    return tf.reshape(x, new_shape)


def pad_length(x, padding):
    rank = len(x.shape)
    paddings = [[0, 0]] * 2 + [[0, padding]] + [[0, 0]] * (rank - 3)
    return tf.pad(x, paddings)


def combine_rescaled_states(earlier, later):
    """Associative merge of `(key_values, key_sum, level)` chunk states.

    Each state is a sum of key features scaled to `exp(-level)`; merging
    rescales both to the larger level, as in online softmax.
    """
    kv_a, sum_a, level_a = earlier
    kv_b, sum_b, level_b = later
    level = tf.maximum(level_a, level_b)
    scale_a = tf.exp(level_a - level)
    scale_b = tf.exp(level_b - level)
    return (
        kv_a * scale_a[..., None, None] + kv_b * scale_b[..., None, None],
        sum_a * scale_a[..., None] + sum_b * scale_b[..., None],
        level,
    )


def causal_linear_attention(
    query_feats,
    key_feats,
    key_levels,
    values,
    chunk_size,
    key_feats_for_sum=None,
):
    """Exact causal linear attention in chunks (favor-math.md, section 5).

    Inside a chunk of `C` positions the masked `C x C` product is formed;
    across chunks, the prefix sums of `K'^T V` and `K'^T 1` are carried by a
    parallel scan. Memory grows like `L (F + D + C) + (L / C) F D`.

    Args:
        query_feats: `(B, H, L, F)`.
        key_feats: `(B, H, L, F)` from `causal_key_features`, each key scaled
            by `exp(-key_levels)`, zero at masked keys.
        key_levels: `(B, H, L)`, the non-decreasing running max of the keys.
        values: `(B, H, L, D)`.
        chunk_size: int, positions per chunk.
        key_feats_for_sum: features for the normalizer when they differ from
            `key_feats` (feature dropout); defaults to `key_feats`.
    """
    separate_sum = key_feats_for_sum is not None
    length = tf.shape(query_feats)[2]
    static_length = query_feats.shape[2]
    if static_length is not None:
        chunk_size = max(1, min(chunk_size, static_length))
    padding = (-length) % chunk_size
    num_chunks = (length + padding) // chunk_size
    # Padded positions repeat the last level so the running max stays
    # non-decreasing; their features are zero.
    key_levels = tf.concat(
        [key_levels, tf.repeat(key_levels[:, :, -1:], padding, axis=2)],
        axis=2,
    )

    def chunks(x):
        return split_chunks(pad_length(x, padding), num_chunks, chunk_size)

    q, k, v = chunks(query_feats), chunks(key_feats), chunks(values)
    k_sum = chunks(key_feats_for_sum) if separate_sum else k
    levels = split_chunks(key_levels, num_chunks, chunk_size)

    # Inside the chunk: query t sees key s <= t with relative scale
    # exp(level_s - level_t) <= 1.
    causal = tf.linalg.band_part(tf.ones((chunk_size, chunk_size), tf.bool), -1, 0)
    relative = levels[..., None, :] - levels[..., :, None]
    decay = tf.exp(tf.where(causal, relative, NO_KEY_LEVEL))
    scores = tf.einsum("bhntf,bhnsf->bhnts", q, k) * decay
    numerator = tf.einsum("bhnts,bhnsd->bhntd", scores, v)
    if separate_sum:
        sum_scores = tf.einsum("bhntf,bhnsf->bhnts", q, k_sum) * decay
    else:
        sum_scores = scores
    denominator = tf.reduce_sum(sum_scores, axis=-1)

    # Each chunk's sums, scaled to the level at its last position.
    chunk_level = levels[..., -1]
    to_chunk_end = tf.exp(levels - chunk_level[..., None])[..., None]
    chunk_kv = tf.einsum("bhnsf,bhnsd->bhnfd", k * to_chunk_end, v)
    chunk_sum = tf.reduce_sum(k_sum * to_chunk_end, axis=3)
    kv, key_sum, level = tfp.math.scan_associative(
        combine_rescaled_states,
        (chunk_kv, chunk_sum, chunk_level),
        axis=2,
        max_num_levels=24,
    )
    # What chunk c inherits is the inclusive scan up to chunk c - 1.
    kv = shift_one_chunk(kv, tf.zeros_like(kv[:, :, :1]))
    key_sum = shift_one_chunk(key_sum, tf.zeros_like(key_sum[:, :, :1]))
    level = shift_one_chunk(level, levels[:, :, :1, 0])
    inherited = tf.exp(level[..., None] - levels)
    numerator += (
        tf.einsum("bhntf,bhnfd->bhntd", q, kv) * inherited[..., None]
    )
    denominator += tf.einsum("bhntf,bhnf->bhnt", q, key_sum) * inherited
    outputs = normalize(numerator, denominator)
    outputs = tf.reshape(
        outputs, tf.concat([tf.shape(outputs)[:2], [-1, tf.shape(values)[-1]]], 0)
    )
    return outputs[:, :, :length]


def shift_one_chunk(x, first):
    """Drops the last chunk of `x` and puts `first` in front (axis 2)."""
    return tf.concat([first, x[:, :, :-1]], axis=2)
