"""Exact softmax attention over the keys within a window of each query.

The query at position `p` sees the key at position `s` when
`0 <= p - s < w` (causal) or `|p - s| < w` (bidirectional), with weights
`exp(q . k / sqrt(d))`. The `T` queries sit at the last `T` of the `S` key
positions (`S = T` for self-attention, `S = w + T` for a cached piece whose
`w` keys before it come first). Two ways to compute the same sums:

- dense, for `T <= w`: every query against every key, one `(T, S)`
  product, `O(T S d)` time: a window at least as long as the sequence is
  exact attention at exact attention's cost, and one cached position costs
  `O(w d)`;
- banded, for `T > w`: queries in blocks of `w` against the keys of their
  own block and the block before (and after), `O(S w d)` time and `O(S w)`
  memory.

Which one runs depends on `T` alone: chosen while tracing where `T` is
static, by `ops.cond` at run time where it is not.
"""

import math

from keras import ops

from keras_favor.ops import stabilizers
from keras_favor.ops.chunk_scan import merge_chunks
from keras_favor.ops.chunk_scan import split_chunks
from keras_favor.ops.feature_dropout import numerator_key_features
from keras_favor.ops.products import matmul_transposed_b


def _near(query_positions, key_positions, window, causal):
    """Bool `(..., T, S)`: whether each query position sees each key
    position, from `(..., T)` and `(..., S)` positions."""
    distance = query_positions[..., :, None] - key_positions[..., None, :]
    if causal:
        return ops.logical_and(distance >= 0, distance < window)
    return ops.abs(distance) < window


def _softmax_parts(query, keys, values, visible, dropout_rate, dropout_seed):
    """`(numerator, denominator, shift)` of softmax weights over the
    `visible` keys, shifted by each query's largest visible logit."""
    logits = matmul_transposed_b(query, keys) / math.sqrt(query.shape[-1])
    logits = ops.where(visible, logits, stabilizers.NO_KEY_LEVEL)
    shift = ops.stop_gradient(ops.max(logits, axis=-1))
    weights = ops.exp(
        ops.where(visible, logits - shift[..., None], stabilizers.NO_KEY_LEVEL)
    )
    dropped = numerator_key_features(weights, dropout_rate, dropout_seed)
    return ops.matmul(dropped, values), ops.sum(weights, axis=-1), shift


def dense_window_parts(
    query, key, value, window, causal, mask, dropout_rate, dropout_seed
):
    """`window_attention_parts` through the full `(T, S)` product."""
    length, key_length = ops.shape(query)[2], ops.shape(key)[2]
    visible = ops.logical_and(
        _near(
            ops.arange(length) + (key_length - length),
            ops.arange(key_length),
            window,
            causal,
        ),
        mask[..., None, :],
    )
    return _softmax_parts(
        query, key, value, visible, dropout_rate, dropout_seed
    )


def _neighbour_blocks(x, offset, fill):
    """The block `offset` (-1 or 1) away from each block along axis 2,
    `fill` beyond the ends."""
    edge = ops.full_like(x[:, :, :1], fill)
    if offset < 0:
        return ops.concatenate([edge, x[:, :, :-1]], axis=2)
    return ops.concatenate([x[:, :, 1:], edge], axis=2)


def _window_blocks(x, offsets, fill=0):
    """Each block's keys in the blocks at `offsets`, side by side."""
    return ops.concatenate(
        [x if o == 0 else _neighbour_blocks(x, o, fill) for o in offsets],
        axis=3,
    )


def _block_near(window, offsets, causal, num_positions):
    """Bool, broadcasting to `(n, w, len(offsets) w)`: whether query `i` of
    a block sees key `j` of the blocks at `offsets`.

    The pattern is the same in every block. Where the number of positions
    is known only at run time, it is built from every block's positions, so
    that a graph holds no `(w, len(offsets) w)` constant for a branch that
    may never run (a graph optimizer would compute it).
    """
    if isinstance(num_positions, int):
        return _near(
            ops.arange(window),
            ops.arange(len(offsets) * window) + offsets[0] * window,
            window,
            causal,
        )
    positions = split_chunks(ops.arange(num_positions)[None, None], window)
    keys = _window_blocks(positions, offsets)
    return _near(positions[0, 0], keys[0, 0], window, causal)


def banded_window_parts(
    query, key, value, window, causal, mask, dropout_rate, dropout_seed
):
    """`window_attention_parts` in blocks of `window` positions.

    Queries before the last `T` key positions are zeros whose parts are
    dropped; a block sees its own keys and those of the block before (and
    after), which hold every key within `window` of its queries.
    """
    length, key_length = ops.shape(query)[2], ops.shape(key)[2]
    query = ops.concatenate(
        [ops.zeros_like(key[:, :, : key_length - length]), query], axis=2
    )
    padding = (-key_length) % window
    widths = [(0, 0), (0, 0), (0, padding)]
    query, key, value = (
        ops.pad(x, widths + [(0, 0)]) for x in (query, key, value)
    )
    mask = ops.pad(mask, widths, constant_values=False)
    offsets = (-1, 0) if causal else (-1, 0, 1)
    query, key, value, mask = (
        split_chunks(x, window) for x in (query, key, value, mask)
    )
    keys, values = (_window_blocks(x, offsets) for x in (key, value))
    near = _block_near(window, offsets, causal, key_length + padding)
    visible = ops.logical_and(
        near, _window_blocks(mask, offsets, False)[..., None, :]
    )
    parts = _softmax_parts(
        query, keys, values, visible, dropout_rate, dropout_seed
    )
    start = key_length - length
    return tuple(merge_chunks(x)[:, :, start:key_length] for x in parts)


def window_attention_parts(
    query,
    key,
    value,
    window,
    causal,
    mask=None,
    dropout_rate=0.0,
    dropout_seed=None,
):
    """Attention parts of exact softmax attention over a window of keys.

    Args:
        query: `(B, H, T, d)` heads at the last `T` of the key positions;
            key `(B, H, S, d)`, `S >= T`; value `(B, H, S, D)`.
        window: int >= 1.
        causal: bool.
        mask: bool `(B, 1, S)`, True at real keys, or None.
        dropout_rate: float, dropout of the numerator's weights.
        dropout_seed: `(2,)` stateless seed when `dropout_rate > 0`.

    Returns:
        `(numerator (B, H, T, D), denominator (B, H, T), shift (B, H, T))`,
        shifted by each query's largest logit (about `NO_KEY_LEVEL` for a
        query that sees no key). Dense for `T <= window`, banded beyond
        (module docstring).
    """
    if mask is None:
        mask = ops.ones_like(key[:1, :1, :, 0], "bool")
    args = (query, key, value, window, causal, mask, dropout_rate, dropout_seed)
    length = query.shape[2]
    if length is not None:
        dense = length <= window
        return (dense_window_parts if dense else banded_window_parts)(*args)
    return tuple(
        ops.cond(
            ops.shape(query)[2] <= window,
            lambda: dense_window_parts(*args),
            lambda: banded_window_parts(*args),
        )
    )
