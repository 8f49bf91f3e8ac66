"""One shard's attention with the exchange given as functions: what each
device of a JAX mesh (`keras_favor.distribute.sequence_parallel`) and each
`tf.distribute` replica (`keras_favor.distribute.replica_sequence_parallel`)
runs on its consecutive shard of one sequence.

The two phases of `sequence_shards` (`shard_states`, `shard_outputs`) run
here; a backend gives the collectives: `gather`, which stacks a tensor of
every shard on a new leading axis in shard order, and `previous_tails`,
which gives a local window the last keys of the shards before this one.
"""

from keras import ops

from keras_favor.ops import sequence_shards


def feature_fns(feature_map, projection, coefficient=None):
    """The keys' and the queries' `feature_fn` of `feature_map` with this
    `projection` (and FAVOR++'s `coefficient`)."""
    options = {} if coefficient is None else {"a": coefficient}
    return (
        lambda heads: feature_map.log_scaled(heads, projection, **options),
        lambda heads: feature_map.query_log_scaled(
            heads, projection, **options
        ),
    )


def check_shardable(query_length, key_length, causal, window):
    """Raises a ValueError for a call that has no sequence-sharded form:
    causal attention of queries and keys of different lengths, or a
    bidirectional local window."""
    if causal and query_length != key_length:
        raise ValueError(
            "Causal attention sharded along the sequence needs queries and "
            f"keys of one length. Received: {query_length} queries and "
            f"{key_length} keys."
        )
    if window and not causal:
        raise ValueError(
            "`local_window` with bidirectional attention has no sequence-"
            "sharded form: use it with causal attention, or run without "
            "sequence sharding (a `sequence` mesh axis on JAX, "
            "`sequence_replicas()` on TensorFlow)."
        )


def one_shard_attention(
    query,
    key,
    value,
    mask,
    feature_fns,
    num_features,
    causal,
    index,
    gather,
    previous_tails,
    window=0,
    chunk_size=64,
    recompute_length=sequence_shards.RECOMPUTE_LENGTH,
    initial_state=None,
    return_state=False,
):
    """The outputs of shard `index`'s queries, exchanging states with the
    other shards through `gather` and `previous_tails`.

    Args:
        query, key: `(B, H, Ls, d)` float32 heads of the shard; value
            `(B, H, Ls, D)`.
        mask: bool `(B, 1, Ls)`, True at real keys.
        feature_fns: the keys' and the queries' feature functions
            (`feature_fns`).
        num_features: int, the features the map makes.
        causal: bool.
        index: int or scalar int tensor, the shard's place in the sequence.
        gather: a function of a tensor that returns every shard's tensor
            stacked on a new leading axis, in shard order.
        previous_tails: with a window, a function of the shard's `tail`
            (`shard_states`) and an int `steps` that returns the tails of
            the `steps` shards before this one, the earliest first, zeros
            for a shard before the first.
        window: int, a causal local window (0 for none).
        chunk_size, recompute_length: as for `causal_linear_attention`.
        initial_state, return_state: as for `shard_outputs`.

    Returns:
        As `shard_outputs`.
    """
    feature_fn, query_feature_fn = feature_fns
    states = sequence_shards.shard_states(
        key, value, feature_fn, mask, window, recompute_length
    )
    tail = states.pop("tail", None)
    gathered = {
        name: tuple(gather(x) for x in tensors)
        for name, tensors in states.items()
    }
    halo = None
    if window:
        steps, _ = sequence_shards.halo_sizes(window, key.shape[2])
        halo = sequence_shards.halo(previous_tails(tail, steps), window)
    return sequence_shards.shard_outputs(
        query,
        key,
        value,
        feature_fn,
        num_features,
        causal,
        gathered,
        index,
        halo=halo,
        mask=mask,
        window=window,
        query_feature_fn=query_feature_fn,
        chunk_size=chunk_size,
        recompute_length=recompute_length,
        initial_state=initial_state,
        return_state=return_state,
    )


def tails_from_gathered(tails, index, steps):
    """`previous_tails` from every shard's `tail`, each tensor stacked on
    a leading axis: the tails of shards `index - steps` to `index - 1`,
    zeros before the first shard."""
    previous = []
    for step in range(steps, 0, -1):
        source = index - step
        exists = ops.cast(source >= 0, tails[0].dtype)
        previous.append(
            tuple(
                ops.take(x, ops.maximum(source, 0), axis=0) * exists
                for x in tails
            )
        )
    return previous
