"""Dropout of key features in the numerator of linear attention.

There is no attention matrix to drop entries from. Dropping each key feature
of `phi(K)^T V` with probability `rate` (and scaling the survivors by
`1 / (1 - rate)`) while the normalizer keeps all features equals, in
expectation, dropout on the attention weights (docs/numerics.md, section 6).
The masks come from stateless seeds, so a recomputation in the backward pass
drops the same features.
"""

from keras import ops

from keras_favor import backend


def numerator_key_features(key_feats, rate, seed):
    """Key features for the numerator: dropped out when `rate > 0`."""
    if not rate:
        return key_feats
    keep = (
        backend.stateless_uniform(backend.runtime_shape(key_feats), seed)
        >= rate
    )
    return ops.where(
        keep,
        key_feats / ops.cast(1.0 - rate, key_feats.dtype),
        ops.zeros((), key_feats.dtype),
    )


def group_seed(seed, index, num_groups):
    """The stateless dropout seed of group `index` of `num_groups`."""
    if seed is None or num_groups == 1:
        return seed
    # On TensorFlow the index folds in as an int32, as these seeds always
    # have: the dropout masks of a seed stay the same.
    return backend.fold_in(seed, index, dtype="int32")
