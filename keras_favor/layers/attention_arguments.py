"""Checks and conversions of `FavorAttention`'s arguments."""

import string

from keras import ops


def normalized_output_shape(output_shape):
    if output_shape is None:
        return None
    if isinstance(output_shape, int):
        output_shape = (output_shape,)
    try:
        output_shape = tuple(int(dim) for dim in output_shape)
    except (TypeError, ValueError):
        raise ValueError(
            "`output_shape` must be an int, a tuple of ints or None. "
            f"Received: output_shape={output_shape!r}"
        )
    if not output_shape or min(output_shape) <= 0:
        raise ValueError(
            "`output_shape` must hold positive sizes. "
            f"Received: output_shape={output_shape!r}"
        )
    return output_shape


def output_equation(output_rank):
    """Einsum `(B, T, heads, dv) -> (B, T, *output_shape)` and its bias axes,
    the layout of `MultiHeadAttention`'s output projection."""
    out = string.ascii_lowercase[4 : 4 + output_rank]
    return f"abcd,cd{out}->ab{out}", out


def key_padding_mask(value_mask, key_mask, attention_mask):
    """Combines the key masks into one bool `(B, S)` mask, or `None`.

    `attention_mask` may only mask keys: shape `(B, S)` or `(B, 1, S)`.
    """
    masks = [m for m in (value_mask, key_mask) if m is not None]
    if attention_mask is not None:
        rank = len(attention_mask.shape)
        if rank == 3 and attention_mask.shape[1] == 1:
            attention_mask = attention_mask[:, 0, :]
        elif rank != 2:
            raise ValueError(
                "FavorAttention is linear attention: it supports key padding "
                "masks and `use_causal_mask=True`, not general attention "
                "masks. `attention_mask` must have shape (batch, key_length) "
                "or (batch, 1, key_length). Received: attention_mask.shape="
                f"{attention_mask.shape}"
            )
        masks.append(attention_mask)
    if not masks:
        return None
    combined = ops.cast(masks[0], "bool")
    for mask in masks[1:]:
        combined = ops.logical_and(combined, ops.cast(mask, "bool"))
    return combined


def check_causal_lengths(query, key):
    query_length, key_length = query.shape[1], key.shape[1]
    if None not in (query_length, key_length) and query_length != key_length:
        raise ValueError(
            "`use_causal_mask=True` needs query and key of the same length. "
            f"Received: query length {query_length}, key length {key_length}"
        )


def check_input_shapes(query_shape, value_shape, key_shape):
    """Raises unless query, value and key are `(batch, length, dim)` and
    value and key have the same length."""
    for argument, shape in (
        ("query", query_shape),
        ("value", value_shape),
        ("key", key_shape),
    ):
        if len(shape) != 3:
            raise ValueError(
                f"FavorAttention expects `{argument}` of rank 3, "
                f"(batch, length, dim). Received: {argument}.shape={shape}"
            )
    if value_shape[1] != key_shape[1] and None not in (
        value_shape[1],
        key_shape[1],
    ):
        raise ValueError(
            "`value` and `key` must have the same length. Received: "
            f"value.shape={value_shape}, key.shape={key_shape}"
        )
