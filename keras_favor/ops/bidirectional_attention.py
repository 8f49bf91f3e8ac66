"""Bidirectional linear attention: `Q'(K'^T V) / Q'(K'^T 1)`."""

from keras import ops

from keras_favor.ops import stabilizers
from keras_favor.ops.feature_dropout import group_seed
from keras_favor.ops.feature_dropout import numerator_key_features
from keras_favor.ops.grouped_recompute import RECOMPUTE_LENGTH
from keras_favor.ops.grouped_recompute import position_groups
from keras_favor.ops.grouped_recompute import run_in_groups
from keras_favor.ops.grouped_recompute import split_positions
from keras_favor.ops.products import matmul_transposed_a


def _key_sums(key, value, feature_fn, mask, dropout_rate, dropout_seed):
    """`(K'^T V, K'^T 1, shift)` of some keys, taken at their own shifts.

    The shift is per feature: the max of the valid keys' log-scales,
    `(B, H, F)` (or `(B, H, 1)` for a log-scale shared by a row's
    features), and `NO_KEY_LEVEL` where there is no valid key. Every
    feature's sum then holds a term `exp(0)`, so `K'^T 1 >= 1` wherever a
    key exists, however far apart the features' scales are
    (docs/numerics.md, section 2).
    """
    values, log_scale = feature_fn(key)
    if log_scale is None:
        shift = None
    else:
        shift = stabilizers.column_log_level(log_scale, mask)
    key_feats = stabilizers.shifted_key_features(
        values, log_scale, None if shift is None else shift[:, :, None], mask
    )
    dropped = numerator_key_features(key_feats, dropout_rate, dropout_seed)
    key_values = matmul_transposed_a(dropped, value)
    if shift is None:
        shift = ops.zeros_like(key_feats[:, :, 0])
    return key_values, ops.sum(key_feats, axis=2), shift


def _add_key_sums(sums, more):
    """Two `(K'^T V, K'^T 1, shift)` triples, summed at the larger shifts.

    Each feature's sums enter with a factor `exp(shift - larger) <= 1`.
    """
    shift = ops.maximum(sums[2], more[2])
    pairs = [(s, ops.exp(s[2] - shift)) for s in (sums, more)]
    key_values = sum(s[0] * f[..., None] for s, f in pairs)
    key_sum = sum(s[1] * f for s, f in pairs)
    return key_values, key_sum, shift


def _attend_to_key_sums(query, key_values, key_sum, shift, query_feature_fn):
    """`Q'(K'^T V) / Q'(K'^T 1)` given the key sums at per-feature shifts.

    The keys' shifts move to the queries (`+ shift` on their log-scale),
    which keeps every product `q_f k_f` as it is; the query shift then makes
    the normalizer >= 1 (docs/numerics.md, section 3).
    """
    values, log_scale = query_feature_fn(query)
    if log_scale is not None:
        log_scale = log_scale + shift[:, :, None]
    query_feats = stabilizers.query_features(
        values,
        log_scale,
        [(stabilizers.log_key_sum(key_sum)[:, :, None], None)],
    )
    numerator = ops.matmul(query_feats, key_values)
    denominator = ops.einsum("bhlf,bhf->bhl", query_feats, key_sum)
    return stabilizers.normalize(numerator, denominator)


def bidirectional_key_sums(key, value, feature_fn, mask=None):
    """The keys' side of `bidirectional_linear_attention`, computed once.

    Keys that stay fixed while queries come one at a time (an encoder's,
    read by a decoder's cross-attention) are summed once; each query then
    costs `attend_to_bidirectional_key_sums`, whatever the number of keys.

    Args:
        key: `(B, H, S, d)` heads; value `(B, H, S, D)`.
        feature_fn: maps heads to `(values, log_scale)` feature parts, as
            `FeatureMap.log_scaled`.
        mask: bool `(B, 1, S)`, True at real keys, or None.

    Returns:
        `(K'^T V, K'^T 1, shift)`: float32 `(B, H, F, D)`, `(B, H, F)` and
        the per-feature shift `(B, H, F)` (or `(B, H, 1)`) they are taken at.
    """
    key_values, key_sum, shift = _key_sums(
        key, value, feature_fn, mask, 0.0, None
    )
    shift = ops.broadcast_to(shift, ops.shape(key_sum))
    return key_values, key_sum, shift


def attend_to_bidirectional_key_sums(query, key_sums, query_feature_fn):
    """`Q'(K'^T V) / Q'(K'^T 1)` from `bidirectional_key_sums`' triple.

    Args:
        query: `(B, H, L, d)` heads.
        key_sums: the `(K'^T V, K'^T 1, shift)` of `bidirectional_key_sums`.
        query_feature_fn: the queries' `feature_fn`.

    Returns:
        `(B, H, L, D)` float32, as `bidirectional_linear_attention` on the
        same keys.
    """
    return _attend_to_key_sums(query, *key_sums, query_feature_fn)


def bidirectional_linear_attention(
    query,
    key,
    value,
    feature_fn,
    mask=None,
    dropout_rate=0.0,
    dropout_seed=None,
    query_feature_fn=None,
    recompute_length=RECOMPUTE_LENGTH,
):
    """`Q'(K'^T V) / Q'(K'^T 1)` without forming any `L x S` matrix.

    Keys are summed into `K'^T V` and `K'^T 1` at one shift per feature
    (the max of the valid keys' log-scales), which moves onto the queries'
    features and so cancels in every product; queries are shifted so that
    their normalizer stays >= 1 (docs/numerics.md, sections 2 and 3).

    Args:
        query: `(B, H, L, d)` heads; key `(B, H, S, d)`; value `(B, H, S, D)`.
        feature_fn: maps heads to `(values, log_scale)` feature parts, as
            `FeatureMap.log_scaled`.
        mask: bool `(B, 1, S)`, True at real keys, or None.
        dropout_rate: float, key-feature dropout in the numerator.
        dropout_seed: `(2,)` int stateless seed, when `dropout_rate > 0`.
        query_feature_fn: the queries' `feature_fn`; defaults to
            `feature_fn`.
        recompute_length: int. When there are more queries or keys than
            this, keys and then queries run in groups of this many
            positions whose features are recomputed in the backward pass:
            training memory holds one group's features, for one more
            evaluation of the features.

    Returns:
        `(B, H, L, D)` float32.
    """
    query_feature_fn = query_feature_fn or feature_fn
    if 0 in (query.shape[2], key.shape[2]):
        # No query, or no key to see: every query's output is 0.
        return ops.zeros(ops.shape(query)[:3] + ops.shape(value)[3:])
    query_slices = position_groups(query.shape[2], recompute_length)
    key_slices = position_groups(key.shape[2], recompute_length)
    if len(query_slices) == 1 and len(key_slices) == 1:
        key_sums = _key_sums(
            key, value, feature_fn, mask, dropout_rate, dropout_seed
        )
        return _attend_to_key_sums(query, *key_sums, query_feature_fn)

    def key_group(index, inputs, shared, sums):
        key, value, mask = inputs
        seed = group_seed(dropout_seed, index, len(key_slices))
        more = _key_sums(key, value, feature_fn, mask, dropout_rate, seed)
        return [], list(_add_key_sums(sums, more))

    def query_group(index, inputs, shared, carry):
        return [_attend_to_key_sums(inputs[0], *shared, query_feature_fn)], []

    # No key yet: zero sums at NO_KEY_LEVEL, broadcast to the first group's.
    no_keys = [
        ops.zeros((1, 1, 1, 1), value.dtype),
        ops.zeros((1, 1, 1), value.dtype),
        ops.full((1, 1, 1), stabilizers.NO_KEY_LEVEL, value.dtype),
    ]
    _, key_sums = run_in_groups(
        key_group,
        [
            list(pieces)
            for pieces in zip(
                *(split_positions(x, key_slices) for x in (key, value, mask))
            )
        ],
        carry=no_keys,
        keep_last=False,
    )
    outputs, _ = run_in_groups(
        query_group,
        [[x] for x in split_positions(query, query_slices)],
        shared=key_sums,
    )
    return ops.concatenate([o[0] for o in outputs], axis=2)
