"""Checks of constructor arguments, with errors that name the argument."""

import numbers

import keras
import numpy as np

from keras_favor import backend

# The seeds the random ops accept: stateless TensorFlow ops and Keras
# `SeedGenerator`s take int64 seeds, built from `[seed, 0]`.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def is_int(value):
    """Whether `value` is a Python or NumPy integer (bools are not)."""
    return isinstance(value, numbers.Integral) and not isinstance(
        value, (bool, np.bool_)
    )


def boolean(value, name):
    """`value` as a bool, or a `ValueError` unless it is one."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(
            f"`{name}` must be True or False. Received: {name}={value!r}"
        )
    return bool(value)


def positive_int(value, name, allow_none=False):
    """`value` as an int, or a `ValueError` unless it is a positive int."""
    if allow_none and value is None:
        return None
    if not is_int(value) or value <= 0:
        allowed = "a positive integer"
        if allow_none:
            allowed += " or None"
        raise ValueError(
            f"Invalid value for argument `{name}`: `{name}` must be "
            f"{allowed}. Received: {name}={value!r}"
        )
    return int(value)


def non_negative_int(value, name, allow_none=False):
    """`value` as an int, or a `ValueError` unless it is an int >= 0."""
    if allow_none and value is None:
        return None
    if not is_int(value) or value < 0:
        allowed = "a non-negative integer"
        if allow_none:
            allowed += " or None"
        raise ValueError(
            f"Invalid value for argument `{name}`: `{name}` must be "
            f"{allowed}. Received: {name}={value!r}"
        )
    return int(value)


def optional_positive_number(value, name):
    """`value` as a float or None, or a `ValueError` unless it is a positive
    number or None."""
    if value is None:
        return None
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Real)
        or not value > 0
    ):
        raise ValueError(
            f"`{name}` must be None or a positive number. Received: "
            f"{name}={value!r}"
        )
    return float(value)


def dropout_rate(value, name="dropout"):
    """`value` as a float, or a `ValueError` unless it is in `[0, 1)`."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Real)
        or not 0.0 <= value < 1.0
    ):
        raise ValueError(
            f"`{name}` must be a float in [0, 1). Received: {name}={value!r}"
        )
    return float(value)


def optional_seed(value, name="seed"):
    """`value` as an int or None, or a `ValueError` unless it is an int in
    `[-2**63, 2**63)`, the int64 seeds of the random ops."""
    if value is None:
        return None
    if not is_int(value) or not SEED_MIN <= value <= SEED_MAX:
        raise ValueError(
            f"`{name}` must be None or an int in [-2**63, 2**63) (an int64 "
            f"seed of the random ops). Received: {name}={value!r}"
        )
    return int(value)


def stateless_seed(value, name="seed"):
    """An int seed (see `optional_seed`) or a `(2,)` integer tensor of a
    stateless seed, else a `ValueError` naming `name`."""
    if is_int(value):
        return optional_seed(value, name)
    dtype = getattr(value, "dtype", None)
    if dtype is None and isinstance(value, (list, tuple)):
        value = np.asarray(value)
        dtype = value.dtype
    is_integer = backend.is_integer_dtype(dtype)
    shape = getattr(value, "shape", None)
    if not is_integer or shape is None or tuple(shape) not in ((2,), (None,)):
        raise ValueError(
            f"`{name}` must be None, an int, or a (2,) integer tensor of a "
            f"stateless seed. Received: {name}={value!r}"
        )
    return value


def batch_size(value, name="batch_size"):
    """A positive int, or a scalar tensor as it stands (a graph's batch
    size, known only when it runs); a `ValueError` for anything else."""
    if keras.ops.is_tensor(value) and not is_int(value):
        return value
    return positive_int(value, name)


def check_cache_shapes(
    cache, shapes, inputs_name, maker, argument="cache", names=None
):
    """A `ValueError` naming the argument unless `cache` is a tuple of
    tensors of `shapes` (`None` entries match any size); `inputs_name` is
    the call argument whose batch the shapes carry, `maker` the call that
    makes such a cache, `argument` the name of `cache` in the call, and
    `names` (optional) the names of its tensors."""
    if not isinstance(cache, (tuple, list)) or len(cache) != len(shapes):
        count = len(cache) if isinstance(cache, (tuple, list)) else 1
        raise ValueError(
            f"`{argument}` must be the tuple of {len(shapes)} tensors that "
            f"`{maker}` returns, or that a call given one returned. "
            f"Received: {argument}={type(cache).__name__} of {count}"
        )
    for index, (tensor, shape) in enumerate(zip(cache, shapes)):
        got = tuple(tensor.shape)
        if len(got) != len(shape) or any(
            None not in (g, e) and g != e for g, e in zip(got, shape)
        ):
            name = f"`{argument}[{index}]`"
            if names is not None:
                name += f" ({names[index]})"
            raise ValueError(
                f"{name} must have shape {tuple(shape)} (the batch size of "
                f"`{inputs_name}`), as `{maker}` makes it for these inputs. "
                f"Received: {argument}[{index}].shape={got}"
            )
