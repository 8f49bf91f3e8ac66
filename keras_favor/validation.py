"""Checks of constructor arguments, with errors that name the argument."""

import numbers


def positive_int(value, name, allow_none=False):
    """`value` as an int, or a `ValueError` unless it is a positive int."""
    if allow_none and value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value <= 0
    ):
        allowed = "a positive integer"
        if allow_none:
            allowed += " or None"
        raise ValueError(
            f"`{name}` must be {allowed}. Received: {name}={value!r}"
        )
    return int(value)


def dropout_rate(value, name="dropout"):
    """`value` as a float, or a `ValueError` unless it is in `[0, 1)`."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 0.0 <= value < 1.0
    ):
        raise ValueError(
            f"`{name}` must be a float in [0, 1). Received: {name}={value!r}"
        )
    return float(value)


def optional_seed(value, name="seed"):
    """`value` as an int or None, or a `ValueError`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(
            f"`{name}` must be an int or None. Received: {name}={value!r}"
        )
    return int(value)
