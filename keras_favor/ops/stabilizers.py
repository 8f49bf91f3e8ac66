"""Log-domain shifts that cancel in the attention ratio, and its guard.

Feature maps return their features in two parts, `phi = values *
exp(log_scale)` (`FeatureMap.log_scaled`). Linear attention is the ratio
`phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1)`, so a shift subtracted from the
log-scale of every key (one per batch and head), or of one query's features,
cancels exactly (docs/numerics.md, section 2). The shifts here keep every
exponential at most 1 where that is possible, and keep each query's
normalizer representable.
"""

from keras import ops

# Stands for "no key yet" in running maxima: finite, so differences of it
# stay finite, and exp(real - 1e30) is exactly 0.
NO_KEY_LEVEL = -1e30
# Query features may reach exp(30) ~ 1e13 to keep their normalizer >= 1.
MAX_QUERY_LOG_FEATURE = 30.0
# A normalizer below this means the query sees no key, or every product of
# its features with the keys' underflowed: its attention output is 0. With
# features <= exp(30), gradients then stay below ~1e25 |v| L: finite.
TINY_NORMALIZER = 1e-12
# With query features <= exp(30) and key-side factors <= 1, every product
# that is lost to underflow in float32 (below about exp(-87)) is below
# exp(-57) in the units of the normalizer. A normalizer of at least 1e-9
# (exp(-20.7)) loses under L F exp(-36) of its weight that way, below
# float32's round-off for up to a billion key features (docs/numerics.md,
# section 5); a smaller one sends causal attention to per-feature levels.
SAFE_NORMALIZER = 1e-9


def exp_times_values(values, exponent):
    """`values * exp(exponent)`, or `exp(exponent)` when `values` is None."""
    scale = ops.exp(exponent)
    return scale if values is None else values * scale


def row_log_level(log_scale, mask=None):
    """The largest log-scale of each position, `(B, H, L)`, without gradient.

    Masked positions get `NO_KEY_LEVEL`, so they enter no maximum.
    """
    level = ops.stop_gradient(ops.max(log_scale, axis=-1))
    if mask is None:
        return level
    return ops.where(mask, level, NO_KEY_LEVEL)


def column_log_level(log_scale, mask=None):
    """The largest log-scale of each feature over the positions, without
    gradient: `(B, H, F)` from `(B, H, L, F)`, `NO_KEY_LEVEL` where no
    position is valid. Masked positions enter no maximum."""
    if mask is not None:
        log_scale = ops.where(mask[..., None], log_scale, NO_KEY_LEVEL)
    return ops.stop_gradient(ops.max(log_scale, axis=2))


def log_key_sum(key_sum):
    """`log(key_sum)`, finite (about -85) where the sum is 0."""
    return ops.log(ops.maximum(key_sum, 1e-37))


def query_features(
    values, log_scale, key_sum_log_bounds=(), return_shift=False
):
    """Query features with one shift per query, which cancels in its ratio.

    For purely exponential features (`values is None`) and lower bounds
    `w <= phi(K)^T 1` of the key sum (as it is scaled in the normalizer), the
    shift is the largest `max_f(log_scale_f + log w_f)`: then the normalizer
    `phi(q) . phi(K)^T 1 >= phi(q) . w >= 1`, so it can neither underflow
    nor give the division an overflowing gradient, however far apart the
    query and key logits are (docs/numerics.md, section 3). Otherwise the
    shift is the row max of `log_scale` (features at most 1).

    Args:
        values, log_scale: the query feature parts, `(B, H, L, F)` or None.
        key_sum_log_bounds: pairs `(log_w, offset)`, each bounding the key
            sum seen by a query by `w = exp(log_w + offset)`: `log_w`
            broadcasts against `log_scale`, `offset` (one per query) against
            its rows, or is None. A bound in two factors spares the
            logarithm of their `(L, F)` product.
        return_shift: bool, whether to return the `(B, H, L)` shift too
            (0 without a log-scale): the features are `exp(-shift)` times
            the unshifted ones.
    """
    if log_scale is None:
        if return_shift:
            return values, ops.zeros_like(values[..., 0])
        return values
    shift = row_log_level(log_scale)
    if values is None and key_sum_log_bounds:
        bounded = None
        for log_w, offset in key_sum_log_bounds:
            bound = ops.max(log_scale + log_w, axis=-1)
            if offset is not None:
                bound += offset
            bounded = bound if bounded is None else ops.maximum(bounded, bound)
        bounded = ops.stop_gradient(bounded)
        # Capped at exp(MAX_QUERY_LOG_FEATURE), which bounds the features
        # met by keys the bounds leave out (earlier in the same chunk) and
        # those of a query that sees no key yet, whose bounds are about
        # NO_KEY_LEVEL: the cap alone keeps its features finite.
        shift = ops.maximum(bounded, shift - MAX_QUERY_LOG_FEATURE)
    features = exp_times_values(values, log_scale - shift[..., None])
    return (features, shift) if return_shift else features


def key_exponent(log_scale, shift, mask):
    """`log_scale - shift`, and `NO_KEY_LEVEL` at masked keys.

    `shift` broadcasts against `log_scale`, `mask` against its rows.

    Masked before `exp`, so padded keys produce neither an overflow nor a
    NaN gradient, and `exp(NO_KEY_LEVEL)` is exactly 0.
    """
    exponent = log_scale - shift
    if mask is None:
        return exponent
    return ops.where(mask[..., None], exponent, NO_KEY_LEVEL)


def shifted_key_features(values, log_scale, shift, mask):
    """`values * exp(log_scale - shift)`, exactly zero at masked keys."""
    if log_scale is None:
        if mask is None:
            return values
        return ops.where(mask[..., None], values, 0.0)
    return exp_times_values(values, key_exponent(log_scale, shift, mask))


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

    @ops.custom_gradient
    def ratio(numerator, denominator):
        sees_nothing = ops.abs(denominator) < TINY_NORMALIZER
        safe = ops.where(sees_nothing, ops.ones_like(denominator), denominator)
        inverse = ops.where(sees_nothing, ops.zeros_like(safe), 1.0 / safe)
        outputs = numerator * inverse[..., None]

        def gradient(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            numerator_grad = upstream * inverse[..., None]
            return numerator_grad, -ops.sum(numerator_grad * outputs, axis=-1)

        return outputs, gradient

    return ratio(numerator, denominator)
