"""A FavorAttention decoding state packed into one tensor per sequence,
the form keras-hub's CausalLM tasks slice and stack (`cache[:, i, ...]`,
`ops.stack(caches, axis=1)`)."""

import math

from keras import ops


def _row_shapes(attention):
    """The shapes, without the batch axis, of `attention`'s state."""
    return [tuple(x.shape[1:]) for x in attention.empty_cache(1)]


def packed_size(attention):
    """The length of `attention`'s state packed per sequence."""
    return sum(math.prod(shape) for shape in _row_shapes(attention))


def pack(state):
    """`(B, P)` float32: the state's tensors flattened per sequence (a
    window's key mask as 0/1)."""
    batch = ops.shape(state[0])[0]
    return ops.concatenate(
        [ops.reshape(ops.cast(x, "float32"), (batch, -1)) for x in state],
        axis=1,
    )


def unpack(attention, packed):
    """The inverse of `pack` for `attention`'s state."""
    batch = ops.shape(packed)[0]
    empty = attention.empty_cache(1)
    state, start = [], 0
    for x, shape in zip(empty, _row_shapes(attention)):
        size = math.prod(shape)
        part = ops.reshape(packed[:, start : start + size], (batch,) + shape)
        state.append(ops.cast(part, x.dtype))
        start += size
    return tuple(state)
