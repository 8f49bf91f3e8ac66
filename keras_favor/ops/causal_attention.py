"""Causal linear attention in chunks, with its recurrent state in and out."""

from keras import ops

from keras_favor.ops import stabilizers
from keras_favor.ops.bidirectional_attention import RECOMPUTE_LENGTH
from keras_favor.ops.chunk_scan import PREFIX_BLOCK
from keras_favor.ops.chunk_scan import earlier_or_same
from keras_favor.ops.chunk_scan import inherited_states
from keras_favor.ops.chunk_scan import levels_before
from keras_favor.ops.chunk_scan import merge_chunks
from keras_favor.ops.chunk_scan import running_max
from keras_favor.ops.chunk_scan import split_chunks
from keras_favor.ops.feature_dropout import group_seed
from keras_favor.ops.feature_dropout import numerator_key_features
from keras_favor.ops.grouped_recompute import run_in_groups
from keras_favor.validation import positive_int


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
            (batch_size, num_heads, num_features),
            stabilizers.NO_KEY_LEVEL,
            dtype,
        ),
    )


def _masked(x, mask, fill):
    """`x` where `mask` (broadcast over the trailing axis), else `fill`."""
    return x if mask is None else ops.where(mask[..., None], x, fill)


def _chunk_levels(log_scale, mask, carried_level):
    """Each feature's running max of the keys' log-scales, chunk by chunk.

    Args:
        log_scale: `(B, H, n, C, F)` keys' log-scales (F may be 1).
        mask: bool `(B, 1 or H, n, C)` or None.
        carried_level: `(B, H, F)` the level before chunk 0.

    Returns:
        `(before, after)`: the levels `(B, H, n, F)` before each chunk and
        at its end, without gradient (they cancel). Neither looks at any key
        after the chunk.
    """
    chunk_max = ops.stop_gradient(
        ops.max(_masked(log_scale, mask, stabilizers.NO_KEY_LEVEL), axis=3)
    )
    carried = carried_level + ops.zeros_like(chunk_max[:, :, 0])
    after = ops.maximum(carried[:, :, None], running_max(chunk_max, axis=2))
    return levels_before(after, carried), after


def _causal_chunks(
    query_parts, key_parts, value, mask, chunk_size, state, prefix_block,
    dropout_rate, dropout_seed,
):
    """Chunked causal attention over whole chunks, from a carried state.

    Feature `f` of a key in chunk `c` is shifted by the chunk's base
    `base_cf`, the largest log-scale of that feature among the keys before
    the chunk, and by `lam_s`, the running max within the chunk of how far
    the key's log-scales exceed that base (>= 0). A query in chunk `c` takes
    `+ base_cf` on its log-scale, so every product `q_f k_f` keeps its value
    up to `exp(-lam_s)`. Inside a chunk the masked `C x C` product brings
    key `s` to query `t`'s scale by `exp(lam_s - lam_t) <= 1`; the sums of
    the chunks before come from `inherited_states` at the bases and enter
    with `exp(-lam_t) <= 1` (docs/numerics.md, section 5).

    Args:
        query_parts: `(values, log_scale)` of the queries, `(B, H, L, F)`.
        key_parts: `(values, log_scale)` of the keys.
        value: `(B, H, L, D)`.
        mask: bool `(B, 1, L)` or None.
        chunk_size: int.
        state: the carried `(key_values, key_sum, level)`.
        prefix_block: int, chunks per block of the prefix scan.
        dropout_rate, dropout_seed: key-feature dropout in the numerator.

    Returns:
        `(outputs, state)`: `(B, H, L, D)` outputs and the state after the
        last key.
    """
    no_key = stabilizers.NO_KEY_LEVEL
    key_values_, key_log = key_parts
    if key_log is None:
        key_log = ops.zeros_like(key_values_[..., :1])
    chunked = lambda x: None if x is None else split_chunks(x, chunk_size)
    k_values, k_log, v, mask = (
        chunked(x) for x in (key_values_, key_log, value, mask)
    )
    q_values, q_log = (chunked(x) for x in query_parts)

    before, after = _chunk_levels(k_log, mask, state[2])
    # A chunk with keys before it has finite bases; one without (the first
    # keys of a sequence) is shifted by its running max alone.
    seen_before = ops.any(before > 0.5 * no_key, axis=-1)
    base = ops.where(seen_before[..., None], before, 0.0)

    # Keys in the chunk: log-scales above the base, and their running max.
    above_base = k_log - base[:, :, :, None]
    row_level = ops.max(_masked(above_base, mask, no_key), axis=-1)
    lam = ops.maximum(
        ops.where(seen_before, 0.0, no_key)[..., None],
        running_max(ops.stop_gradient(row_level), axis=-1),
    )
    key_exponent = _masked(above_base - lam[..., None], mask, no_key)
    key_feats = stabilizers.exp_times_values(k_values, key_exponent)
    # Each chunk's sums at its end levels, for the chunks after it.
    chunk_feats = stabilizers.exp_times_values(
        k_values, _masked(k_log - after[:, :, :, None], mask, no_key)
    )
    chunk_feats_kv = numerator_key_features(
        chunk_feats, dropout_rate, dropout_seed
    )
    dropped = numerator_key_features(key_feats, dropout_rate, dropout_seed)
    chunk_kv = ops.matmul(ops.swapaxes(chunk_feats_kv, -1, -2), v)
    chunk_sum = ops.sum(chunk_feats, axis=-2)
    kv, key_sum, _, final_state = inherited_states(
        chunk_kv, chunk_sum, after, state, prefix_block
    )
    # The inherited sums, at the bases, reach query t's scale by exp(-lam_t).
    inherited = ops.where(seen_before[..., None], ops.exp(-lam), 0.0)

    # What query t surely sees: the inherited sum and its own key.
    bounds = [
        (
            stabilizers.log_key_sum(key_sum)[:, :, :, None],
            ops.where(seen_before[..., None], -lam, no_key),
        )
    ]
    if k_values is None:
        bounds.append((key_exponent, None))
    if q_log is not None:
        q_log = q_log + base[:, :, :, None]
    q = stabilizers.query_features(q_values, q_log, bounds)

    relative = lam[..., None, :] - lam[..., :, None]
    decay = ops.exp(
        ops.where(earlier_or_same(chunk_size), relative, no_key)
    )
    scores = ops.matmul(q, ops.swapaxes(dropped, -1, -2)) * decay
    numerator = ops.matmul(scores, v)
    if dropout_rate:
        scores = ops.matmul(q, ops.swapaxes(key_feats, -1, -2)) * decay
    denominator = ops.sum(scores, axis=-1)

    numerator += ops.matmul(q, kv) * inherited[..., None]
    denominator += ops.einsum("bhntf,bhnf->bhnt", q, key_sum) * inherited
    outputs = stabilizers.normalize(numerator, denominator)
    return merge_chunks(outputs), final_state


def _pad_positions(x, padding):
    widths = [(0, 0)] * 2 + [(0, padding)] + [(0, 0)] * (len(x.shape) - 3)
    return ops.pad(x, widths)


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
):
    """Exact causal linear attention (docs/numerics.md, section 5).

    Query `t` attends to keys `s <= t`. Memory grows like
    `L (F + D + C) + (L / C) F D` for one group of up to `recompute_length`
    positions; longer sequences run group after group, carrying the prefix
    state, with the activations of every group but the last recomputed in
    the backward pass instead of stored.

    The state after the last key, `(key_values, key_sum, level)`, holds the
    running sums `phi(K)^T V` `(B, H, F, D)` and `phi(K)^T 1` `(B, H, F)`,
    each feature scaled by `exp(-level_f)`, and the levels `(B, H, F)`:
    each feature's largest log-scale so far, so that every feature's sum
    holds a term `exp(0)` and stays representable.
    A sequence run in pieces, each piece given the state the previous one
    returned, gives the outputs (and gradients) of the whole sequence run
    at once; a piece of one position costs `O(F D)` per head.

    Limit in float32: the keys inside one chunk share a stabilizer level per
    position, so at very large input scales (attention logits of order
    1e3 and more) a query whose features align with features that sit far
    below a key's largest one can get an exact-zero output where the
    estimator is not zero. Bidirectional attention has no such limit.

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

    Returns:
        `(B, H, L, D)` float32 outputs, and with `return_state=True` the
        tuple `(outputs, state)`.
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
    if length is None:
        length = ops.shape(query)[2]
    else:
        chunk_size = max(1, min(chunk_size, length))
    padding = (-length) % chunk_size
    if not isinstance(padding, int) or padding:
        if mask is None:
            mask = ops.ones_like(query[:1, :1, :, 0], "bool")
        query, key, value, mask = (
            _pad_positions(x, padding) for x in (query, key, value, mask)
        )
    positive_int(recompute_length, "recompute_length")
    groups = [slice(None)]
    if isinstance(length, int):
        group_length = max(1, recompute_length // chunk_size) * chunk_size
        groups = [
            slice(start, start + group_length)
            for start in range(0, length + padding, group_length)
        ] or groups

    def group(index, inputs, shared, state):
        query, key, value, mask = inputs
        seed = group_seed(dropout_seed, index, len(groups))
        outputs, state = _causal_chunks(
            query_feature_fn(query), feature_fn(key), value, mask,
            chunk_size, state, prefix_block, dropout_rate, seed,
        )
        return [outputs], list(state)

    outputs, state = run_in_groups(
        group,
        [
            [x if x is None else x[:, :, s] for x in (query, key, value, mask)]
            for s in groups
        ],
        carry=[ops.cast(x, value.dtype) for x in initial_state],
    )
    outputs = ops.concatenate([o[0] for o in outputs], axis=2)
    outputs = outputs[:, :, :length]
    if return_state:
        return outputs, tuple(state)
    return outputs
