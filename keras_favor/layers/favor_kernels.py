"""`FavorAttention`'s computations: its own weights (the random projection
and what goes with it), and its inputs through the dense projections and
feature maps to the kernels of `ops`."""

import random

import keras
from keras import ops

from keras_favor import backend
from keras_favor import ops as favor_ops
from keras_favor.distribute import replica_sequence_parallel
from keras_favor.distribute import sequence_parallel
from keras_favor.layers import multi_head_layout as layout
from keras_favor.ops import one_shard
from keras_favor.validation import stateless_seed

SEED_RANGE = 2**31 - 1


def initial_projection(layer, shape):
    """The projection drawn at build: from the layer's `seed`, else from a
    seed drawn now."""
    seed = layer.seed
    if seed is None:
        seed = random.randrange(SEED_RANGE)
    return layer.projection_distribution(shape, seed)


def add_favor_weights(layer):
    """Adds `layer`'s own weights at build: the projection (where the
    feature map has one), the redraw count, FAVOR++'s input statistic, and
    the seed generators of unseeded redraws and of dropout."""
    if layer.feature_map.requires_projection:
        layer.projection = layer.add_weight(
            name="projection",
            shape=(layer.num_features, layer.key_dim),
            initializer=lambda shape, dtype=None: initial_projection(
                layer, shape
            ),
            trainable=False,
            dtype="float32",
            autocast=False,
        )
        if layer.seed is None:
            # Unseeded redraws: a stateful seed, new at every call, also
            # inside a tf.function.
            layer._redraw_seed = keras.random.SeedGenerator()
    layer.redraw_count = layer.add_weight(
        name="redraw_count",
        shape=(),
        initializer="zeros",
        trainable=False,
        dtype="int32",
    )
    if layer.feature_map.uses_statistics:
        # FAVOR++'s moving input statistic per head, for causal calls.
        layer.input_statistic = layer.add_weight(
            name="input_statistic",
            shape=(layer.num_heads,),
            initializer="zeros",
            trainable=False,
            dtype="float32",
            autocast=False,
            aggregation="mean",
        )
    if layer.dropout > 0:
        layer._dropout_seed = backend.seed_generator(layer.seed)


def redraw_projection(layer, seed=None):
    """`FavorAttention.redraw_features` (see there)."""
    if layer.projection is None:
        return None
    if seed is not None:
        seed = stateless_seed(seed)
    elif layer.seed is None:
        seed = layer._redraw_seed.next()
    else:
        seed = backend.fold_in(
            backend.int_pair_seed(layer.seed, 0), layer.redraw_count.value + 1
        )
    layer.projection.assign(
        layer.projection_distribution(layer.projection.shape, seed)
    )
    layer.redraw_count.assign_add(1)
    return layer.projection


def feature_fns(layer, coefficient=None):
    """Map `(B, H, T, d)` float32 key and query heads to feature parts
    (with a statistics map's `coefficient`, shared by both)."""
    projection = None
    if layer.projection is not None:
        projection = ops.convert_to_tensor(layer.projection)
    return one_shard.feature_fns(layer.feature_map, projection, coefficient)


def attend_inputs(
    layer,
    query,
    value,
    key,
    mask,
    causal,
    training,
    cache=None,
    statistics_mask=None,
):
    """`layer`'s attention from its checked inputs `(B, *T, dim)` and the
    combined key mask `(B, *S)` to the heads `(B, *T, N, hv)` before the
    output projection; with a `cache`, also the state after the last
    position."""
    same_positions = key is query
    # The dense sub-layers get no mask (they would warn that they do not
    # support masking).
    query, value, key = (ops.copy(x) for x in (query, value, key))
    query = layer.query_dense(query)
    positions = ops.shape(query)[1:-2]
    query, key, value = (
        layout.merge_positions(x, 2)
        for x in (query, layer.key_dense(key), layer.value_dense(value))
    )
    if mask is not None:
        mask = layout.merge_positions(mask, 0)
    if statistics_mask is not None:
        statistics_mask = layout.merge_positions(statistics_mask, 0)
    if causal and not same_positions:
        key, value, mask = layout.causal_keys(
            ops.shape(query)[1], key, value, mask
        )
    outputs = attend(
        layer, query, key, value, mask, causal, training, cache, statistics_mask
    )
    if cache is not None:
        outputs, cache = outputs
        return layout.split_positions(outputs, positions), cache
    return layout.split_positions(outputs, positions)


def attend(
    layer,
    query,
    key,
    value,
    mask,
    causal,
    training,
    cache=None,
    query_mask=None,
):
    """`layer`'s linear attention on `(B, L, N, h)` heads.

    Args:
        layer: a built `FavorAttention`.
        query, key, value: `(B, L, N, h)` heads (`hv` for the values).
        mask: None or the bool `(B, S)` key mask.
        causal: bool, whether query `i` sees keys `j <= i` only.
        training: bool, whether dropout and statistics updates are on.
        cache: None, or the causal state before the first position.
        query_mask: None or `(B, T)`, the queries a statistic counts.

    Returns:
        `(B, L, N, hv)` float32 outputs; with a `cache`, also the state
        after the last position.
    """
    module, sharding = _sequence_sharding(layer, causal, training, cache)
    if _window_covers_every_key(layer, module, query, key, training, cache):
        return _exact_attention(query, key, value, mask, causal)
    query, key, value = (
        ops.transpose(ops.cast(x, "float32"), (0, 2, 1, 3))
        for x in (query, key, value)
    )
    key_mask = None if mask is None else mask[:, None, :]
    coefficient = _statistics_coefficient(
        layer,
        query,
        key,
        key_mask,
        None if query_mask is None else query_mask[:, None, :],
        causal or cache is not None,
        training and cache is None,
        None if sharding is None else sharding.sum_over_segments,
    )
    dropout_rate, dropout_seed = _feature_dropout(layer, training, cache)
    if sharding is not None:
        heads = (query, key, value, key_mask)
        return _sequence_sharded(
            layer, module, sharding, heads, causal, coefficient, dropout_rate
        )
    feature_fn, query_feature_fn = feature_fns(layer, coefficient)
    num_features = layer.feature_map.feature_dim(
        layer.num_features, layer.key_dim
    )
    if layer.local_window:
        _check_window_lengths(query, key)
        # The exact kernel's units: the queries' full features.
        outputs = favor_ops.local_window_attention(
            query,
            key,
            value,
            feature_fn,
            num_features,
            layer.local_window,
            bool(causal),
            mask=key_mask,
            query_feature_fn=feature_fn,
            recompute_length=layer.recompute_length,
            chunk_size=layer.chunk_size,
            dropout_rate=dropout_rate,
            dropout_seed=dropout_seed,
            initial_state=cache,
            return_state=cache is not None,
        )
    elif causal:
        outputs = favor_ops.causal_linear_attention(
            query,
            key,
            value,
            feature_fn,
            num_features,
            mask=key_mask,
            query_feature_fn=query_feature_fn,
            recompute_length=layer.recompute_length,
            chunk_size=layer.chunk_size,
            dropout_rate=dropout_rate,
            dropout_seed=dropout_seed,
            initial_state=cache,
            return_state=cache is not None,
        )
    else:
        outputs = favor_ops.bidirectional_linear_attention(
            query,
            key,
            value,
            feature_fn,
            mask=key_mask,
            query_feature_fn=query_feature_fn,
            recompute_length=layer.recompute_length,
            dropout_rate=dropout_rate,
            dropout_seed=dropout_seed,
        )
    if cache is not None:
        outputs, state = outputs
        return ops.transpose(outputs, (0, 2, 1, 3)), tuple(state)
    return ops.transpose(outputs, (0, 2, 1, 3))


def _feature_dropout(layer, training, cache):
    """`(rate, seed)` of the call's feature dropout: `(0.0, None)` unless
    a training call without a cache and a nonzero `dropout`."""
    if training and cache is None and layer.dropout > 0:
        return layer.dropout, layer._dropout_seed.next()
    return 0.0, None


def _sequence_sharding(layer, causal, training, cache):
    """`(module, sharding)` of the sequence sharding in effect: a JAX
    mesh's `sequence` axis (`sequence_parallel`), the replicas of
    `sequence_replicas()` (`replica_sequence_parallel`), or `(None,
    None)`. Raises for a call that replicas, each holding a segment,
    cannot shard."""
    sharding = sequence_parallel.current_sharding()
    if sharding is not None:
        # A cached call sees one whole sequence: no split.
        return (
            (None, None) if cache is not None else (sequence_parallel, sharding)
        )
    sharding = replica_sequence_parallel.current_sharding()
    if sharding is None:
        return None, None
    if cache is not None:
        raise ValueError(
            "Decoding with a `cache` has no form sharded across replicas: "
            "call the layer outside `sequence_replicas()`."
        )
    return replica_sequence_parallel, sharding


def _sequence_sharded(
    layer, module, sharding, heads, causal, coefficient, dropout
):
    """`attend`'s kernels with the positions split across the devices of a
    JAX mesh or the replicas of a strategy (`module`'s
    `sharded_linear_attention` with `sharding`), on the `(B, N, L, h)`
    query, key and value heads and the `(B, 1, S)` key mask of `heads`;
    `(B, L, N, hv)` outputs. `dropout`: the call's feature dropout rate,
    which has no sharded form."""
    if dropout:
        raise ValueError(
            "Feature dropout has no sequence-sharded form: set the "
            "layer's `dropout` to 0 or run without sequence sharding. "
            f"Received: dropout={layer.dropout}"
        )
    query, key, value, mask = heads
    projection = None
    if layer.projection is not None:
        projection = ops.convert_to_tensor(layer.projection)
    if layer.local_window:
        _check_window_lengths(query, key)
    outputs = module.sharded_linear_attention(
        sharding,
        query,
        key,
        value,
        layer.feature_map,
        projection,
        layer.feature_map.feature_dim(layer.num_features, layer.key_dim),
        bool(causal),
        mask=mask,
        coefficient=coefficient,
        window=layer.local_window,
        chunk_size=layer.chunk_size,
        recompute_length=layer.recompute_length,
    )
    return ops.transpose(outputs, (0, 2, 1, 3))


def _statistics_coefficient(
    layer, query, key, mask, query_mask, causal, training, total
):
    """A statistics map's (FAVOR++'s) coefficient, `(B or 1, H, 1, 1)`:
    bidirectional, from these queries and keys; causal, from the moving
    statistic as it stood before this call, which a training call then
    updates (`FavorPlusPlusFeatures`). None for a map without statistics.
    `total`: None, or the sum over a sharded sequence's segments."""
    feature_map = layer.feature_map
    if not feature_map.uses_statistics:
        return None
    if not causal:
        statistic = feature_map.statistic(query, key, mask, query_mask, total)
        return feature_map.coefficient(statistic, layer.key_dim)[
            :, :, None, None
        ]
    stored = ops.convert_to_tensor(layer.input_statistic)
    coefficient = feature_map.coefficient(stored, layer.key_dim)
    if training:
        batch = ops.mean(
            feature_map.statistic(query, key, mask, query_mask, total), axis=0
        )
        momentum = feature_map.momentum
        layer.input_statistic.assign(
            momentum * stored + (1.0 - momentum) * batch
        )
    return coefficient[None, :, None, None]


def _check_window_lengths(query, key):
    """`local_window` compares positions: one length for queries and keys."""
    lengths = (query.shape[2], key.shape[2])
    if None not in lengths and lengths[0] != lengths[1]:
        raise ValueError(
            "`local_window` needs queries and keys at the same positions "
            f"(one length). Received: {lengths[0]} queries and {lengths[1]} "
            "keys."
        )


def _window_covers_every_key(layer, module, query, key, training, cache):
    """Whether the call is exact softmax attention, a `local_window` at
    least as long as the (static) sequence, with nothing that needs the
    window kernel: no cache, no active dropout, no moving statistic, no
    `tf.distribute` replica (whose static length is its segment's)."""
    length = query.shape[1]
    return bool(
        layer.local_window
        and module is not replica_sequence_parallel
        and cache is None
        and length  # known and nonzero
        and length == key.shape[1]
        and length <= layer.local_window
        and not (training and layer.dropout > 0)
        and not layer.feature_map.uses_statistics
    )


def _exact_attention(query, key, value, mask, causal):
    """Softmax attention on `(B, L, N, h)` heads by
    `keras.ops.dot_product_attention` (the backend's fused or flash kernel
    where it has one), float32; 0 for a query that sees no key."""
    query, key, value = (ops.cast(x, "float32") for x in (query, key, value))
    if mask is None:
        return ops.dot_product_attention(query, key, value, is_causal=causal)
    outputs = ops.dot_product_attention(
        query, key, value, mask=mask[:, None, None, :], is_causal=causal
    )
    # Softmax over no key is uniform there: the layer's convention is 0.
    if causal:
        sees_a_key = ops.cumsum(ops.cast(mask, "int32"), axis=1) > 0
    else:
        sees_a_key = ops.any(mask, axis=1, keepdims=True)
    return outputs * ops.cast(sees_a_key, "float32")[:, :, None, None]
