"""Causal linear attention for a single new position: the recurrent step.

Decoding feeds one position at a time. The chunked algorithm would pad it
to a chunk and run its prefix scan; one position needs only the update of
the `CausalState` `(key_values, key_sum, level)` by its key and one query
against it (docs/numerics.md, section 5). With one level per feature the update is
exact in the log domain at any scale:

    level'  = max(level, log phi(k))                      per feature
    S'      = S exp(level - level') + phi(k) exp(-level') v^T
    z'      = z exp(level - level') + phi(k) exp(-level')

and the query's parts are its sums over `S'` and `z'` times
`exp(log phi(q) + level' - shift)`, with `shift` the log of the largest
term of the normalizer `phi(q) . z'`, so that no term exceeds 1 and, for
positive features, the normalizer is at least 1.
"""

from keras import ops

from keras_favor.ops import stabilizers
from keras_favor.ops.causal_state import CausalState


def _full_log_scale(parts, like):
    """The log-scale of feature parts as `(..., F)` (zeros for None)."""
    values, log_scale = parts
    if log_scale is None:
        return ops.zeros_like(like)
    return log_scale + ops.zeros_like(like)


def one_position_attention(query_parts, key_parts, value, mask, state):
    """Attention parts of one query over the keys of `state` and its own
    key, and the state after that key.

    Args:
        query_parts, key_parts: `(values, log_scale)` feature parts of the
            `(B, H, 1, d)` query and key (`FeatureMap.log_scaled`), values
            or log-scale None where the map has none.
        value: `(B, H, 1, D)`.
        mask: bool `(B, 1, 1)`, False for a padded key (the state stays as
            it is), or None.
        state: the `CausalState` before the position.

    Returns:
        `((numerator (B, H, 1, D), denominator (B, H, 1), shift (B, H, 1)),
        new_state)`: the query's sums times `exp(-shift)`, as
        `causal_linear_attention(..., normalized=False)` returns them.
    """
    key_values, key_sum, level = state
    reference = key_sum[:, :, None, :]
    log_key = _full_log_scale(key_parts, reference)[:, :, 0]
    new_level = ops.stop_gradient(ops.maximum(level, log_key))
    if mask is not None:
        new_level = ops.where(mask, new_level, level)
    decay = ops.exp(level - new_level)
    weight = ops.exp(log_key - new_level)
    if key_parts[0] is not None:
        weight = weight * key_parts[0][:, :, 0]
    if mask is not None:
        weight = ops.where(mask, weight, 0.0)
    key_values = key_values * decay[..., None] + weight[..., None] * value
    key_sum = key_sum * decay + weight
    log_query = _full_log_scale(query_parts, reference)[:, :, 0] + new_level
    query_values = None if query_parts[0] is None else query_parts[0][:, :, 0]
    # The shift is the log of the largest term of the normalizer, so that
    # the normalizer is at least 1 for positive features (and no term
    # exceeds 1): the sums of a feature may lie far below its level.
    magnitude = ops.abs(key_sum)
    if query_values is not None:
        magnitude = magnitude * ops.abs(query_values)
    terms = log_query + stabilizers.log_key_sum(magnitude)
    shift = ops.stop_gradient(ops.max(terms, axis=-1, keepdims=True))
    query_weight = ops.exp(log_query - shift)
    if query_values is not None:
        query_weight = query_weight * query_values
    numerator = ops.einsum("bhf,bhfd->bhd", query_weight, key_values)
    denominator = ops.sum(query_weight * key_sum, axis=-1)
    parts = (numerator[:, :, None], denominator[:, :, None], shift)
    return parts, CausalState(key_values, key_sum, new_level)
