"""The prefix scan of causal chunks: running maxima and inherited states.

The causal algorithm splits the positions into chunks. Each chunk's key sums
`K'^T V` and `K'^T 1` are taken at its own stabilizer level, the running max
of the keys' log-scales at its last position; a chunk then inherits the sums
of every chunk before it, each rescaled to the level before it by a factor
`exp(earlier level - later level) <= 1`, since running maxima never
decrease (docs/numerics.md, section 5). Everything here is a masked max or a
matrix product over the chunk axis: no loop, so graphs of unknown length stay
small, and every gradient is a plain matrix product.
"""

import numpy as np
from keras import ops

from keras_favor.ops.stabilizers import NO_KEY_LEVEL

# Chunk states pass on in blocks of this many chunks.
PREFIX_BLOCK = 8


def split_chunks(x, chunk_size):
    """`(B, H, L, ...)` to `(B, H, L / chunk_size, chunk_size, ...)`."""
    shape = ops.shape(x)
    return ops.reshape(x, shape[:2] + (-1, chunk_size) + shape[3:])


def pad_positions(x, padding):
    """`x` with `padding` zeros (False) after its positions, axis 2."""
    widths = [(0, 0)] * 2 + [(0, padding)] + [(0, 0)] * (len(x.shape) - 3)
    return ops.pad(x, widths)


def merge_chunks(x):
    """`(B, H, N, C, ...)` back to `(B, H, N * C, ...)`."""
    shape = ops.shape(x)
    return ops.reshape(x, shape[:2] + (-1,) + shape[4:])


def earlier_or_same(size):
    """Bool `(size, size)` matrix, True where column <= row."""
    return _position_order(size, strictly=False)


def strictly_earlier(size):
    """Bool `(size, size)` matrix, True where column < row."""
    return _position_order(size, strictly=True)


def _position_order(size, strictly):
    """`column < row` (or `<=`): a NumPy constant for an int `size`, else
    a comparison of two ranges (fewer operations to trace than a
    lower-triangular part below the diagonal)."""
    if isinstance(size, int):
        return np.tril(np.ones((size, size), bool), -1 if strictly else 0)
    positions = ops.arange(size)
    rows, columns = positions[:, None], positions[None, :]
    return rows > columns if strictly else rows >= columns


def _masked_max(x, mask):
    """`max` over the last axis of `x` broadcast by `mask`'s rows."""
    return ops.max(ops.where(mask, x[..., None, :], NO_KEY_LEVEL), axis=-1)


def running_max(levels, chunk_size, initial_level):
    """`max(initial_level, max_{s' <= s} levels_s')` along the positions.

    Inside a chunk a masked `C x C` max, across chunks a masked `n x n` max.

    Args:
        levels: `(B, H, L)` with `L` a multiple of `chunk_size`.
        chunk_size: int.
        initial_level: `(B, H)` the running max before position 0, or None
            for no key before it.
    """
    within = _masked_max(
        split_chunks(levels, chunk_size), earlier_or_same(chunk_size)
    )
    chunk_max = within[..., -1]
    before = _masked_max(chunk_max, strictly_earlier(ops.shape(chunk_max)[-1]))
    if initial_level is not None:
        before = ops.maximum(before, initial_level[..., None])
    return merge_chunks(ops.maximum(within, before[..., None]))


def flat_matmul(weights, x):
    """`einsum("...cn,...nfd->...cfd", weights, x)` as one batched matmul.

    With the trailing axes of `x` flattened, the product and both its
    gradients are plain matrix products, several times faster than the
    einsum's gradient.
    """
    rows = len(weights.shape) - 1
    shape = ops.shape(x)
    product = ops.matmul(weights, ops.reshape(x, shape[:rows] + (-1,)))
    return ops.reshape(product, ops.shape(product)[:rows] + shape[rows:])


def _levels_before(chunk_level, carried_level):
    """The level before each chunk: the carried one (`NO_KEY_LEVEL` for
    None), then each previous end."""
    if carried_level is None:
        carried_level = ops.full_like(chunk_level[..., 0], NO_KEY_LEVEL)
    return ops.concatenate(
        [carried_level[..., None], chunk_level[..., :-1]], axis=-1
    )


def _decay_from_earlier(own_level, level_before):
    """`exp(own_level_c' - level_before_c)` where `c' < c`, else 0.

    `(..., n, n)` from `(..., n)` levels: each earlier chunk's sums taken to
    the level before a later chunk.
    """
    earlier = strictly_earlier(ops.shape(own_level)[-1])
    return ops.exp(
        ops.where(
            earlier,
            own_level[..., None, :] - level_before[..., :, None],
            NO_KEY_LEVEL,
        )
    )


def _inherit(decay, sums, carried, carried_factor):
    """`decay @ sums` plus `carried` scaled by `carried_factor`, per chunk.

    The carried term is an outer product of the factors and the carried
    sums, a matrix product: its gradient is then a product too, where a
    broadcast product's is a sum over the chunks, several times slower on
    XLA's CPU backend.

    Args:
        decay: `(..., n, n)` weights of the earlier chunks' sums.
        sums: `(..., n, *S)` each chunk's sums, or None (then None).
        carried: `(..., *S)` sums from before these chunks, or None for
            none.
        carried_factor: `(..., n)` the carried sums' factor at each chunk.
    """
    if sums is None:
        return None
    inherited = flat_matmul(decay, sums)
    if carried is None:
        return inherited
    carried = ops.expand_dims(carried, len(carried_factor.shape) - 1)
    return inherited + flat_matmul(carried_factor[..., None], carried)


def _sum_at_last_level(level, sums):
    """`sum_c exp(level_c - level_last) sums_c` over the chunks.

    `(..., *S)` from `level` `(..., n)` and `sums` `(..., n, *S)`; None for
    None.
    """
    if sums is None:
        return None
    to_last = ops.exp(level - level[..., -1:])[..., None, :]
    return ops.squeeze(flat_matmul(to_last, sums), len(level.shape) - 1)


def _plus_carried(sums, carried, factor):
    """`sums + carried * factor`, `factor` `(B, H)`; `sums` alone without
    `carried`."""
    if carried is None or sums is None:
        return sums
    factor = factor[(...,) + (None,) * (len(carried.shape) - 2)]
    return sums + carried * factor


def _final_state(chunk_kv, chunk_sum, chunk_level, state):
    """The state after the last chunk: every chunk's and the carried sums
    at the last chunk's level."""
    final_level = chunk_level[..., -1]
    carried_kv, carried_sum, carried_level = state or (None, None, None)
    from_carried = None
    if state is not None:
        from_carried = ops.exp(carried_level - final_level)
    return (
        _plus_carried(
            _sum_at_last_level(chunk_level, chunk_kv), carried_kv, from_carried
        ),
        _plus_carried(
            _sum_at_last_level(chunk_level, chunk_sum),
            carried_sum,
            from_carried,
        ),
        final_level,
    )


def _dense_inherited_states(chunk_kv, chunk_sum, chunk_level, state):
    """`inherited_states` as one lower-triangular `n x n` product."""
    carried_kv, carried_sum, carried_level = state or (None, None, None)
    level = _levels_before(chunk_level, carried_level)
    decay = _decay_from_earlier(chunk_level, level)
    from_carried = None
    if state is not None:
        from_carried = ops.exp(carried_level[..., None] - level)
    kv = _inherit(decay, chunk_kv, carried_kv, from_carried)
    key_sum = _inherit(decay, chunk_sum, carried_sum, from_carried)
    final_state = _final_state(chunk_kv, chunk_sum, chunk_level, state)
    return kv, key_sum, level, final_state


def _blocked_inherited_states(
    chunk_kv, chunk_sum, chunk_level, state, prefix_block
):
    """`inherited_states` in blocks of `prefix_block` chunks.

    Chunk `c` of block `j` inherits from the chunks before it in its block
    (a `b x b` product per block) and from the blocks before `j`, whose sums
    come from `inherited_states` over the `n / b` block sums. The factor of
    an earlier chunk splits as `exp(chunk_level - block_level)`
    `* exp(block_level - block_start) * exp(block_start - level)`, each
    <= 1. `n b + (n / b)^2` instead of `n^2` products of `(F, D)` states.
    """
    level = _levels_before(chunk_level, None if state is None else state[2])
    kv, key_sum, own_level, level_before = (
        None if x is None else split_chunks(x, prefix_block)
        for x in (chunk_kv, chunk_sum, chunk_level, level)
    )
    decay = _decay_from_earlier(own_level, level_before)
    from_blocks_kv, from_blocks_sum, block_start, final_state = (
        inherited_states(
            _sum_at_last_level(own_level, kv),
            _sum_at_last_level(own_level, key_sum),
            own_level[..., -1],
            state,
            prefix_block,
        )
    )
    from_start = ops.exp(block_start[..., None] - level_before)
    kv = _inherit(decay, kv, from_blocks_kv, from_start)
    key_sum = _inherit(decay, key_sum, from_blocks_sum, from_start)
    if key_sum is not None:
        key_sum = merge_chunks(key_sum)
    return merge_chunks(kv), key_sum, level, final_state


def inherited_states(
    chunk_kv, chunk_sum, chunk_level, state, prefix_block=PREFIX_BLOCK
):
    """What each chunk inherits from the chunks before it, and the last state.

    Chunk `c` inherits `sum_{c' < c} chunk_kv_c' exp(level_c' - lvl_c)` plus
    the carried state scaled by `exp(level_0 - lvl_c)`, where `lvl_c`, the
    level after chunk `c - 1`, is the largest level before chunk `c`: every
    factor is <= 1. When the chunks fill several blocks of `prefix_block`,
    the scan runs in blocks, recursively.

    Args:
        chunk_kv: `(B, H, n, F, D)` each chunk's `K'^T V` at its own level.
        chunk_sum: `(B, H, n, F)` each chunk's `K'^T 1` at its own level,
            or None where `chunk_kv` holds it (then None in the results).
        chunk_level: `(B, H, n)` the running max at each chunk's end.
        state: the carried `CausalState` before chunk 0, with one level
            per row (`causal_state.one_level`): `(B, H)`; or None for no
            key before chunk 0, which spares the carried terms.
        prefix_block: int, chunks per block of the scan.

    Returns:
        `(key_values, key_sum, level, final_state)`: the inherited sums
        `(B, H, n, F, D)` and `(B, H, n, F)` at levels `(B, H, n)`, and the
        state after the last chunk.
    """
    num_chunks = chunk_level.shape[-1]
    if (
        num_chunks is not None
        and num_chunks > prefix_block
        and num_chunks % prefix_block == 0
    ):
        return _blocked_inherited_states(
            chunk_kv, chunk_sum, chunk_level, state, prefix_block
        )
    return _dense_inherited_states(chunk_kv, chunk_sum, chunk_level, state)
