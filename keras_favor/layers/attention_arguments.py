"""Checks and conversions of `FavorAttention`'s arguments.

Every error names the argument and says what is allowed. Shapes are checked
statically where they are known; inside a `tf.function` whose shapes are
partly unknown, cheap assertions check the rest when the function runs
(XLA compiles assertions away: there, only the static checks hold).
"""

from keras import ops

from keras_favor import backend
from keras_favor.validation import is_int


def normalized_output_shape(output_shape):
    """`output_shape` as a tuple of positive ints, or None."""
    if output_shape is None:
        return None
    dims = (output_shape,) if is_int(output_shape) else output_shape
    if isinstance(dims, (str, bytes)) or not hasattr(dims, "__iter__"):
        dims = None
    else:
        dims = tuple(dims)
    if not dims or not all(is_int(d) and d > 0 for d in dims):
        raise ValueError(
            "Invalid `output_shape`: `output_shape` must be None, a positive "
            "int or a non-empty tuple of positive ints. Received: "
            f"output_shape={output_shape!r}"
        )
    return tuple(int(d) for d in dims)


def normalized_attention_axes(attention_axes):
    """`attention_axes` as None or a tuple of ints (see `check_attention_axes`
    for the values `FavorAttention` supports)."""
    if attention_axes is None:
        return None
    axes = (attention_axes,) if is_int(attention_axes) else attention_axes
    if not isinstance(axes, (list, tuple)) or not all(is_int(a) for a in axes):
        raise ValueError(
            "`attention_axes` must be None, an int or a tuple of ints. "
            f"Received: attention_axes={attention_axes!r}"
        )
    return tuple(int(a) for a in axes)


def check_attention_axes(attention_axes, **shapes):
    """Raises unless `attention_axes` is None or names, for every input, all
    the axes between batch and features (`MultiHeadAttention`'s default)."""
    if attention_axes is None:
        return
    for name, shape in shapes.items():
        rank = len(shape)
        axes = sorted({a if a >= 0 else rank + a for a in attention_axes})
        if axes != list(range(1, rank - 1)):
            raise ValueError(
                "FavorAttention attends over all axes between batch and "
                "features jointly: `attention_axes` must be None (the "
                f"default) or all of them, {tuple(range(1, rank - 1))} for "
                f"`{name}` of rank {rank}. Attention over some of the axes "
                "only is not supported. Received: "
                f"attention_axes={attention_axes}, {name}.shape={shape}"
            )


def check_linear_time_options(use_gate, sliding_window):
    """Raises for the `MultiHeadAttention` options FavorAttention lacks."""
    if use_gate:
        raise ValueError(
            "`use_gate=True` is not supported: FavorAttention has no gating "
            "projection (gated attention is not implemented). Received: "
            f"use_gate={use_gate!r}"
        )
    if sliding_window is not None:
        raise ValueError(
            "`sliding_window` is not supported: FavorAttention sums the "
            "features of all keys (or of all earlier keys, when causal) and "
            "has no linear-time banded form. It must be None. Received: "
            f"sliding_window={sliding_window!r}"
        )


def check_call_arguments(value, key, return_attention_scores):
    """Raises for call arguments that linear attention cannot honour."""
    if return_attention_scores:
        raise ValueError(
            "`return_attention_scores=True` is not supported: FavorAttention "
            "is linear attention, which never forms the (query length, key "
            "length) matrix of attention scores; that is what makes its time "
            "and memory linear in the length. Pass "
            "return_attention_scores=False."
        )
    if value is None and key is not None:
        raise ValueError(
            "`key` was given without `value`. Pass `value` (and optionally "
            "`key`, which defaults to `value`), or the query alone for "
            "self-attention."
        )


def _conflict(a, b):
    return a is not None and b is not None and a != b


def check_input_shapes(query_shape, value_shape, key_shape):
    """Raises unless query, value and key are `(batch, *positions, dim)`,
    of one batch size, with the same positions for value and key."""
    value_positions, key_positions = value_shape[1:-1], key_shape[1:-1]
    if len(value_positions) != len(key_positions) or any(
        _conflict(v, k) for v, k in zip(value_positions, key_positions)
    ):
        raise ValueError(
            "`value` and `key` must be equal in all dimensions but the last: "
            "a key at the position of each value. "
            f"Received: value.shape={value_shape}, key.shape={key_shape}"
        )
    shapes = {"query": query_shape, "value": value_shape, "key": key_shape}
    for name, shape in shapes.items():
        if len(shape) < 3:
            raise ValueError(
                f"FavorAttention expects `{name}` of rank 3 or more, "
                f"(batch, *positions, dim). Received: {name}.shape={shape}"
            )
    for name in ("value", "key"):
        if _conflict(query_shape[0], shapes[name][0]):
            raise ValueError(
                f"`query` and `{name}` must have the same batch size. "
                f"Received: query.shape={query_shape}, "
                f"{name}.shape={shapes[name]}"
            )


def input_shapes(query_shape, value_shape, key_shape):
    """The build shapes of query, value and key, the defaults filled in
    and checked (`check_input_shapes`)."""
    check_call_arguments(value_shape, key_shape, False)
    value_shape = query_shape if value_shape is None else value_shape
    key_shape = value_shape if key_shape is None else key_shape
    check_input_shapes(query_shape, value_shape, key_shape)
    return query_shape, value_shape, key_shape


def call_inputs(query, value, key, return_attention_scores, **masks):
    """Checks the call arguments; returns `value` and `key`, the defaults
    filled in, and the combined key mask (see `key_padding_mask`)."""
    check_call_arguments(value, key, return_attention_scores)
    value = query if value is None else value
    key = value if key is None else key
    check_input_shapes(query.shape, value.shape, key.shape)
    if backend.is_tf_tensor(query):
        value, key = runtime_shape_checks(query, value, key)
    return value, key, key_padding_mask(key, len(query.shape), **masks)


def statistics_query_mask(query_mask, key_mask, query, value, key):
    """The queries' padding mask for a statistic over the queries (FAVOR++'s
    coefficient), bool `(B, *T)` or None: `query_mask` where given; else,
    in self-attention, the keys' combined mask, the keys being at the
    queries' positions, so that padding given as a key or attention mask
    leaves padded queries out too; else None, every query counted."""
    if query_mask is not None:
        return ops.cast(query_mask, "bool")
    if key_mask is None or value is query or key is query:
        return key_mask
    return _mask_if_same_inputs(query, key, key_mask)


def _mask_if_same_inputs(query, key, key_mask):
    """`key_mask` where `query` and `key` hold the same inputs (one sequence
    given twice: two NumPy arrays, or a tensor that Keras cast once per
    argument), else all True, or None where their shapes differ."""
    if len(query.shape) != len(key.shape) or any(
        _conflict(q, k) for q, k in zip(query.shape[1:], key.shape[1:])
    ):
        return None
    if None not in tuple(query.shape[1:]) + tuple(key.shape[1:]):
        return ops.logical_or(
            key_mask, ops.logical_not(ops.all(ops.equal(query, key)))
        )
    if not backend.is_tf_tensor(query):
        return None
    # Lengths known only at run time: compare the values when the shapes
    # agree (the branches' masks have the queries' and the keys' shapes).
    query_shape = backend.runtime_shape(query)
    return backend.cond(
        ops.all(ops.equal(query_shape, backend.runtime_shape(key))),
        lambda: ops.logical_or(
            key_mask, ops.logical_not(ops.all(ops.equal(query, key)))
        ),
        lambda: ops.ones(query_shape[:-1], "bool"),
    )


def _key_form(name, mask, key_shape, query_rank):
    """`mask` as `(B, *key positions)` bool: checks its shape against the
    keys' and drops the unit query axes of a broadcast attention mask."""
    mask = ops.cast(mask, "bool")
    expected = tuple(key_shape[:-1])
    num_query_axes = query_rank - 2
    broadcast = expected[:1] + (1,) * num_query_axes + expected[1:]
    shape = tuple(mask.shape)
    allowed = f"{expected}"
    if name == "attention_mask":
        allowed = f"{expected} or {broadcast}"
        if len(shape) == len(broadcast) and all(
            d == 1 for d in shape[1 : 1 + num_query_axes]
        ):
            mask = mask[(slice(None),) + (0,) * num_query_axes]
        elif len(shape) != len(expected):
            raise ValueError(
                "FavorAttention is linear attention: it supports key padding "
                "masks and `use_causal_mask=True`, not general attention "
                "masks. `attention_mask` must have shape (batch, key_length) "
                f"or (batch, 1, key_length), here {allowed}. Received: "
                f"attention_mask.shape={shape}"
            )
    got = tuple(mask.shape)
    if len(got) != len(expected) or any(
        _conflict(g, e) for g, e in zip(got, expected)
    ):
        raise ValueError(
            f"`{name}` must mask keys: shape (batch, key_length) = {allowed}, "
            "the batch size and length of the keys (`key`, or `value` "
            f"without `key`, has shape {tuple(key_shape)}). Received: "
            f"{name}.shape={shape}"
        )
    return mask


def key_padding_mask(key, query_rank, **masks):
    """Checks the key masks (`value_mask=`, `key_mask=`, `attention_mask=`,
    each None or `(B, *key positions)`, an attention mask also with unit
    query axes) against `key` and combines them into one bool
    `(B, *key positions)` mask, or None."""
    combined = None
    for name, mask in masks.items():
        if mask is None:
            continue
        mask = _key_form(name, mask, key.shape, query_rank)
        if backend.is_tf_tensor(key):
            mask = _checked_same(
                mask,
                backend.runtime_shape(mask),
                backend.runtime_shape(key)[:-1],
                mask.shape,
                key.shape[:-1],
                f"`{name}` must have the batch size and length of the keys",
            )
        if combined is not None:
            mask = ops.logical_and(combined, mask)
        combined = mask
    return combined


def _checked_same(tensor, a, b, static_a, static_b, message):
    """`tensor`, gated on the run-time assertion `a == b` when the static
    shapes leave it open: every op that uses the returned tensor runs after
    the check, so a wrong shape fails with `message`, not with the error of
    whichever op would have met it first."""
    if None not in tuple(static_a) + tuple(static_b):
        return tensor
    return backend.checked_equal(tensor, a, b, message)


def runtime_shape_checks(query, value, key):
    """Assertions for what `check_input_shapes` could not see statically:
    equal batch sizes and equal value and key positions (TensorFlow
    tensors only: other backends trace with static shapes, which
    `check_input_shapes` already checked). Returns `value` and `key` gated
    on them (see `_checked_same`); a tensor that is the query itself needs
    no check and stays the same object."""
    shape = backend.runtime_shape
    key_is_value = key is value
    if value is not query:
        value = _checked_same(
            value,
            shape(query)[0],
            shape(value)[0],
            query.shape[:1],
            value.shape[:1],
            "`query` and `value` must have the same batch size",
        )
    if key_is_value:
        key = value
    elif key is not query:
        key = _checked_same(
            key,
            shape(query)[0],
            shape(key)[0],
            query.shape[:1],
            key.shape[:1],
            "`query` and `key` must have the same batch size",
        )
        key = _checked_same(
            key,
            shape(value)[:-1],
            shape(key)[:-1],
            value.shape[:-1],
            key.shape[:-1],
            "`value` and `key` must be equal in all dimensions but the last",
        )
    return value, key


def check_traceable_lengths(query, value, key):
    """Off TensorFlow, a clear error for symbolic position axes (as
    `model.export` traces a `(batch, None, dim)` input on JAX): the kernels
    need the lengths when they are traced; TensorFlow runs them with
    lengths known only at run time. A symbolic batch size is fine."""
    for x in (query, value, key):
        backend.require_static_lengths(
            x,
            "FavorAttention with a length unknown until run time (a "
            "SavedModel export of a `(batch, None, dim)` input)",
        )
