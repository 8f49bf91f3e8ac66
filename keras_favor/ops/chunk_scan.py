"""The prefix scan of causal chunks, at one stabilizer level per feature.

The causal algorithm splits the positions into chunks. Each chunk's key sums
`K'^T V` and `K'^T 1` are taken at its own level, per feature: the largest
log-scale that feature has reached by the chunk's end. A chunk then inherits
the sums of every chunk before it, each feature rescaled to the level before
the chunk by `exp(earlier level - later level) <= 1`, since running maxima
never decrease (docs/numerics.md, section 5). Everything here is a max or a
product over the chunk axis: no loop, so graphs of unknown length stay
small.
"""

from keras import ops

from keras_favor.ops.stabilizers import NO_KEY_LEVEL

# Chunk states pass on in blocks of this many chunks.
PREFIX_BLOCK = 8


def split_chunks(x, chunk_size):
    """`(B, H, L, ...)` to `(B, H, L / chunk_size, chunk_size, ...)`."""
    shape = ops.shape(x)
    return ops.reshape(x, shape[:2] + (-1, chunk_size) + shape[3:])


def merge_chunks(x):
    """`(B, H, N, C, ...)` back to `(B, H, N * C, ...)`."""
    shape = ops.shape(x)
    return ops.reshape(x, shape[:2] + (-1,) + shape[4:])


def earlier_or_same(size):
    """Bool `(size, size)` matrix, True where column <= row."""
    return ops.tril(ops.ones((size, size), "bool"))


def running_max(x, axis):
    """The running maximum of `x` along `axis`, in `log2` steps.

    Each step takes the max with `x` shifted by twice the previous shift.
    Along an axis of unknown length, Keras's associative scan does it.
    """
    axis = axis % len(x.shape)
    length = x.shape[axis]
    if length is None:
        scanned = ops.associative_scan(ops.maximum, x, axis=axis)
        return ops.reshape(scanned, ops.shape(x))
    shift = 1
    while shift < length:
        head = ops.full_like(ops.take(x, range(shift), axis=axis), NO_KEY_LEVEL)
        body = ops.take(x, range(length - shift), axis=axis)
        x = ops.maximum(x, ops.concatenate([head, body], axis=axis))
        shift *= 2
    return x


def levels_before(chunk_level, carried_level):
    """The level before each chunk: the carried one, then each previous end.

    `(..., n, F)` from `chunk_level` `(..., n, F)` and `carried_level`
    `(..., F)`.
    """
    return ops.concatenate(
        [carried_level[..., None, :], chunk_level[..., :-1, :]], axis=-2
    )


def _decay_from_earlier(own_level, level_before):
    """`exp(own_level_c' - level_before_c)` where `c' < c`, else 0.

    `(..., n, n, F)` from `(..., n, F)` levels: each earlier chunk's sums
    taken to the level before a later chunk, feature by feature.
    """
    num_chunks = ops.shape(own_level)[-2]
    earlier = ops.tril(ops.ones((num_chunks, num_chunks), "bool"), -1)
    exponent = own_level[..., None, :, :] - level_before[..., :, None, :]
    return ops.exp(ops.where(earlier[:, :, None], exponent, NO_KEY_LEVEL))


def _inherit(decay, sums, carried, carried_factor):
    """`sum_c' decay[c, c'] sums[c']` plus the carried sums, per feature.

    Args:
        decay: `(..., n, n, F)` weights of the earlier chunks' sums.
        sums: `(..., n, F, D)` or `(..., n, F)` each chunk's sums.
        carried: `(..., F, D)` or `(..., F)` sums from before the chunks.
        carried_factor: `(..., n, F)` the carried sums' factor at each
            chunk.
    """
    if len(sums.shape) == len(decay.shape):
        inherited = ops.einsum("...cqf,...qfd->...cfd", decay, sums)
        return inherited + carried[..., None, :, :] * carried_factor[..., None]
    inherited = ops.einsum("...cqf,...qf->...cf", decay, sums)
    return inherited + carried[..., None, :] * carried_factor


def _sum_at_last_level(level, sums):
    """`sum_c exp(level_c - level_last) sums_c` over the chunks, per
    feature: `(..., F, *S)` from `level` `(..., n, F)` and `sums`
    `(..., n, F, *S)`."""
    to_last = ops.exp(level - level[..., -1:, :])
    if len(sums.shape) > len(level.shape):
        return ops.einsum("...cf,...cfd->...fd", to_last, sums)
    return ops.sum(to_last * sums, axis=-2)


def _final_state(chunk_kv, chunk_sum, chunk_level, state):
    """The state after the last chunk: every chunk's and the carried sums
    at the last chunk's levels."""
    carried_kv, carried_sum, carried_level = state
    final_level = chunk_level[..., -1, :]
    from_carried = ops.exp(carried_level - final_level)
    return (
        _sum_at_last_level(chunk_level, chunk_kv)
        + carried_kv * from_carried[..., None],
        _sum_at_last_level(chunk_level, chunk_sum)
        + carried_sum * from_carried,
        final_level,
    )


def _dense_inherited_states(chunk_kv, chunk_sum, chunk_level, state):
    """`inherited_states` as one lower-triangular `n x n` product."""
    carried_kv, carried_sum, carried_level = state
    level = levels_before(chunk_level, carried_level)
    decay = _decay_from_earlier(chunk_level, level)
    from_carried = ops.exp(carried_level[..., None, :] - level)
    kv = _inherit(decay, chunk_kv, carried_kv, from_carried)
    key_sum = _inherit(decay, chunk_sum, carried_sum, from_carried)
    final_state = _final_state(chunk_kv, chunk_sum, chunk_level, state)
    return kv, key_sum, level, final_state


def _pad_chunks(x, padding, mode):
    """Appends `padding` chunks: zero sums, or copies of the last level."""
    if mode == "zeros":
        widths = [(0, 0)] * len(x.shape)
        widths[2] = (0, padding)
        return ops.pad(x, widths)
    last = x[:, :, -1:]
    return ops.concatenate([x] + [last] * padding, axis=2)


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
    A last, partial block is filled with empty chunks at the last level.
    """
    num_chunks = chunk_level.shape[2]
    padding = -num_chunks % prefix_block
    if padding:
        chunk_kv, chunk_sum = (
            _pad_chunks(x, padding, "zeros") for x in (chunk_kv, chunk_sum)
        )
        chunk_level = _pad_chunks(chunk_level, padding, "last")
    level = levels_before(chunk_level, state[2])
    kv, key_sum, own_level, level_before = (
        split_chunks(x, prefix_block)
        for x in (chunk_kv, chunk_sum, chunk_level, level)
    )
    decay = _decay_from_earlier(own_level, level_before)
    from_blocks_kv, from_blocks_sum, block_start, final_state = (
        inherited_states(
            _sum_at_last_level(own_level, kv),
            _sum_at_last_level(own_level, key_sum),
            own_level[..., -1, :],
            state,
            prefix_block,
        )
    )
    from_start = ops.exp(block_start[..., None, :] - level_before)
    kv = _inherit(decay, kv, from_blocks_kv, from_start)
    key_sum = _inherit(decay, key_sum, from_blocks_sum, from_start)
    kv, key_sum = (merge_chunks(x)[:, :, :num_chunks] for x in (kv, key_sum))
    return kv, key_sum, level[:, :, :num_chunks], final_state


def inherited_states(
    chunk_kv, chunk_sum, chunk_level, state, prefix_block=PREFIX_BLOCK
):
    """What each chunk inherits from the chunks before it, and the last state.

    Chunk `c` inherits, feature by feature, `sum_{c' < c} chunk_kv_c'
    exp(level_c' - lvl_c)` plus the carried state scaled by
    `exp(carried_level - lvl_c)`, where `lvl_c`, the level after chunk
    `c - 1`, is the largest level before chunk `c`: every factor is <= 1.
    With more chunks than `prefix_block` the scan runs in blocks,
    recursively.

    Args:
        chunk_kv: `(B, H, n, F, D)` each chunk's `K'^T V` at its own levels.
        chunk_sum: `(B, H, n, F)` each chunk's `K'^T 1` at its own levels.
        chunk_level: `(B, H, n, F)` each feature's running max at each
            chunk's end.
        state: the carried `(key_values, key_sum, level)` before chunk 0,
            `(B, H, F, D)`, `(B, H, F)` and `(B, H, F)`.
        prefix_block: int, chunks per block of the scan.

    Returns:
        `(key_values, key_sum, level, final_state)`: the inherited sums
        `(B, H, n, F, D)` and `(B, H, n, F)` at levels `(B, H, n, F)`, and
        the state after the last chunk.
    """
    num_chunks = chunk_level.shape[2]
    if num_chunks is not None and num_chunks > prefix_block:
        return _blocked_inherited_states(
            chunk_kv, chunk_sum, chunk_level, state, prefix_block
        )
    return _dense_inherited_states(chunk_kv, chunk_sum, chunk_level, state)
