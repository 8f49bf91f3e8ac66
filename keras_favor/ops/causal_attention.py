"""Causal linear attention in chunks, with its recurrent state in and out."""

from keras import ops

from keras_favor.ops import stabilizers
from keras_favor.ops.chunk_scan import PREFIX_BLOCK
from keras_favor.ops.chunk_scan import earlier_or_same
from keras_favor.ops.chunk_scan import inherited_states
from keras_favor.ops.chunk_scan import merge_chunks
from keras_favor.ops.chunk_scan import pad_positions
from keras_favor.ops.chunk_scan import running_max
from keras_favor.ops.chunk_scan import split_chunks
from keras_favor.ops.feature_dropout import group_seed
from keras_favor.ops.feature_dropout import numerator_key_features
from keras_favor.ops.grouped_recompute import RECOMPUTE_LENGTH
from keras_favor.ops.grouped_recompute import position_groups
from keras_favor.ops.grouped_recompute import run_in_groups
from keras_favor.ops.log_domain_causal import log_domain_causal_attention
from keras_favor.ops.one_position_step import one_position_attention
from keras_favor.ops.products import matmul_transposed_a
from keras_favor.ops.products import matmul_transposed_b


def empty_causal_state(
    batch_size, num_heads, num_features, value_dim, dtype="float32"
):
    """The causal state before any key: zero sums at no level.

    Returns:
        `(key_values, key_sum, level)` of shapes `(B, H, F, D)`, `(B, H, F)`
        and `(B, H, F)`, as `causal_linear_attention` takes and returns it.
    """
    return (
        ops.zeros((batch_size, num_heads, num_features, value_dim), dtype),
        ops.zeros((batch_size, num_heads, num_features), dtype),
        ops.full(
            (batch_size, num_heads, num_features), stabilizers.NO_KEY_LEVEL,
            dtype,
        ),
    )


def _one_level_state(state):
    """A state with a level per feature at the largest of them, `(B, H)`."""
    key_values, key_sum, level = state
    top = ops.max(level, axis=-1)
    to_top = ops.exp(level - top[..., None])
    return key_values * to_top[..., None], key_sum * to_top, top


def _per_feature_state(state):
    """A state with one level, `(B, H)`, as one level per feature."""
    key_values, key_sum, level = state
    return key_values, key_sum, level[..., None] + ops.zeros_like(key_sum)


def _causal_key_features(values, log_scale, mask, initial_level, chunk_size):
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


def _causal_chunks(
    query_parts, key_feats, key_sum_feats, log_key_feats, levels, value,
    chunk_size, state, prefix_block,
):
    """Chunked causal attention over whole chunks, from a carried state.

    Inside a chunk of `C` positions the masked `C x C` product is formed;
    across chunks the prefix sums of `K'^T V` and `K'^T 1` come from
    `inherited_states`.

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
        state: the carried `(key_values, key_sum, level)`.
        prefix_block: int, chunks per block of the prefix scan.

    Returns:
        `(parts, state)`: the `attention_parts` of the queries and the state
        after the last key.
    """
    k, v, k_sum, levels = (
        split_chunks(x, chunk_size)
        for x in (key_feats, value, key_sum_feats, levels)
    )

    # Each chunk's sums, scaled to the level at its last position. The
    # per-key scale goes on the narrower factor, v, not on k.
    chunk_level = levels[..., -1]
    to_chunk_end = ops.exp(levels - chunk_level[..., None])[..., None]
    chunk_kv = matmul_transposed_a(k, v * to_chunk_end)
    chunk_sum = matmul_transposed_a(k_sum, to_chunk_end)[..., 0]
    kv, key_sum, level, final_state = inherited_states(
        chunk_kv, chunk_sum, chunk_level, state, prefix_block
    )
    # The inherited sums rescaled to each position's own level (<= 1).
    inherited = ops.exp(level[..., None] - levels)

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
        ops.where(earlier_or_same(chunk_size), relative, stabilizers.NO_KEY_LEVEL)
    )
    scores = matmul_transposed_b(q, k) * decay
    numerator = ops.matmul(scores, v)
    if key_sum_feats is not key_feats:
        scores = matmul_transposed_b(q, k_sum) * decay
    denominator = ops.sum(scores, axis=-1)

    numerator += ops.matmul(q, kv) * inherited[..., None]
    denominator += ops.einsum("bhntf,bhnf->bhnt", q, key_sum) * inherited
    # Every product reached query t times exp(-(query shift + level_t)).
    parts = (numerator, denominator, query_shift + levels)
    return [merge_chunks(x) for x in parts], final_state


def attention_parts_outputs(parts):
    """`numerator / denominator` of `(numerator, denominator, shift)`."""
    return stabilizers.normalize(parts[0], parts[1])


def _loses_a_normalizer(levels, denominator):
    """Whether a query that sees a key got a normalizer below
    `SAFE_NORMALIZER`, where the one-level algorithm may have lost terms."""
    sees_a_key = levels > 0.5 * stabilizers.NO_KEY_LEVEL
    return ops.any(
        ops.logical_and(
            sees_a_key, denominator < stabilizers.SAFE_NORMALIZER
        )
    )


def _has_feature_levels(parts, num_features):
    """Whether the feature parts have a log-scale per feature."""
    log_scale = parts[1]
    return log_scale is not None and log_scale.shape[-1] == num_features


def _check_state(state, query, value, num_features):
    if len(state) != 3:
        raise ValueError(
            "`initial_state` must be a `(key_values, key_sum, level)` tuple, "
            f"as `causal_linear_attention` returns it. Received {len(state)} "
            "tensors."
        )
    batch_heads = tuple(query.shape[:2])
    expected = (
        batch_heads + (num_features, value.shape[-1]),
        batch_heads + (num_features,),
        batch_heads + (num_features,),
    )
    for name, tensor, shape in zip(
        ("key_values", "key_sum", "level"), state, expected
    ):
        if len(tensor.shape) != len(shape) or any(
            None not in (a, b) and a != b for a, b in zip(tensor.shape, shape)
        ):
            raise ValueError(
                f"`initial_state`'s {name} must have shape {shape} for these "
                f"inputs. Received: {name}.shape={tuple(tensor.shape)}"
            )


def causal_linear_attention(
    query, key, value, feature_fn, num_features, mask=None, chunk_size=64,
    dropout_rate=0.0, dropout_seed=None, query_feature_fn=None,
    initial_state=None, return_state=False,
    recompute_length=RECOMPUTE_LENGTH, prefix_block=PREFIX_BLOCK,
    normalized=True,
):
    """Exact causal linear attention (docs/numerics.md, section 5).

    Query `t` attends to keys `s <= t`. Memory grows like
    `L (F + D + C) + (L / C) F D` for one group of up to `recompute_length`
    positions; longer sequences run group after group, carrying the prefix
    state, with the activations of every group but the last recomputed in
    the backward pass instead of stored.

    The state after the last key, `(key_values, key_sum, level)`, holds the
    running sums `phi(K)^T V` `(B, H, F, D)` and `phi(K)^T 1` `(B, H, F)`,
    each feature scaled by `exp(-level_f)`, and the running stabilizer
    levels `(B, H, F)`.
    A sequence run in pieces, each piece given the state the previous one
    returned, gives the outputs (and gradients) of the whole sequence run
    at once; a piece of one position (without dropout) is the recurrent
    step of `one_position_step`, `O(F D)` per head.

    Large input scales: keys share one stabilizer level per position and
    batch and head. Where that would lose the normalizer of a query that
    sees a key (below `SAFE_NORMALIZER`), which takes attention logits in
    the hundreds, the group of positions is computed again with one level
    per feature (`log_domain_causal`), exact to float32 round-off at any
    scale and several times slower (docs/numerics.md, section 5).

    Args:
        query, key: `(B, H, L, d)` heads; value: `(B, H, L, D)`.
        feature_fn: maps heads to `(values, log_scale)` feature parts, as
            `FeatureMap.log_scaled`.
        num_features: int, the number of features `F` that `feature_fn`
            makes.
        mask: bool `(B, 1, L)`, True at real keys, or None. A masked key
            leaves the state as it is.
        chunk_size: int, positions per chunk. It changes speed and memory,
            not the result beyond float32 round-off.
        dropout_rate: float, key-feature dropout in the numerator.
        dropout_seed: `(2,)` int stateless seed, when `dropout_rate > 0`.
        query_feature_fn: the queries' `feature_fn`; defaults to
            `feature_fn`.
        initial_state: the state before position 0, as returned with
            `return_state=True`, or None for no key yet
            (`empty_causal_state`).
        return_state: bool, whether to return the state after the last key.
        recompute_length: int, positions per group recomputed in the
            backward pass (rounded down to whole chunks).
        prefix_block: int >= 2, chunks per block of the prefix scan.
        normalized: bool. False returns, instead of the outputs, their
            attention parts `(numerator (B, H, L, D), denominator (B, H, L),
            shift (B, H, L))`: the sums over the keys each query sees,
            times `exp(-shift)`; the shift is about `NO_KEY_LEVEL` for a
            query that sees no key. Parts of several attentions over
            disjoint keys sum into one (`merge_attention_parts`).

    Returns:
        `(B, H, L, D)` float32 outputs (or their parts), and with
        `return_state=True` the tuple `(outputs, state)`.
    """
    query_feature_fn = query_feature_fn or feature_fn
    if prefix_block < 2:
        raise ValueError(
            f"`prefix_block` must be at least 2. Received: {prefix_block}"
        )
    if initial_state is None:
        batch, heads = ops.shape(query)[:2]
        initial_state = empty_causal_state(
            batch, heads, num_features, ops.shape(value)[-1], value.dtype
        )
    else:
        _check_state(initial_state, query, value, num_features)
    length = query.shape[2]
    if length == 0:
        outputs = ops.zeros(ops.shape(query)[:3] + ops.shape(value)[3:])
        if not normalized:
            no_key = ops.full(ops.shape(query)[:3], stabilizers.NO_KEY_LEVEL)
            outputs = (outputs, ops.zeros_like(no_key), no_key)
        return (outputs, tuple(initial_state)) if return_state else outputs
    if length == 1 and not dropout_rate:
        # One new position (decoding): the recurrent step.
        parts, state = one_position_attention(
            query_feature_fn(query), feature_fn(key), value, mask,
            [ops.cast(x, value.dtype) for x in initial_state],
        )
        outputs = attention_parts_outputs(parts) if normalized else parts
        return (outputs, tuple(state)) if return_state else outputs
    if length is None:
        length = ops.shape(query)[2]
    else:
        chunk_size = max(1, min(chunk_size, length))
    padding = (-length) % chunk_size
    if not isinstance(padding, int) or padding:
        if mask is None:
            mask = ops.ones_like(query[:1, :1, :, 0], "bool")
        query, key, value, mask = (
            pad_positions(x, padding) for x in (query, key, value, mask)
        )
    groups = position_groups(
        length if isinstance(length, int) else None, recompute_length,
        multiple=chunk_size,
    )

    def group(index, inputs, shared, state):
        query, key, value, mask = inputs
        key_parts = feature_fn(key)
        query_parts = query_feature_fn(query)
        one_level = _one_level_state(state)
        key_feats, levels, log_key_feats = _causal_key_features(
            *key_parts, mask, one_level[2], chunk_size
        )
        seed = group_seed(dropout_seed, index, len(groups))
        dropped = numerator_key_features(key_feats, dropout_rate, seed)
        parts, one_level = _causal_chunks(
            query_parts, dropped, key_feats, log_key_feats, levels, value,
            chunk_size, one_level, prefix_block,
        )
        outputs = [attention_parts_outputs(parts)] if normalized else parts
        state_after = list(_per_feature_state(one_level))
        if not all(
            _has_feature_levels(parts, num_features)
            for parts in (query_parts, key_parts)
        ):
            return outputs, state_after
        # Only what is used goes through the branch, so that an unused
        # final state is not computed.
        used = len(outputs) + len(state_after) * (
            return_state or index < len(groups) - 1
        )

        def per_feature_levels():
            parts, state_after = log_domain_causal_attention(
                query_parts, key_parts, value, mask, state, dropout_rate,
                seed, prefix_block,
            )
            if normalized:
                parts = [attention_parts_outputs(parts)]
            return [*parts, *state_after][:used]

        results = ops.cond(
            _loses_a_normalizer(levels, parts[1]),
            per_feature_levels,
            lambda: [*outputs, *state_after][:used],
        )
        count = len(outputs)
        return list(results[:count]), list(results[count:]) or state_after

    outputs, state = run_in_groups(
        group,
        [
            [x if x is None else x[:, :, s] for x in (query, key, value, mask)]
            for s in groups
        ],
        carry=[ops.cast(x, value.dtype) for x in initial_state],
    )
    outputs = [
        ops.concatenate(list(pieces), axis=2)[:, :, :length]
        for pieces in zip(*outputs)
    ]
    outputs = outputs[0] if normalized else tuple(outputs)
    if return_state:
        return outputs, tuple(state)
    return outputs
