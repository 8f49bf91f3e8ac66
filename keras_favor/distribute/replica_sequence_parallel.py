"""Context parallelism on TensorFlow: the replicas of a `tf.distribute`
strategy each hold a consecutive segment of one sequence, and attend with
their own positions, exchanging only states.

Inside `sequence_replicas()`, `FavorAttention` (and so `PerformerBlock`
and `build_performer`) called in a replica context of more than one
replica (`strategy.run`) treats its inputs as segment
`replica_id_in_sync_group` of one sequence: replica 0 holds the first
positions, replica `n - 1` the last. Each replica runs the two phases of
`keras_favor.ops.sequence_shards` on its segment with one
`ReplicaContext.all_gather` of the key sums between them (and, for a local
window, of each segment's last `w` keys and values); TensorFlow's gradient
of the all-gather carries every later query's gradient back to the keys it
read, so outputs and gradients equal those of one replica on the whole
sequence to float32 round-off. Outside the scope, or with one replica,
nothing changes. docs/context_parallel.md says what to write around it.
"""

import contextlib

import keras

from keras_favor.ops import one_shard
from keras_favor.ops import sequence_shards

# How many `sequence_replicas()` scopes are open. A module-level count, not
# a thread-local one: `MirroredStrategy` runs each replica in a thread of
# its own.
_open_scopes = [0]


@contextlib.contextmanager
def sequence_replicas():
    """Shards `FavorAttention` along the sequence across `tf.distribute`
    replicas while the scope is open.

    Each replica's inputs must be a consecutive segment of one sequence
    (replica `i` the `i`-th), all segments of one length, for example from
    `strategy.experimental_distribute_values_from_function`. A replica sees
    its positions from 0: position embeddings must add the segment's
    offset themselves. The scope applies where a layer is called, and so
    where a `tf.function` is traced.

    Example:

    ```python
    with strategy.scope():
        layer = keras_favor.FavorAttention(num_heads=4, key_dim=32)
    with keras_favor.distribute.sequence_replicas():
        outputs = strategy.run(
            lambda x: layer(x, use_causal_mask=True), (segments,)
        )
    ```

    Raises:
        ValueError: on a Keras backend other than TensorFlow.
    """
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "`sequence_replicas()` splits sequences across tf.distribute "
            "replicas and needs the TensorFlow backend; on JAX, give the "
            "Keras distribution's device mesh a `sequence` axis. Received: "
            f"backend={keras.backend.backend()!r}"
        )
    _open_scopes[0] += 1
    try:
        yield
    finally:
        _open_scopes[0] -= 1


class ReplicaSegments:
    """The replicas of a `tf.distribute` replica context, each holding the
    segment of one sequence at its `replica_id_in_sync_group`.

    Attributes:
        context: a `tf.distribute.ReplicaContext`.
    """

    def __init__(self, context):
        self.context = context

    @property
    def num_shards(self):
        """The replicas in sync: the segments of the sequence."""
        return self.context.num_replicas_in_sync

    def sum_over_segments(self, tensors):
        """A nest of tensors summed over the replicas."""
        return self.context.all_reduce("SUM", tensors)

    def gather(self, x):
        """`x` of every replica stacked on a new leading axis."""
        return _dense_gradient(self.context.all_gather(x[None], axis=0))


def _dense_gradient(x):
    """`x`, with its gradient made a dense tensor: the gradient of
    TensorFlow's all-gather takes no `IndexedSlices`, which a later
    `take` of one replica's part gives."""
    import tensorflow as tf

    @tf.custom_gradient
    def identity(x):
        return tf.identity(x), tf.convert_to_tensor

    return identity(x)


def current_sharding():
    """The `ReplicaSegments` of the replica context, or None outside
    `sequence_replicas()`, outside a replica context of more than one
    replica, or on another backend."""
    if not _open_scopes[0] or keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync < 2:
        return None
    return ReplicaSegments(context)


def sharded_linear_attention(
    sharding,
    query,
    key,
    value,
    feature_map,
    projection,
    num_features,
    causal,
    mask=None,
    coefficient=None,
    window=0,
    chunk_size=64,
    recompute_length=sequence_shards.RECOMPUTE_LENGTH,
    initial_state=None,
    return_state=False,
):
    """Linear attention of this replica's segment of the sequence whose
    other segments the other replicas of `sharding` hold.

    Args:
        sharding: a `ReplicaSegments`.
        query, key: `(B, H, Ls, d)` float32 heads of the replica's segment
            (`Ss` keys for a bidirectional call); value `(B, H, Ss, D)`.
        feature_map: a `FeatureMap`.
        projection: its `(m, d)` projection, or None.
        coefficient: FAVOR++'s `(B or 1, H, 1, 1)` coefficient from the
            moving statistic, the same on every replica, or None.
        num_features: int, the features the map makes.
        causal: bool.
        mask: bool `(B, 1, Ss)`, True at real keys, or None.
        window: int, a causal local window (0 for none); then every
            replica's segment must be of one length.
        chunk_size, recompute_length: as for `causal_linear_attention`.
        initial_state: causal without a window: the `CausalState` before
            the first replica's first position, or None.
        return_state: causal without a window: also return the
            `CausalState` after the last replica's last position.

    Returns:
        `(B, H, Ls, D)` float32, and with `return_state` the state.
    """
    one_shard.check_shardable(query.shape[2], key.shape[2], causal, window)
    if mask is None:
        mask = keras.ops.ones_like(key[:, :1, :, 0], "bool")
    index = sharding.context.replica_id_in_sync_group
    if window:
        key = _with_equal_lengths(sharding, key)
    return one_shard.one_shard_attention(
        query,
        key,
        value,
        mask,
        one_shard.feature_fns(feature_map, projection, coefficient),
        num_features,
        causal,
        index,
        sharding.gather,
        lambda tail, steps: one_shard.tails_from_gathered(
            [sharding.gather(x) for x in tail], index, steps
        ),
        window=window,
        chunk_size=chunk_size,
        recompute_length=recompute_length,
        initial_state=initial_state,
        return_state=return_state,
    )


def _with_equal_lengths(sharding, key):
    """`key`, after checking that every replica's segment has its length
    (a local window reaches into the segments before by position)."""
    import tensorflow as tf

    length = tf.shape(key)[2]
    lengths = sharding.gather(length)
    check = tf.debugging.assert_equal(
        lengths,
        length,
        message=(
            "A local window sharded across replicas needs every replica's "
            "segment of one length (pad the segments and mask the padding)"
        ),
    )
    with tf.control_dependencies([check]):
        return tf.identity(key)
