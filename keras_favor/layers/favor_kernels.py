"""From `FavorAttention`'s projected heads to the kernels of `ops`."""

from keras import ops

from keras_favor import ops as favor_ops


def attend(
    layer, query, key, value, mask, causal, training, cache=None,
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
    query, key, value = (
        ops.transpose(ops.cast(x, "float32"), (0, 2, 1, 3))
        for x in (query, key, value)
    )
    key_mask = None if mask is None else mask[:, None, :]
    coefficient = None
    if layer.feature_map.uses_statistics:
        coefficient = _statistics_coefficient(
            layer, query, key, key_mask,
            None if query_mask is None else query_mask[:, None, :],
            causal or cache is not None, training and cache is None,
        )
    feature_fn, query_feature_fn = layer._feature_fns(coefficient)
    dropout = training and cache is None and layer.dropout > 0
    dropout_rate = layer.dropout if dropout else 0.0
    dropout_seed = layer._dropout_seed.next() if dropout else None
    num_features = layer.feature_map.feature_dim(
        layer.num_features, layer.key_dim
    )
    if layer.local_window:
        _check_window_lengths(query, key)
        # The exact kernel's units: the queries' full features.
        outputs = favor_ops.local_window_attention(
            query, key, value, feature_fn, num_features, layer.local_window,
            bool(causal), mask=key_mask, query_feature_fn=feature_fn,
            recompute_length=layer.recompute_length,
            chunk_size=layer.chunk_size, dropout_rate=dropout_rate,
            dropout_seed=dropout_seed, initial_state=cache,
            return_state=cache is not None,
        )
    elif causal:
        outputs = favor_ops.causal_linear_attention(
            query, key, value, feature_fn, num_features, mask=key_mask,
            query_feature_fn=query_feature_fn,
            recompute_length=layer.recompute_length,
            chunk_size=layer.chunk_size, dropout_rate=dropout_rate,
            dropout_seed=dropout_seed, initial_state=cache,
            return_state=cache is not None,
        )
    else:
        outputs = favor_ops.bidirectional_linear_attention(
            query, key, value, feature_fn, mask=key_mask,
            query_feature_fn=query_feature_fn,
            recompute_length=layer.recompute_length,
            dropout_rate=dropout_rate, dropout_seed=dropout_seed,
        )
    if cache is not None:
        outputs, state = outputs
        return ops.transpose(outputs, (0, 2, 1, 3)), tuple(state)
    return ops.transpose(outputs, (0, 2, 1, 3))


def _statistics_coefficient(
    layer, query, key, mask, query_mask, causal, training
):
    """A statistics map's (FAVOR++'s) coefficient, `(B or 1, H, 1, 1)`:
    bidirectional, from these queries and keys; causal, from the moving
    statistic as it stood before this call, which a training call then
    updates (`FavorPlusPlusFeatures`)."""
    feature_map = layer.feature_map
    if not causal:
        statistic = feature_map.statistic(query, key, mask, query_mask)
        return feature_map.coefficient(statistic, layer.key_dim)[
            :, :, None, None
        ]
    stored = ops.convert_to_tensor(layer.input_statistic)
    coefficient = feature_map.coefficient(stored, layer.key_dim)
    if training:
        batch = ops.mean(
            feature_map.statistic(query, key, mask, query_mask), axis=0
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
