"""`MultiHeadAttention`'s layout of heads and positions, for `FavorAttention`.

Inputs are `(batch, *positions, dim)` with one or more position axes. The
dense sub-layers use `MultiHeadAttention`'s einsum equations for the input's
rank, so their weights have the same shapes for every rank. Attention then
runs over all positions jointly: the position axes are flattened (row-major)
to one length axis and restored afterwards, which is what
`MultiHeadAttention` computes with its default `attention_axes=None`.
"""

import math
import string

from keras import ops

from keras_favor import backend


def projection_equation(free_dims, bound_dims, output_dims):
    """The einsum of a projection and its bias axes, as `MultiHeadAttention`
    builds them: `free_dims` kept axes, `bound_dims` contracted ones,
    `output_dims` new ones."""
    letters = string.ascii_lowercase
    free = letters[:free_dims]
    bound = letters[free_dims : free_dims + bound_dims]
    start = free_dims + bound_dims
    out = letters[start : start + output_dims]
    return f"{free}{bound},{bound}{out}->{free}{out}", out


def head_projection(rank, num_heads, head_dim):
    """Equation, output shape and bias axes of the query, key or value
    projection of a rank-`rank` input: `(B, *P, dim) -> (B, *P, N, h)`."""
    equation, bias_axes = projection_equation(rank - 1, 1, 2)
    return equation, (None,) * (rank - 2) + (num_heads, head_dim), bias_axes


def output_projection(rank, output_shape):
    """Equation, output shape and bias axes of the output projection,
    `(B, *P, N, h) -> (B, *P, *output_shape)`."""
    equation, bias_axes = projection_equation(rank - 1, 2, len(output_shape))
    return equation, (None,) * (rank - 2) + tuple(output_shape), bias_axes


def _flat_shape(batch_and_positions):
    """`(batch, length)` for a reshape, with `-1` where it is unknown."""
    batch, *positions = batch_and_positions
    if all(isinstance(p, int) for p in positions):
        return (-1, math.prod(positions))
    return (batch, -1)


def merge_positions(x, num_trailing):
    """`(B, *P, *trailing)` to `(B, prod(P), *trailing)`."""
    if len(x.shape) == 2 + num_trailing:
        return x
    shape = ops.shape(x)
    leading = _flat_shape(shape[: len(shape) - num_trailing])
    trailing = tuple(x.shape[len(x.shape) - num_trailing :])
    return ops.reshape(x, leading + trailing)


def split_positions(x, positions):
    """`(B, L, *trailing)` back to `(B, *positions, *trailing)`."""
    if len(positions) == 1:
        return x
    batch = -1 if all(isinstance(p, int) for p in positions) else None
    if batch is None:
        batch = ops.shape(x)[0]
    return ops.reshape(x, (batch,) + tuple(positions) + tuple(x.shape[2:]))


def causal_keys(query_length, key, value, mask):
    """Keys, values and `(B, S)` mask aligned to `query_length` positions.

    With causal attention, query `i` sees the keys `j <= i`, as
    `MultiHeadAttention`'s `(T, S)` lower-triangular mask: for `T < S` the
    keys after `T` are seen by none (they are cut), and for `T > S` the
    queries after `S` see every key (masked keys are appended). Returns
    `key`, `value` and `mask` unchanged when the lengths are equal.
    """
    key_length = key.shape[1]
    if isinstance(query_length, int) and query_length == key_length:
        return key, value, mask
    if mask is None:
        mask = ops.ones(backend.runtime_shape(key)[:2], "bool")
    return (
        backend.fit_positions(key, query_length, 0.0),
        backend.fit_positions(value, query_length, 0.0),
        backend.fit_positions(mask, query_length, False),
    )
