"""Causal linear attention in chunks, all features of a key at one level.

The kernel behind `causal_linear_attention` for whole chunks of positions:
each key's features are shifted by one stabilizer level, the running
maximum of the keys' largest log-scales so far, so that every factor is at
most 1 (docs/numerics.md, section 5). Inside a chunk of `C` positions the
masked `C x C` product is formed; across chunks the prefix sums come from
`chunk_scan.inherited_states`. Where one level per key loses a query's
normalizer, `log_domain_causal` computes the same with a level per feature.
"""

from keras import ops

from keras_favor.ops import causal_state
from keras_favor.ops import stabilizers
from keras_favor.ops.chunk_scan import earlier_or_same
from keras_favor.ops.chunk_scan import inherited_states
from keras_favor.ops.chunk_scan import merge_chunks
from keras_favor.ops.chunk_scan import running_max
from keras_favor.ops.chunk_scan import split_chunks
from keras_favor.ops.feature_dropout import numerator_key_features
from keras_favor.ops.products import matmul_transposed_a
from keras_favor.ops.products import matmul_transposed_b


def one_level_causal_attention(
    query_parts,
    key_parts,
    value,
    mask,
    state,
    chunk_size,
    dropout_rate=0.0,
    dropout_seed=None,
    prefix_block=2,
):
    """Causal attention parts of whole chunks from a carried state, each key
    at one stabilizer level.

    Args:
        query_parts, key_parts: `(values, log_scale)` feature parts of the
            `(B, H, L, d)` queries and keys, `L` a multiple of `chunk_size`.
        value: `(B, H, L, D)`.
        mask: bool `(B, 1, L)`, True at real keys, or None.
        state: the `CausalState` before position 0, or None for no key
            before it (the empty state, whose terms are then left out).
        chunk_size: int, positions per chunk.
        dropout_rate, dropout_seed: key-feature dropout of the numerator.
        prefix_block: int >= 2, chunks per block of the prefix scan.

    Returns:
        `(parts, state)`: the attention parts `(numerator, denominator,
        shift)`, as `causal_linear_attention(..., normalized=False)` returns
        them, and the `CausalState` after the last key.
    """
    start = None if state is None else causal_state.one_level(state)
    key_feats, levels, log_key_feats = _key_features(
        *key_parts, mask, None if start is None else start.level, chunk_size
    )
    dropped = numerator_key_features(key_feats, dropout_rate, dropout_seed)
    parts, end = _chunk_parts(
        query_parts,
        dropped,
        key_feats,
        log_key_feats,
        levels,
        value,
        chunk_size,
        start,
        prefix_block,
    )
    return parts, causal_state.per_feature(causal_state.CausalState(*end))


def _key_features(values, log_scale, mask, initial_level, chunk_size):
    """Key features shifted by the running max of the keys seen so far.

    Key `s` is scaled by `exp(-max(initial_level, max_{s' <= s} level_s'))`,
    so no key is scaled by anything it has not seen (docs/numerics.md,
    section 5).

    Returns:
        `(features, levels, log_features)`: features `(B, H, S, F)`, the
        running max `(B, H, S)` used as each key's shift, and the features'
        logarithm where they are purely exponential (`values is None`),
        else None.
    """
    if log_scale is None:
        features = stabilizers.shifted_key_features(values, None, None, mask)
        return features, ops.zeros(ops.shape(features)[:-1]), None
    levels = running_max(
        stabilizers.row_log_level(log_scale, mask), chunk_size, initial_level
    )
    exponent = stabilizers.key_exponent(log_scale, levels[..., None], mask)
    log_features = exponent if values is None else None
    return (
        stabilizers.exp_times_values(values, exponent),
        levels,
        log_features,
    )


def _chunk_parts(
    query_parts,
    key_feats,
    key_sum_feats,
    log_key_feats,
    levels,
    value,
    chunk_size,
    state,
    prefix_block,
):
    """Chunked causal attention over whole chunks, from a carried state.

    Inside a chunk of `C` positions the masked `C x C` product is formed;
    across chunks the prefix sums of `K'^T V` and `K'^T 1` come from
    `inherited_states`. The normalizer's sums are one more column of the
    values, `[V, 1]`, so that every product serves numerator and
    normalizer at once; under feature dropout, whose numerator has other
    key features, they run as a second pair `(K', 1)`.

    Args:
        query_parts: `(values, log_scale)` of the queries.
        key_feats: `(B, H, L, F)` key features for the numerator.
        key_sum_feats: key features for the normalizer (differs from
            `key_feats` only under feature dropout).
        log_key_feats: `log(key_sum_feats)` where the features are purely
            exponential, else None.
        levels: `(B, H, L)` running max each key was shifted by.
        value: `(B, H, L, D)`.
        chunk_size: int.
        state: the carried `CausalState` in its `one_level` form, or None.
        prefix_block: int, chunks per block of the prefix scan.

    Returns:
        `(parts, state)`: the attention parts of the queries and the state
        after the last key, in the same form.
    """
    ones = ops.ones_like(value[..., :1])
    if key_sum_feats is key_feats:
        pairs = [(key_feats, ops.concatenate([value, ones], axis=-1))]
    else:
        pairs = [(key_feats, value), (key_sum_feats, ones)]
    pairs = [tuple(split_chunks(x, chunk_size) for x in p) for p in pairs]
    levels = split_chunks(levels, chunk_size)

    # Each chunk's sums, scaled to the level at its last position. The
    # per-key scale goes on the narrower factor, v, not on k.
    chunk_level = levels[..., -1]
    to_chunk_end = ops.exp(levels - chunk_level[..., None])[..., None]
    # One chunk and no carried state: nothing to inherit.
    alone = state is None and chunk_level.shape[-1] == 1
    scans = [
        (_first_and_only_chunk if alone else inherited_states)(
            matmul_transposed_a(k, v * to_chunk_end),
            None,
            chunk_level,
            carried,
            prefix_block,
        )
        for (k, v), carried in zip(pairs, _carried_columns(state, len(pairs)))
    ]
    level = scans[0][2]
    key_sum = scans[-1][0][..., -1]

    # What query t surely sees: the inherited sum and its own key.
    key_sum_log_bounds = [
        (
            stabilizers.log_key_sum(key_sum)[:, :, :, None],
            level[..., None] - levels,
        )
    ]
    if log_key_feats is not None:
        key_sum_log_bounds.append(
            (split_chunks(log_key_feats, chunk_size), None)
        )
    q, query_shift = stabilizers.query_features(
        *(
            None if x is None else split_chunks(x, chunk_size)
            for x in query_parts
        ),
        key_sum_log_bounds,
        return_shift=True,
    )

    # Inside a chunk, query t sees key s <= t at relative scale
    # exp(level_s - level_t) <= 1.
    relative = levels[..., None, :] - levels[..., :, None]
    decay = ops.exp(
        ops.where(
            earlier_or_same(chunk_size), relative, stabilizers.NO_KEY_LEVEL
        )
    )
    sums = [ops.matmul(matmul_transposed_b(q, k) * decay, v) for k, v in pairs]
    if not alone:
        # The inherited sums rescaled to each position's own level (<= 1).
        inherited = ops.exp(level[..., None] - levels)[..., None]
        sums = [
            x + ops.matmul(q, kv) * inherited
            for x, (kv, *_) in zip(sums, scans)
        ]
    value_dim = value.shape[-1]
    if len(sums) == 1:
        # A split, whose gradient is one concatenation (slices' add up).
        sums = ops.split(sums[0], [value_dim], axis=-1)
    # Every product reached query t times exp(-(query shift + level_t)).
    parts = (sums[0], sums[1][..., 0], query_shift + levels)
    return [merge_chunks(x) for x in parts], _final_state(
        [scan[3] for scan in scans], value_dim
    )


def _first_and_only_chunk(chunk_kv, chunk_sum, chunk_level, state, _):
    """`inherited_states` of one chunk without a carried state: zero sums
    inherited at `NO_KEY_LEVEL`, and the chunk's own sums as the state."""
    del chunk_sum, state
    return (
        ops.zeros_like(chunk_kv),
        None,
        ops.full_like(chunk_level, stabilizers.NO_KEY_LEVEL),
        (chunk_kv[:, :, 0], None, chunk_level[..., 0]),
    )


def _carried_columns(state, num_pairs):
    """The carried one-level state as the scans' states `(sums, None,
    level)`: `[K'^T V, K'^T 1]` as one, or (two pairs) each alone."""
    if state is None:
        return [None] * num_pairs
    kv, key_sum, level = state
    key_sum = key_sum[..., None]
    if num_pairs == 1:
        return [(ops.concatenate([kv, key_sum], axis=-1), None, level)]
    return [(kv, None, level), (key_sum, None, level)]


def _final_state(scan_states, value_dim):
    """The `(K'^T V, K'^T 1, level)` state from the scans' final states."""
    kv, _, level = scan_states[0]
    return kv[..., :value_dim], scan_states[-1][0][..., -1], level
