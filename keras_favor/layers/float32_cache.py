"""Decoding caches stay float32 under every dtype policy.

Keras's `Layer.__call__` casts every floating call argument, a `cache`
among them, to the layer's compute dtype unless the layer's `autocast` is
off. A float16 state loses the sums' precision, and its empty stabilizer
level (`NO_KEY_LEVEL`, about -1e30) becomes -inf, from which the next
rescaling makes NaN. The layers that take a `cache` therefore cast their
inputs themselves and leave the cache as it is.
"""

import keras
from keras import ops


def without_argument_casting(layer_name, kwargs):
    """Base-layer keyword arguments with Keras's argument casting off.

    Args:
        layer_name: str, the class, for the error message.
        kwargs: the base layer's keyword arguments.

    Returns:
        `kwargs` with `autocast=False`; a `ValueError` if it asks for True.
    """
    if kwargs.get("autocast", False):
        raise ValueError(
            f"`autocast` must be False for {layer_name}: the layer casts its "
            "inputs to the compute dtype itself and keeps its decoding "
            "cache in float32. Received: autocast=True"
        )
    return dict(kwargs, autocast=False)


def float32_cache(cache):
    """`cache` (a tuple of tensors) with its floating tensors in float32
    and the others (a key mask) unchanged."""
    return tuple(ops.cast(x, "float32") if _is_float(x) else x for x in cache)


def _is_float(x):
    return keras.backend.is_float_dtype(
        keras.backend.standardize_dtype(x.dtype)
    )
