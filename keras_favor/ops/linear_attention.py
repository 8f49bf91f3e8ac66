"""Numerically stable linear attention, bidirectional and causal.

Tensors are laid out `(batch, heads, length, channels)` and computed in
float32. A `feature_fn` maps heads to `(values, log_scale)` pairs, as
`FeatureMap.log_scaled` does, with `phi = values * exp(log_scale)`; every
shift subtracted from `log_scale` here cancels exactly in the ratio
`phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1)` (favor-math.md, section 4).
Queries may have their own `query_feature_fn`, as `FeatureMap.query_log_scaled`,
whose features need to be right only up to a positive factor per query.
"""

import tensorflow as tf

# Stands for "no key yet" in running maxima: finite, so differences of it
# stay finite, and exp(real - 1e30) is exactly 0.
NO_KEY_LEVEL = -1e30
# Query features may reach exp(30) ~ 1e13 to keep their normalizer >= 1.
MAX_QUERY_LOG_FEATURE = 30.0
# A normalizer below this means the query sees no key, or every product of
# its features with the keys' underflowed: its attention output is 0. With
# features <= exp(30), gradients then stay below ~1e25 |v| L: finite.
TINY_NORMALIZER = 1e-12
# Attention over more positions than this runs in groups whose activations
# are recomputed in the backward pass. At 8 heads and 256 features a causal
# training step over 65536 positions peaks under 5 GiB
# (BENCHMARKS.md).
RECOMPUTE_GROUP_LENGTH = 32768
# Causal chunks pass their states on in blocks of this many chunks.
PREFIX_BLOCK = 8


def exp_times_values(values, exponent):
    scale = tf.exp(exponent)
    return scale if values is None else values * scale


def row_log_level(log_scale, mask=None):
    """The largest log-scale of each position, `(B, H, L)`, without gradient.

    Masked positions get `NO_KEY_LEVEL`, so they enter no maximum.
    """
    level = tf.stop_gradient(tf.reduce_max(log_scale, axis=-1))
    if mask is None:
        return level
    return tf.where(mask, level, NO_KEY_LEVEL)


def log_key_sum(key_sum):
    """`log(key_sum)`, finite (about -85) where the sum is 0."""
    return tf.math.log(tf.maximum(key_sum, 1e-37))


def query_features(values, log_scale, key_sum_log_bounds=()):
    """Query features with one shift per query, which cancels in its ratio.

    For purely exponential features (`values is None`) and lower bounds
    `w <= phi(K)^T 1` of the key sum (as it is scaled in the normalizer), the
    shift is the largest `max_f(log_scale_f + log w_f)`: then the normalizer
    `phi(q) . phi(K)^T 1 >= phi(q) . w >= 1`, so it can neither underflow
    nor give the division an overflowing gradient, however far apart the
    query and key logits are. Otherwise the shift is the row max of
    `log_scale` (features at most 1).

    Args:
        values, log_scale: the query feature parts, `(B, H, L, F)` or None.
        key_sum_log_bounds: pairs `(log_w, offset)`, each bounding the key
            sum seen by a query by `w = exp(log_w + offset)`: `log_w`
            broadcasts against `log_scale`, `offset` (one per query) against
            its rows, or is None. A bound in two factors spares the
            logarithm of their `(L, F)` product.
    """
    if log_scale is None:
        return values
    shift = row_log_level(log_scale)
    if values is None and key_sum_log_bounds:
        bounded = None
        for log_w, offset in key_sum_log_bounds:
            bound = tf.reduce_max(log_scale + log_w, axis=-1)
            if offset is not None:
                bound += offset
            bounded = bound if bounded is None else tf.maximum(bounded, bound)
        bounded = tf.stop_gradient(bounded)
        # Capped at exp(MAX_QUERY_LOG_FEATURE), which bounds the features
        # met by keys the bounds leave out (earlier in the same chunk) and
        # those of a query that sees no key yet, whose bounds are about
        # NO_KEY_LEVEL: the cap alone keeps its features finite.
        shift = tf.maximum(bounded, shift - MAX_QUERY_LOG_FEATURE)
    return exp_times_values(values, log_scale - shift[..., None])


def key_exponent(log_scale, shift, mask):
    """`log_scale - shift`, and `NO_KEY_LEVEL` at masked keys.

    Masked before `exp`, so padded keys produce neither an overflow nor a
    NaN gradient, and `exp(NO_KEY_LEVEL)` is exactly 0.
    """
    exponent = log_scale - shift[..., None]
    if mask is None:
        return exponent
    return tf.where(mask[..., None], exponent, NO_KEY_LEVEL)


def shifted_key_features(values, log_scale, shift, mask):
    """`values * exp(log_scale - shift)`, exactly zero at masked keys."""
    if log_scale is None:
        if mask is None:
            return values
        return tf.where(mask[..., None], values, 0.0)
    return exp_times_values(values, key_exponent(log_scale, shift, mask))


def strictly_earlier(size):
    """Bool `(size, size)` matrix, True where column < row."""
    lower = tf.linalg.band_part(tf.ones((size, size), tf.bool), -1, 0)
    return lower & ~tf.eye(size, dtype=tf.bool)


def running_max(levels, chunk_size, initial_level):
    """`max(initial_level, max_{s' <= s} levels_s')` along the positions.

    Inside a chunk a masked `C x C` max, across chunks a masked `n x n` max:
    no loop and no recursion, so graphs of unknown length stay small.

    Args:
        levels: `(B, H, L)` with `L` a multiple of `chunk_size`.
        chunk_size: int.
        initial_level: `(B, H)` the running max before position 0.
    """
    chunks = split_chunks(levels, chunk_size)
    causal = tf.linalg.band_part(
        tf.ones((chunk_size, chunk_size), tf.bool), -1, 0
    )
    within = tf.reduce_max(
        tf.where(causal, chunks[..., None, :], NO_KEY_LEVEL), axis=-1
    )
    chunk_max = within[..., -1]
    num_chunks = tf.shape(chunk_max)[-1]
    before = tf.reduce_max(
        tf.where(
            strictly_earlier(num_chunks), chunk_max[..., None, :], NO_KEY_LEVEL
        ),
        axis=-1,
    )
    before = tf.maximum(before, initial_level[..., None])
    return merge_chunks(tf.maximum(within, before[..., None]))


def causal_key_features(values, log_scale, mask, initial_level, chunk_size):
    """Key features shifted by the running max of the keys seen so far.

    Key `s` is scaled by `exp(-max(initial_level, max_{s' <= s} level_s'))`,
    so no key is scaled by anything it has not seen (favor-math.md, sec. 4).

    Returns:
        `(features, levels, log_features)`: features `(B, H, S, F)`, the
        running max `(B, H, S)` used as each key's shift, and the features'
        logarithm where they are purely exponential (`values is None`),
        else None.
    """
    if log_scale is None:
        features = shifted_key_features(values, None, None, mask)
        levels = tf.zeros(tf.shape(features)[:-1], features.dtype)
        return features, levels, None
    levels = running_max(
        row_log_level(log_scale, mask), chunk_size, initial_level
    )
    exponent = key_exponent(log_scale, levels, mask)
    log_features = exponent if values is None else None
    return exp_times_values(values, exponent), levels, log_features


def feature_dropout(key_feats, rate, seed):
    """Drops key features with a stateless seed, scaling survivors up.

    Stateless, so a recomputation in the backward pass drops the same ones.
    """
    keep = tf.random.stateless_uniform(tf.shape(key_feats), seed) >= rate
    return tf.where(keep, key_feats / (1.0 - rate), 0.0)


def numerator_key_features(key_feats, dropout_rate, dropout_seed):
    """Key features for the numerator: dropped out when training."""
    if not dropout_rate:
        return key_feats
    return feature_dropout(key_feats, dropout_rate, dropout_seed)


def normalize(numerator, denominator):
    """`numerator / denominator`, and 0 for a query that sees no key.

    Normalizers are >= 1 for the softmax maps (see `query_features`), so an
    additive epsilon would only bias small legitimate ones (ReLU features
    near their epsilon). A magnitude below `TINY_NORMALIZER` means the query
    sees no key, or that every feature product underflowed: such a query
    gets 0, with a zero gradient.

    The gradient is written out: it reuses the inverse normalizer and the
    output, where the automatic one divides twice and selects twice.
    """

    @tf.custom_gradient
    def ratio(numerator, denominator):
        sees_nothing = tf.abs(denominator) < TINY_NORMALIZER
        safe = tf.where(sees_nothing, tf.ones_like(denominator), denominator)
        inverse = tf.where(sees_nothing, tf.zeros_like(safe), 1.0 / safe)
        outputs = numerator * inverse[..., None]

        def gradient(upstream):
            numerator_grad = upstream * inverse[..., None]
            return numerator_grad, -tf.reduce_sum(
                numerator_grad * outputs, axis=-1
            )

        return outputs, gradient

    return ratio(numerator, denominator)


def bidirectional_key_sums(
    key, value, feature_fn, mask, dropout_rate, dropout_seed
):
    """`(K'^T V, K'^T 1, shift)` of some keys, taken at their own shift.

    The shift is the max of the valid keys' log-scales, per (batch, head),
    and `NO_KEY_LEVEL` where there is none; `rescaled_key_sums` brings sums
    taken at different shifts to a common one.

    Args:
        key: `(B, H, S, d)` heads; value: `(B, H, S, D)`.
        feature_fn: maps heads to `(values, log_scale)` feature parts.
        mask: bool `(B, 1, S)`, True at real keys, or `None`.
        dropout_rate, dropout_seed: key-feature dropout in the numerator.
    """
    values, log_scale = feature_fn(key)
    if log_scale is None:
        shift = tf.zeros(tf.shape(key)[:2], key.dtype)
    else:
        shift = tf.reduce_max(row_log_level(log_scale, mask), axis=-1)
    key_feats = shifted_key_features(values, log_scale, shift[..., None], mask)
    dropped = numerator_key_features(key_feats, dropout_rate, dropout_seed)
    key_values = tf.matmul(dropped, value, transpose_a=True)
    return key_values, tf.reduce_sum(key_feats, axis=2), shift


def rescaled_key_sums(group_sums):
    """The sums of key groups taken at their own shifts, at the largest one.

    Returns `(key_values, key_sum, factors)`, where group `i` entered with
    factor `factors[i] = exp(shift_i - max shift) <= 1`: 0 for a group
    without keys, unless no group has any.
    """
    shifts = tf.stack([shift for _, _, shift in group_sums])
    factors = tf.unstack(tf.exp(shifts - tf.reduce_max(shifts, axis=0)))
    key_values = tf.add_n(
        [kv * f[..., None, None] for (kv, _, _), f in zip(group_sums, factors)]
    )
    key_sum = tf.add_n(
        [ks * f[..., None] for (_, ks, _), f in zip(group_sums, factors)]
    )
    return key_values, key_sum, factors


def attend_to_key_sums(query, key_values, key_sum, query_feature_fn):
    """`Q'(K'^T V) / Q'(K'^T 1)` given the two key sums."""
    query_feats = query_features(
        *query_feature_fn(query), [(log_key_sum(key_sum)[:, :, None], None)]
    )
    numerator = tf.matmul(query_feats, key_values)
    denominator = tf.einsum("bhlf,bhf->bhl", query_feats, key_sum)
    return normalize(numerator, denominator)


def position_groups(x):
    """Slices of at most `RECOMPUTE_GROUP_LENGTH` positions along axis 2.

    One slice over everything when the length is unknown or short enough.
    """
    length = x.shape[2]
    if length is None or length <= RECOMPUTE_GROUP_LENGTH:
        return [slice(None)]
    step = RECOMPUTE_GROUP_LENGTH
    return [slice(start, start + step) for start in range(0, length, step)]


def one_after_another(fn, calls):
    """`[fn(index, *inputs) for index, inputs in enumerate(calls)]`, in order.

    Each call's inputs wait for the previous call's outputs, so the graph
    executor cannot run the calls side by side and keep all of their
    intermediate tensors alive at once.
    """
    results = []
    for index, inputs in enumerate(calls):
        previous = tf.nest.flatten(results[-1]) if results else []
        with tf.control_dependencies(previous):
            inputs = [tf.identity(x) for x in inputs]
        results.append(fn(index, *inputs))
    return results


def vector_jacobian_products(fn, inputs, upstream):
    """`fn(*inputs)` recomputed, and its gradients given `upstream`."""
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        outputs = fn(*inputs)
    return tape.gradient(
        outputs,
        inputs,
        output_gradients=upstream,
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )


def grouped_bidirectional_attention(
    query, key, value, feature_fn, query_feature_fn, mask, dropout_rate,
    dropout_seed,
):
    """`bidirectional_linear_attention` over groups of positions.

    Keys, then queries, run group by group; only the inputs and the two key
    sums are kept for the backward pass, which recomputes each group's
    features in turn. Training memory then holds the features of one group,
    not of the whole sequence, for one more feature-map evaluation.
    """
    query_slices, key_slices = position_groups(query), position_groups(key)

    def key_group_sums(index, key, value):
        positions = key_slices[index]
        seed = dropout_seed
        if dropout_rate:
            seed = tf.random.experimental.stateless_fold_in(dropout_seed, index)
        group_mask = None if mask is None else mask[:, :, positions]
        return bidirectional_key_sums(
            key, value, feature_fn, group_mask, dropout_rate, seed
        )

    @tf.custom_gradient
    def attention(query, key, value):
        key_groups = [(key[:, :, s], value[:, :, s]) for s in key_slices]
        key_values, key_sum, factors = rescaled_key_sums(
            one_after_another(key_group_sums, key_groups)
        )

        def attend(index, query, key_values, key_sum):
            return attend_to_key_sums(
                query, key_values, key_sum, query_feature_fn
            )

        def query_group_gradients(index, query, upstream):
            return vector_jacobian_products(
                lambda *inputs: attend(index, *inputs),
                [query, key_values, key_sum],
                upstream,
            )

        def key_group_gradients(index, key, value, kv_grad, sum_grad):
            return vector_jacobian_products(
                lambda *inputs: key_group_sums(index, *inputs)[:2],
                [key, value],
                [kv_grad, sum_grad],
            )

        def gradient(upstream):
            query_grads = one_after_another(
                query_group_gradients,
                [(query[:, :, s], upstream[:, :, s]) for s in query_slices],
            )
            kv_grad = tf.add_n([grads[1] for grads in query_grads])
            sum_grad = tf.add_n([grads[2] for grads in query_grads])
            key_grads = one_after_another(
                key_group_gradients,
                [
                    (k, v, kv_grad * f[..., None, None], sum_grad * f[..., None])
                    for (k, v), f in zip(key_groups, factors)
                ],
            )
            return (
                tf.concat([grads[0] for grads in query_grads], axis=2),
                tf.concat([grads[0] for grads in key_grads], axis=2),
                tf.concat([grads[1] for grads in key_grads], axis=2),
            )

        outputs = one_after_another(
            attend,
            [(query[:, :, s], key_values, key_sum) for s in query_slices],
        )
        return tf.concat(outputs, axis=2), gradient

    return attention(query, key, value)


def bidirectional_linear_attention(
    query, key, value, feature_fn, mask=None, dropout_rate=0.0,
    dropout_seed=None, query_feature_fn=None,
):
    """`Q'(K'^T V) / Q'(K'^T 1)` without forming any `L x S` matrix.

    Sequences of more than `RECOMPUTE_GROUP_LENGTH` queries or keys run in
    groups recomputed in the backward pass (`grouped_bidirectional_attention`).

    Args:
        query: `(B, H, L, d)` heads; key `(B, H, S, d)`; value `(B, H, S, D)`.
        feature_fn: maps heads to `(values, log_scale)` feature parts.
        mask: bool `(B, 1, S)`, True at real keys, or None.
        dropout_rate: float, key-feature dropout in the numerator.
        dropout_seed: `(2,)` int stateless seed, when `dropout_rate > 0`.
        query_feature_fn: the queries' `feature_fn`; defaults to
            `feature_fn`.
    """
    query_feature_fn = query_feature_fn or feature_fn
    if len(position_groups(query)) > 1 or len(position_groups(key)) > 1:
        return grouped_bidirectional_attention(
            query, key, value, feature_fn, query_feature_fn, mask,
            dropout_rate, dropout_seed,
        )
    key_values, key_sum, _ = bidirectional_key_sums(
        key, value, feature_fn, mask, dropout_rate, dropout_seed
    )
    return attend_to_key_sums(query, key_values, key_sum, query_feature_fn)


def split_chunks(x, chunk_size):
    """`(B, H, L, ...)` to `(B, H, L / chunk_size, chunk_size, ...)`."""
    shape = tf.shape(x)
    new_shape = tf.concat([shape[:2], [-1, chunk_size], shape[3:]], axis=0)
    return tf.reshape(x, new_shape)


def merge_chunks(x):
    """`(B, H, N, C, ...)` back to `(B, H, N * C, ...)`."""
    shape = tf.shape(x)
    return tf.reshape(x, tf.concat([shape[:2], [-1], shape[4:]], axis=0))


def flat_matmul(weights, x):
    """`einsum("...cn,...nfd->...cfd", weights, x)` as one batched matmul.

    With `(f, d)` flattened, the product and both its gradients are plain
    matrix products, which oneDNN runs several times faster than the einsum's
    gradient.
    """
    rows = len(weights.shape) - 1
    shape = tf.shape(x)
    flat = tf.reshape(x, tf.concat([shape[:rows], [-1]], 0))
    product = tf.matmul(weights, flat)
    return tf.reshape(
        product, tf.concat([tf.shape(product)[:rows], shape[rows:]], 0)
    )


def levels_before(chunk_level, carried_level):
    """The level before each chunk: the carried one, then each previous end."""
    return tf.concat([carried_level[..., None], chunk_level[..., :-1]], -1)


def decay_from_earlier(own_level, level_before):
    """`exp(own_level_c' - level_before_c)` where `c' < c`, else 0.

    `(..., n, n)` from `(..., n)` levels: each earlier chunk's sums taken to
    the level before a later chunk, a factor <= 1 as levels never decrease.
    """
    earlier = strictly_earlier(tf.shape(own_level)[-1])
    return tf.exp(
        tf.where(
            earlier,
            own_level[..., None, :] - level_before[..., :, None],
            NO_KEY_LEVEL,
        )
    )


def inherit(decay, sums, carried, carried_factor):
    """`decay @ sums` plus `carried` scaled by `carried_factor`, per chunk.

    Args:
        decay: `(..., n, n)` weights of the earlier chunks' sums.
        sums: `(..., n, *S)` each chunk's sums.
        carried: `(..., *S)` sums from before these chunks.
        carried_factor: `(..., n)` the carried sums' factor at each chunk.
    """
    trailing = len(sums.shape) - len(carried_factor.shape)
    for _ in range(trailing):
        carried_factor = carried_factor[..., None]
    carried = tf.expand_dims(carried, -1 - trailing)
    return flat_matmul(decay, sums) + carried * carried_factor


def sum_at_last_level(level, sums):
    """`sum_c exp(level_c - level_last) sums_c` over the chunks.

    Each chunk's sums taken to the last chunk's level (factors <= 1, as
    levels never decrease): `(..., *S)` from `level` `(..., n)` and `sums`
    `(..., n, *S)`.
    """
    to_last = tf.exp(level - level[..., -1:])[..., None, :]
    return tf.squeeze(flat_matmul(to_last, sums), len(level.shape) - 1)


def dense_inherited_states(chunk_kv, chunk_sum, chunk_level, state):
    """What each chunk inherits from the chunks before it, and the last state.

    Chunk `c` inherits `sum_{c' < c} chunk_kv_c' exp(level_c' - lvl_c)` plus
    the carried state scaled by `exp(level_0 - lvl_c)`, where `lvl_c`, the
    level after chunk `c - 1`, is the largest level before chunk `c`: the
    running max of the levels does not decrease, so every factor is <= 1.
    With `n` chunks that is one lower-triangular `n x n` matrix product:
    no loop, and plain matmul gradients.

    Args:
        chunk_kv: `(B, H, n, F, D)` each chunk's `K'^T V` at its own level.
        chunk_sum: `(B, H, n, F)` each chunk's `K'^T 1` at its own level.
        chunk_level: `(B, H, n)` the running max at each chunk's end.
        state: the carried `(key_values, key_sum, level)` before chunk 0.

    Returns:
        `(key_values, key_sum, level, final_state)`: the inherited sums
        `(B, H, n, F, D)` and `(B, H, n, F)` at levels `(B, H, n)`, and the
        state after the last chunk.
    """
    carried_kv, carried_sum, carried_level = state
    level = levels_before(chunk_level, carried_level)
    decay = decay_from_earlier(chunk_level, level)
    from_carried = tf.exp(carried_level[..., None] - level)
    kv = inherit(decay, chunk_kv, carried_kv, from_carried)
    key_sum = inherit(decay, chunk_sum, carried_sum, from_carried)
    final_level = chunk_level[..., -1]
    from_carried = tf.exp(carried_level - final_level)
    final_state = (
        sum_at_last_level(chunk_level, chunk_kv)
        + carried_kv * from_carried[..., None, None],
        sum_at_last_level(chunk_level, chunk_sum)
        + carried_sum * from_carried[..., None],
        final_level,
    )
    return kv, key_sum, level, final_state


def blocked_inherited_states(chunk_kv, chunk_sum, chunk_level, state):
    """`dense_inherited_states` in blocks of `PREFIX_BLOCK` chunks.

    Chunk `c` of block `j` inherits from the chunks before it in its block
    (a `b x b` product per block) and from the blocks before `j`, whose sums
    come from `inherited_states` over the `n / b` block sums. The factor of
    an earlier chunk splits as `exp(chunk_level - block_level)`
    `* exp(block_level - block_start) * exp(block_start - level)`, each
    <= 1 since the levels never decrease. `n b + (n / b)^2` instead of `n^2`
    products of `(F, D)` states.
    """
    level = levels_before(chunk_level, state[2])
    kv, key_sum, own_level, level_before = (
        split_chunks(x, PREFIX_BLOCK)
        for x in (chunk_kv, chunk_sum, chunk_level, level)
    )
    decay = decay_from_earlier(own_level, level_before)
    from_blocks_kv, from_blocks_sum, block_start, final_state = (
        inherited_states(
            sum_at_last_level(own_level, kv),
            sum_at_last_level(own_level, key_sum),
            own_level[..., -1],
            state,
        )
    )
    from_start = tf.exp(block_start[..., None] - level_before)
    kv = inherit(decay, kv, from_blocks_kv, from_start)
    key_sum = inherit(decay, key_sum, from_blocks_sum, from_start)
    return merge_chunks(kv), merge_chunks(key_sum), level, final_state


def inherited_states(chunk_kv, chunk_sum, chunk_level, state):
    """`dense_inherited_states`, in blocks when the chunks fill several."""
    num_chunks = chunk_level.shape[-1]
    if (
        num_chunks is not None
        and num_chunks > PREFIX_BLOCK
        and num_chunks % PREFIX_BLOCK == 0
    ):
        return blocked_inherited_states(
            chunk_kv, chunk_sum, chunk_level, state
        )
    return dense_inherited_states(chunk_kv, chunk_sum, chunk_level, state)


def empty_state(query, value, num_features):
    """The causal state before any key: zero sums at `NO_KEY_LEVEL`."""
    batch_heads = tf.shape(query)[:2]
    dtype = value.dtype
    return (
        tf.zeros(
            tf.concat([batch_heads, [num_features, tf.shape(value)[-1]]], 0),
            dtype,
        ),
        tf.zeros(tf.concat([batch_heads, [num_features]], 0), dtype),
        tf.fill(batch_heads, tf.constant(NO_KEY_LEVEL, dtype)),
    )


def causal_chunks(
    query_parts, key_feats, key_sum_feats, log_key_feats, levels, value,
    chunk_size, state,
):
    """Chunked causal attention over one group of whole chunks.

    Inside a chunk of `C` positions the masked `C x C` product is formed;
    across chunks the prefix sums of `K'^T V` and `K'^T 1`, carried as
    `state = (key_values, key_sum, level)`, come from `inherited_states`.

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

    Returns:
        `(outputs, state)`: `(B, H, L, D)` outputs and the state after the
        group's last key.
    """
    k, v, k_sum = (
        split_chunks(x, chunk_size) for x in (key_feats, value, key_sum_feats)
    )
    levels = split_chunks(levels, chunk_size)

    # Each chunk's sums, scaled to the level at its last position. The
    # per-key scale goes on the narrower factor, v, not on k.
    chunk_level = levels[..., -1]
    to_chunk_end = tf.exp(levels - chunk_level[..., None])[..., None]
    chunk_kv = tf.matmul(k, v * to_chunk_end, transpose_a=True)
    chunk_sum = tf.matmul(k_sum, to_chunk_end, transpose_a=True)[..., 0]
    kv, key_sum, level, final_state = inherited_states(
        chunk_kv, chunk_sum, chunk_level, state
    )
    # The inherited sums rescaled to each position's own level (<= 1).
    inherited = tf.exp(level[..., None] - levels)

    # What query t surely sees: the inherited sum and its own key.
    key_sum_log_bounds = [
        (log_key_sum(key_sum)[:, :, :, None], level[..., None] - levels)
    ]
    if log_key_feats is not None:
        key_sum_log_bounds.append(
            (split_chunks(log_key_feats, chunk_size), None)
        )
    q = query_features(
        *(split_chunks(x, chunk_size) if x is not None else None
          for x in query_parts),
        key_sum_log_bounds,
    )

    # Inside a chunk, query t sees key s <= t at relative scale
    # exp(level_s - level_t) <= 1.
    causal = tf.linalg.band_part(
        tf.ones((chunk_size, chunk_size), tf.bool), -1, 0
    )
    relative = levels[..., None, :] - levels[..., :, None]
    decay = tf.exp(tf.where(causal, relative, NO_KEY_LEVEL))
    scores = tf.matmul(q, k, transpose_b=True) * decay
    numerator = tf.matmul(scores, v)
    if key_sum_feats is not key_feats:
        scores = tf.matmul(q, k_sum, transpose_b=True) * decay
    denominator = tf.reduce_sum(scores, axis=-1)

    numerator += tf.matmul(q, kv) * inherited[..., None]
    denominator += tf.einsum("bhntf,bhnf->bhnt", q, key_sum) * inherited
    outputs = merge_chunks(normalize(numerator, denominator))
    return outputs, final_state


def causal_group(
    query, key, value, mask, state, feature_fn, query_feature_fn, chunk_size,
    dropout_rate, dropout_seed,
):
    """Features and chunked causal attention for one group of positions."""
    values, log_scale = feature_fn(key)
    key_feats, levels, log_key_feats = causal_key_features(
        values, log_scale, mask, state[2], chunk_size
    )
    dropped = numerator_key_features(key_feats, dropout_rate, dropout_seed)
    return causal_chunks(
        query_feature_fn(query), dropped, key_feats, log_key_feats, levels,
        value, chunk_size, state,
    )


def recomputed_in_backward(fn):
    """`fn` whose activations are recomputed in the backward pass.

    Unlike `tf.recompute_grad`, the recomputation waits for the gradients of
    `fn`'s outputs. Otherwise the graph executor may run the recomputations
    of all groups as soon as their inputs exist, keeping every group's
    activations alive together and saving no memory.
    """

    @tf.custom_gradient
    def wrapped(*args):
        def gradient(*upstream):
            upstream = [
                tf.zeros_like(out) if grad is None else grad
                for out, grad in zip(outputs, upstream)
            ]
            with tf.control_dependencies(upstream):
                inputs = [tf.identity(arg) for arg in args]
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                recomputed = fn(*inputs)
            return tape.gradient(recomputed, inputs, output_gradients=upstream)

        outputs = fn(*args)
        return outputs, gradient

    return wrapped


def pad_positions(x, padding):
    paddings = [[0, 0]] * 2 + [[0, padding]] + [[0, 0]] * (len(x.shape) - 3)
    return tf.pad(x, paddings)


def causal_linear_attention(
    query, key, value, feature_fn, num_features, mask=None, chunk_size=64,
    dropout_rate=0.0, dropout_seed=None, query_feature_fn=None,
):
    """Exact causal linear attention (favor-math.md, section 5).

    Memory grows like `L (F + D + C) + (L / C) F D` for one group of up to
    `RECOMPUTE_GROUP_LENGTH` positions; longer sequences run group after
    group, carrying the prefix state, with the activations of every group
    but the last recomputed in the backward pass instead of stored.

    Args:
        query, key: `(B, H, L, d)` heads; value: `(B, H, L, D)`.
        feature_fn: maps heads to `(values, log_scale)` feature parts.
        num_features: int, the number of features `F` that `feature_fn` makes.
        mask: bool `(B, 1, L)`, True at real keys, or None.
        chunk_size: int, positions per chunk.
        dropout_rate: float, key-feature dropout in the numerator.
        dropout_seed: `(2,)` int stateless seed, when `dropout_rate > 0`.
        query_feature_fn: the queries' `feature_fn`; defaults to
            `feature_fn`.
    """
    query_feature_fn = query_feature_fn or feature_fn
    length = query.shape[2]
    if length is None:
        length = tf.shape(query)[2]
    else:
        chunk_size = max(1, min(chunk_size, length))
    padding = (-length) % chunk_size
    if not isinstance(padding, int) or padding:
        if mask is None:
            mask = tf.ones_like(query[:1, :1, :, 0], tf.bool)
        query, key, value, mask = (
            pad_positions(x, padding) for x in (query, key, value, mask)
        )
    state = empty_state(query, value, num_features)
    if not isinstance(length, int) or length <= RECOMPUTE_GROUP_LENGTH:
        outputs, _ = causal_group(
            query, key, value, mask, state, feature_fn, query_feature_fn,
            chunk_size, dropout_rate, dropout_seed,
        )
        return outputs[:, :, :length]
    group_length = RECOMPUTE_GROUP_LENGTH // chunk_size * chunk_size
    starts = range(0, length + padding, group_length)
    outputs = []
    for index, start in enumerate(starts):
        positions = slice(start, start + group_length)
        seed = None
        if dropout_rate:
            seed = tf.random.experimental.stateless_fold_in(dropout_seed, index)

        # Differentiable inputs are arguments: no gradient reaches tensors
        # captured from outside.
        group_mask = None if mask is None else mask[:, :, positions]

        def group(q, k, v, *state, mask=group_mask, seed=seed):
            outputs, state = causal_group(
                q, k, v, mask, state, feature_fn, query_feature_fn,
                chunk_size, dropout_rate, seed,
            )
            return (outputs,) + tuple(state)

        # The last group's backward pass runs first, right after the
        # forward pass: keeping its activations costs no more memory than
        # recomputing them would.
        if index < len(starts) - 1:
            group = recomputed_in_backward(group)
        group_outputs, *state = group(
            query[:, :, positions], key[:, :, positions],
            value[:, :, positions], *state,
        )
        outputs.append(group_outputs)
    return tf.concat(outputs, axis=2)[:, :, :length]
