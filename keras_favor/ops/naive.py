"""Quadratic references: attention through the full `(T, S)` matrix.

`naive_linear_attention` computes what the linear-time kernels in
`bidirectional_attention` and `causal_attention` compute, with the same
features but through the explicit score matrix `phi(Q) phi(K)^T` and without
any stabilizer, so its results are the oracle the kernels are tested against
(evaluate it in float64). `softmax_attention` is exact softmax attention, the
kernel that the softmax feature maps estimate. Both take time and memory
quadratic in the length: use them for tests and measurements only.
"""

from keras import ops


def _seen_keys(mask, causal, query_length, key_length):
    """Bool, broadcasting to `(B, H, T, S)`: which keys each query sees."""
    seen = None
    if mask is not None:
        seen = mask[:, :, None, :]
    if causal:
        earlier = ops.tril(ops.ones((query_length, key_length), "bool"))
        seen = earlier if seen is None else ops.logical_and(seen, earlier)
    return seen


def _attention_from_scores(scores, value, seen):
    """`scores V / scores 1` over the keys each query sees.

    A query whose scores are all zero (it sees no key) gets 0, as in the
    kernels.
    """
    if seen is not None:
        scores = ops.where(seen, scores, ops.zeros_like(scores))
    normalizer = ops.sum(scores, axis=-1, keepdims=True)
    sees_nothing = ops.equal(normalizer, 0)
    safe = ops.where(sees_nothing, ops.ones_like(normalizer), normalizer)
    outputs = ops.matmul(scores, value) / safe
    return ops.where(sees_nothing, ops.zeros_like(outputs), outputs)


def naive_linear_attention(
    query,
    key,
    value,
    feature_fn,
    mask=None,
    causal=False,
    query_feature_fn=None,
):
    """`phi(Q) phi(K)^T V / phi(Q) phi(K)^T 1` through the `(T, S)` matrix.

    Args:
        query: `(B, H, T, d)` heads; key `(B, H, S, d)`; value `(B, H, S, D)`.
        feature_fn: maps `(..., d)` heads to their features `phi`,
            `(..., F)`, for example `lambda x: feature_map(x, projection)`.
        mask: bool `(B, 1, S)`, True at real keys, or None.
        causal: bool, whether query `t` sees keys `s <= t` only.
        query_feature_fn: the queries' `feature_fn`; defaults to
            `feature_fn`.

    Returns:
        `(B, H, T, D)`, in the dtype of the features.
    """
    query_feature_fn = query_feature_fn or feature_fn
    scores = ops.matmul(
        query_feature_fn(query), ops.swapaxes(feature_fn(key), -1, -2)
    )
    seen = _seen_keys(mask, causal, scores.shape[-2], scores.shape[-1])
    return _attention_from_scores(scores, value, seen)


def softmax_attention(query, key, value, mask=None, causal=False):
    """Exact softmax attention `softmax(Q K^T / sqrt(d)) V`.

    Args:
        query: `(B, H, T, d)` heads; key `(B, H, S, d)`; value `(B, H, S, D)`.
        mask: bool `(B, 1, S)`, True at real keys, or None.
        causal: bool, whether query `t` sees keys `s <= t` only.

    Returns:
        `(B, H, T, D)`.
    """
    logits = ops.matmul(query, ops.swapaxes(key, -1, -2))
    logits = logits / ops.sqrt(ops.cast(query.shape[-1], logits.dtype))
    seen = _seen_keys(mask, causal, logits.shape[-2], logits.shape[-1])
    if seen is not None:
        # Unseen keys enter neither the max nor the sums.
        logits = ops.where(seen, logits, ops.full_like(logits, -1e30))
    logits = logits - ops.max(logits, axis=-1, keepdims=True)
    return _attention_from_scores(ops.exp(logits), value, seen)
