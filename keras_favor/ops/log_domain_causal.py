"""Causal attention with one stabilizer level per feature, for any scale.

The chunked algorithm of `causal_attention` shifts all features of a key by
one level per position. At large input scales that can push every product of
a query's features with the keys it sees out of float32's range, although
the estimator is not zero (docs/numerics.md, section 5). This algorithm keeps
a running maximum per feature instead, and never forms a factor above 1:

- chunks of `EXACT_CHUNK` positions; inside a chunk the log-domain products
  `a_tf + b_sf`, `s <= t`, are formed one by one, and query `t` is shifted by
  their largest, `top_t`, together with the largest it meets in the state;
- across chunks, the sums of the earlier chunks at `G_f`, the running max of
  feature `f` over the keys before the chunk: key factors `exp(b_sf - G_f)`
  and query factors `exp(a_tf + G_f - top_t)` are both at most 1.

So the largest term of every query is exactly 1 and every term down to
float32's smallest normal number is kept. It costs `L EXACT_CHUNK F`
exponentials and as many numbers of memory for the products inside the
chunks, and `(L / EXACT_CHUNK) F D` for the chunk states: several times the
default algorithm, which is why `causal_linear_attention` runs this one only
for groups of positions where the default would lose a query's normalizer.
Where a compiled step reserves memory for that branch whether it runs or
not (under `jax.jit`: `backend.reserves_every_branch`), the positions run in
blocks of up to `EXACT_BLOCK`, one after another, each from the state the
one before left and recomputed in the backward pass, so that the memory
above is held for one block at a time.
"""

import keras
from keras import ops

from keras_favor import backend
from keras_favor.ops.causal_state import CausalState
from keras_favor.ops.chunk_scan import earlier_or_same
from keras_favor.ops.chunk_scan import inherited_states
from keras_favor.ops.chunk_scan import merge_chunks
from keras_favor.ops.chunk_scan import pad_positions
from keras_favor.ops.chunk_scan import split_chunks
from keras_favor.ops.feature_dropout import numerator_key_features
from keras_favor.ops.products import matmul_transposed_a
from keras_favor.ops.stabilizers import NO_KEY_LEVEL

# Positions per chunk: the products inside a chunk take `L C F` numbers and
# the chunk states `(L / C) F D`; C = 8 keeps their sum small for D near 64.
EXACT_CHUNK = 8
# Positions per block at most: longer sequences run block after block, so
# that the `L EXACT_CHUNK F` products are held for one block at a time.
EXACT_BLOCK = 512


def _seen(level):
    """True where a level belongs to a key, not to `NO_KEY_LEVEL`."""
    return level > 0.5 * NO_KEY_LEVEL


def _running_chunk_max(chunk_max, initial_level):
    """`max(initial, max_{c' <= c} chunk_max_c')` along axis 2, by doubling.

    `(B, H, n, F)` from `(B, H, n, F)` and an initial `(B, H, F)`.
    """
    levels = ops.maximum(chunk_max, initial_level[:, :, None, :])
    num_chunks = levels.shape[2]

    def step(shift, levels):
        earlier = ops.concatenate(
            [ops.full_like(levels[:, :, :shift], NO_KEY_LEVEL), levels], axis=2
        )[:, :, : ops.shape(levels)[2]]
        return shift * 2, ops.maximum(levels, earlier)

    if num_chunks is None:
        return ops.while_loop(
            lambda shift, _: shift < ops.shape(levels)[2], step, (1, levels)
        )[1]
    shift = 1
    while shift < num_chunks:
        shift, levels = step(shift, levels)
    return levels


def _features_to_batch(x, trailing):
    """`(B, H, n, F, *S)` to `(B, H F, n, *S)`, keeping `trailing` axes of
    `S` (a size-1 feature axis where the scan expects one)."""
    x = ops.moveaxis(x, 3, 2)
    shape = ops.shape(x)
    return ops.reshape(x, (shape[0], -1, shape[3]) + trailing)


def _features_from_batch(x, num_heads, num_features):
    """`(B, H F, n, ...)` back to `(B, H, n, F)` plus the axes after `F`."""
    shape = ops.shape(x)
    x = ops.reshape(x, (shape[0], num_heads, num_features) + tuple(shape[2:]))
    return ops.moveaxis(x, 2, 3)


def _inherit_per_feature(chunk_kv, chunk_sum, chunk_level, state, prefix_block):
    """`inherited_states` with each feature scanned at its own level.

    Each feature becomes a batch row of the scan, with a state of one
    feature: sums `(1, D)` and `(1,)`.
    """
    batch, num_heads, _, num_features, value_dim = ops.shape(chunk_kv)
    key_values, key_sum, level = state
    kv, key_sum, level, final_state = inherited_states(
        _features_to_batch(chunk_kv, (1, value_dim)),
        _features_to_batch(chunk_sum, (1,)),
        _features_to_batch(chunk_level, ()),
        (
            ops.reshape(key_values, (batch, -1, 1, value_dim)),
            ops.reshape(key_sum, (batch, -1, 1)),
            ops.reshape(level, (batch, -1)),
        ),
        prefix_block,
    )
    heads_features = (batch, num_heads, num_features)
    final_state = (
        ops.reshape(final_state[0], heads_features + (value_dim,)),
        ops.reshape(final_state[1], heads_features),
        ops.reshape(final_state[2], heads_features),
    )
    return (
        ops.squeeze(_features_from_batch(kv, num_heads, num_features), 4),
        ops.squeeze(_features_from_batch(key_sum, num_heads, num_features), 4),
        _features_from_batch(level, num_heads, num_features),
        final_state,
    )


def _times(values, x):
    return x if values is None else x * values


def log_domain_causal_attention(
    query_parts,
    key_parts,
    value,
    mask,
    state,
    dropout_rate=0.0,
    dropout_seed=None,
    prefix_block=8,
):
    """Causal linear attention with per-feature levels (module docstring).

    Off TensorFlow (`backend.reserves_every_branch`), sequences longer
    than `EXACT_BLOCK` positions run block after block (`keras.ops.scan`),
    each block starting from the state the previous one left and
    recomputed in the backward pass (`keras.remat`), so that the products
    inside the chunks are held for one block at a time. The result is the
    same as in one block, to float32 round-off.

    Args:
        query_parts, key_parts: `(values, log_scale)` feature parts,
            `log_scale` `(B, H, L, F)` (one per feature), `values` of that
            shape or None.
        value: `(B, H, L, D)`.
        mask: bool `(B, 1, L)`, True at real keys, or None.
        state: the carried `CausalState`.
        dropout_rate: float, key-feature dropout in the numerator.
        dropout_seed: `(2,)` stateless seed when `dropout_rate > 0`.
        prefix_block: int, chunks per block of the prefix scan.

    Returns:
        `(parts, state)`: the attention parts `(numerator, denominator,
        shift)` of the queries (as `causal_linear_attention` with
        `normalized=False` returns them) and the `CausalState` after the
        last key.

    Example:

    >>> import numpy as np
    >>> from keras_favor.ops import empty_causal_state
    >>> log_q = np.zeros((1, 1, 3, 2), "float32")
    >>> log_k = np.array(
    ...     [[[[0.0, 300.0], [0.0, -300.0], [5.0, 0.0]]]], "float32"
    ... )
    >>> value = np.eye(3, dtype="float32")[None, None]
    >>> state = empty_causal_state(1, 1, 2, 3)
    >>> parts, state = log_domain_causal_attention(
    ...     (None, log_q), (None, log_k), value, None, state
    ... )
    >>> [round(float(x), 1) for x in parts[2][0, 0]]  # each query's shift
    [300.0, 300.0, 300.0]
    """
    query_values, query_log = query_parts
    key_values, key_log = key_parts
    length = ops.shape(value)[2]
    if mask is None:
        mask = ops.ones_like(value[:1, :1, :, 0], "bool")
    num_blocks, block_length = _blocks(value.shape[2], prefix_block)
    if block_length is None:
        padding = (-length) % (EXACT_CHUNK * prefix_block)
    else:
        padding = num_blocks * block_length - length
    inputs = [query_values, query_log, key_values, key_log, value, mask]
    if not isinstance(padding, int) or padding:
        inputs = [
            None if x is None else pad_positions(x, padding) for x in inputs
        ]
    keep = None
    if dropout_rate:
        keep = numerator_key_features(
            ops.ones_like(inputs[3]), dropout_rate, dropout_seed
        )
    inputs.append(keep)
    if num_blocks == 1:
        parts, final_state = _attention_block(inputs, state, prefix_block)
    else:
        parts, final_state = _attention_in_blocks(
            inputs, state, prefix_block, num_blocks, block_length
        )
    parts = [x[:, :, :length] for x in parts]
    return parts, CausalState(*final_state)


def _blocks(length, prefix_block):
    """`(num_blocks, block_length)` for `length` positions (None: unknown).

    Blocks of at most `EXACT_BLOCK` positions, rounded up to whole blocks
    of the prefix scan, where a compiled step reserves memory for this
    branch whether it runs or not (`backend.reserves_every_branch`); else,
    or when `length` is None, one block (of unknown length: None).
    """
    step = EXACT_CHUNK * prefix_block
    if length is None:
        return 1, None
    if not backend.reserves_every_branch():
        return 1, -(-length // step) * step
    num_blocks = max(1, -(-length // max(EXACT_BLOCK, step)))
    block_length = -(-length // (num_blocks * step)) * step
    return num_blocks, block_length


def _attention_in_blocks(inputs, state, prefix_block, num_blocks, length):
    """`_attention_block` over `num_blocks` blocks of `length` positions,
    one after another (`keras.ops.scan`), each recomputed in the backward
    pass (`keras.remat`).

    Each block slices its positions out of the whole inputs, which the
    recomputed function takes as arguments (so that their gradients reach
    them on every backend); the whole inputs are the same at every step,
    so the backward pass keeps them once, not once per block.
    """
    present = [x is not None for x in inputs]
    value = inputs[4]
    # The recomputed function's arguments are all floating point (the mask
    # and the block's index too): `tf.recompute_grad` watches each of them.
    inputs = [
        ops.cast(x, value.dtype) if i == 5 else x
        for i, x in enumerate(inputs)
        if x is not None
    ]

    def one_block(index, state, whole):
        start = ops.cast(index, "int32") * length
        pieces = iter(
            ops.slice(
                x,
                [0, 0, start] + [0] * (len(x.shape) - 3),
                tuple(ops.shape(x)[:2]) + (length,) + tuple(ops.shape(x)[3:]),
            )
            for x in whole
        )
        block_inputs = [next(pieces) if p else None for p in present]
        block_inputs[5] = block_inputs[5] > 0.5
        parts, state = _attention_block(block_inputs, state, prefix_block)
        return [*state, *parts]

    one_block = keras.remat(one_block)

    def scan_step(carry, _):
        results = [carry[0] + 1, *one_block(carry[0], carry[1:4], inputs)]
        # `keras.ops.scan` on TensorFlow stacks outputs shaped like the
        # carry: the carry holds the block's parts too.
        return results, results

    batch_heads = ops.shape(value)[:2]
    no_parts = [
        ops.zeros(batch_heads + (length, ops.shape(value)[3]), value.dtype),
        ops.zeros(batch_heads + (length,), value.dtype),
        ops.zeros(batch_heads + (length,), value.dtype),
    ]
    final, stacked = ops.scan(
        scan_step,
        [ops.zeros((), value.dtype), *state, *no_parts],
        length=num_blocks,
    )

    def from_blocks(x):
        x = ops.moveaxis(x, 0, 2)
        shape = ops.shape(x)
        return ops.reshape(x, shape[:2] + (-1,) + shape[4:])

    return [from_blocks(x) for x in stacked[4:]], tuple(final[1:4])


def _attention_block(inputs, state, prefix_block):
    """`log_domain_causal_attention` of one block from `state`.

    Args:
        inputs: `[query_values, query_log, key_values, key_log, value, mask,
            keep]`, positions a multiple of `EXACT_CHUNK * prefix_block`;
            `keep` the numerator's dropout factors of the key features, or
            None.
        state: the carried `CausalState`.
        prefix_block: int, chunks per block of the prefix scan.

    Returns:
        `(parts, state)` as `log_domain_causal_attention` returns them.
    """
    query_values, query_log, key_values, key_log, value, mask, keep = (
        None if x is None else split_chunks(x, EXACT_CHUNK) for x in inputs
    )
    keys = mask[..., None]
    key_log = ops.where(keys, key_log, NO_KEY_LEVEL)

    # Keys at the running max of each feature at their chunk's end.
    chunk_level = ops.stop_gradient(
        _running_chunk_max(ops.max(key_log, axis=3), state[2])
    )
    key_feats = ops.exp(
        ops.where(keys, key_log - chunk_level[:, :, :, None], NO_KEY_LEVEL)
    )
    key_feats = _times(key_values, key_feats)
    chunk_kv = matmul_transposed_a(_times(keep, key_feats), value)
    kv, key_sum, level, final_state = _inherit_per_feature(
        chunk_kv, ops.sum(key_feats, axis=3), chunk_level, state, prefix_block
    )

    # Each query's largest log-term, within its chunk and in the state.
    visible = ops.logical_and(earlier_or_same(EXACT_CHUNK), mask[..., None, :])[
        ..., None
    ]
    products = query_log[..., :, None, :] + key_log[..., None, :, :]
    in_state = _seen(level)[..., None, :]
    from_state = query_log + level[..., None, :]
    top = ops.stop_gradient(
        ops.maximum(
            ops.max(ops.where(visible, products, NO_KEY_LEVEL), axis=(-2, -1)),
            ops.max(ops.where(in_state, from_state, NO_KEY_LEVEL), axis=-1),
        )
    )
    # A query that sees no key keeps the shift NO_KEY_LEVEL, so that its
    # empty parts never set the scale when merged with other parts.
    seen = _seen(top)
    top = ops.where(seen, top, 0.0)

    weights = ops.exp(
        ops.where(visible, products - top[..., None, None], NO_KEY_LEVEL)
    )
    if query_values is not None:
        weights *= query_values[..., :, None, :]
    if key_values is not None:
        weights *= key_values[..., None, :, :]
    scores = ops.sum(weights, axis=-1)
    numerator_scores = scores
    if keep is not None:
        numerator_scores = ops.sum(weights * keep[..., None, :, :], axis=-1)
    query_feats = _times(
        query_values,
        ops.exp(ops.where(in_state, from_state - top[..., None], NO_KEY_LEVEL)),
    )
    numerator = ops.matmul(numerator_scores, value) + ops.matmul(
        query_feats, kv
    )
    denominator = ops.sum(scores, axis=-1) + ops.einsum(
        "bhntf,bhnf->bhnt", query_feats, key_sum
    )
    shift = ops.where(seen, top, NO_KEY_LEVEL)
    parts = [merge_chunks(x) for x in (numerator, denominator, shift)]
    return parts, final_state
