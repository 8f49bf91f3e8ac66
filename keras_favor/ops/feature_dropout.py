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
    if backend.is_tensorflow():
        import tensorflow as tf

        keep = tf.random.stateless_uniform(tf.shape(key_feats), seed) >= rate
        return tf.where(keep, key_feats / (1.0 - rate), 0.0)
    keep = backend.stateless_uniform(tuple(key_feats.shape), seed) >= rate
    return ops.where(
        keep, key_feats / ops.cast(1.0 - rate, key_feats.dtype),
        ops.zeros((), key_feats.dtype),
    )


def group_seed(seed, index, num_groups):
    """The stateless dropout seed of group `index` of `num_groups`."""
    if seed is None or num_groups == 1:
        return seed
    if backend.is_tensorflow():
        import tensorflow as tf

        return tf.random.experimental.stateless_fold_in(seed, index)
    return backend.fold_in(seed, index)
