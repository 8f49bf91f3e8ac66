"""What differs between the Keras backends, in one place.

On the TensorFlow backend keras_favor runs the TensorFlow ops it always ran
(stateless random ops, `tf.custom_gradient`, control dependencies), so its
numbers and speed there do not depend on this module. On other backends
(JAX) the same computations use `keras.ops` and, for the stateless random
draws, the backend's own random keys: a seed gives the same draws on every
call and device of that backend, but not the TensorFlow backend's draws.

Seeds: on TensorFlow a stateless seed is a `(2,)` int64 tensor, as
`tf.random.stateless_*` take it; on JAX it is a `(2,)` uint32 raw key, as
`keras.random.SeedGenerator.next()` returns it there.
"""

import keras
import numpy as np

_UINT32 = 0xFFFFFFFF


def name():
    """The Keras backend's name."""
    return keras.backend.backend()


def is_tensorflow():
    """Whether Keras runs on the TensorFlow backend."""
    return keras.backend.backend() == "tensorflow"


def require_tensorflow(feature):
    """Raises a `RuntimeError` naming the backend unless it is TensorFlow."""
    if not is_tensorflow():
        raise RuntimeError(
            f"{feature} needs the TensorFlow backend; Keras runs on the "
            f"{name()!r} backend (KERAS_BACKEND={name()}). Set "
            "KERAS_BACKEND=tensorflow to use it."
        )


def is_tf_tensor(x):
    """Whether `x` is a TensorFlow tensor (always False on other backends,
    where TensorFlow is not imported for it)."""
    if not is_tensorflow():
        return False
    import tensorflow as tf

    return tf.is_tensor(x)


def is_concrete(x):
    """Whether the tensor `x` holds values now (an eager call), rather than
    standing for them in a trace (`tf.function`, `jax.jit`, symbolic
    shapes), so that Python can check them at no cost to a compiled step."""
    if is_tensorflow():
        import tensorflow as tf

        return tf.executing_eagerly() and hasattr(x, "numpy")
    import jax

    return not isinstance(x, (jax.core.Tracer, keras.KerasTensor))


def _split64(value):
    """A Python int as its (high, low) 32-bit words."""
    value = int(value) & 0xFFFFFFFFFFFFFFFF
    return (value >> 32) & _UINT32, value & _UINT32


def _jax_fold_python_int(key, value):
    import jax

    high, low = _split64(value)
    key = jax.random.fold_in(key, low)
    if high:
        key = jax.random.fold_in(key, high)
    return key


def _jax_key(seed):
    """A stateless seed (int, pair of ints, or `(2,)` integer tensor) as a
    JAX `(2,)` uint32 raw key."""
    import jax.numpy as jnp

    if isinstance(seed, (int, np.integer)):
        return jnp.asarray(np.array(_split64(seed), np.uint32))
    if isinstance(seed, (list, tuple, np.ndarray)):
        pair = np.asarray(seed).reshape(2).tolist()
        key = jnp.asarray(np.array(_split64(pair[0]), np.uint32))
        if pair[1]:
            key = _jax_fold_python_int(key, pair[1])
        return key
    seed = jnp.reshape(jnp.asarray(seed), (2,))
    if seed.dtype != jnp.uint32:
        seed = seed.astype(jnp.uint32)
    return seed


def seed_pair(seed):
    """An int or a shape-`(2,)` integer tensor as the backend's stateless
    seed (see the module docstring)."""
    if is_tensorflow():
        import tensorflow as tf

        if isinstance(seed, int):
            return tf.constant([seed, 0], dtype=tf.int64)
        return tf.cast(tf.reshape(seed, (2,)), tf.int64)
    return _jax_key(seed)


def int_pair_seed(first, second):
    """The stateless seed `[first, second]` of two Python ints."""
    if is_tensorflow():
        import tensorflow as tf

        return tf.constant([first, second], tf.int64)
    return _jax_key([first, second])


def fold_in(seed, data):
    """`seed` folded with the integer (int or scalar tensor) `data`."""
    if is_tensorflow():
        import tensorflow as tf

        return tf.random.experimental.stateless_fold_in(
            seed, tf.cast(data, tf.int64)
        )
    import jax
    import jax.numpy as jnp

    key = _jax_key(seed)
    if isinstance(data, (int, np.integer)):
        return _jax_fold_python_int(key, data)
    return jax.random.fold_in(key, jnp.asarray(data).astype(jnp.uint32))


def split(seed, num):
    """`num` independent stateless seeds from `seed`."""
    if is_tensorflow():
        import tensorflow as tf

        return tf.unstack(tf.random.experimental.stateless_split(seed, num))
    import jax

    return list(jax.random.split(_jax_key(seed), num))


def stateless_normal(shape, seed):
    """Standard normal float32 draws of `shape` from a stateless seed."""
    if is_tensorflow():
        import tensorflow as tf

        return tf.random.stateless_normal(shape, seed=seed)
    return keras.random.normal(shape, dtype="float32", seed=_jax_key(seed))


def stateless_uniform(shape, seed, dtype="float32"):
    """Uniform `[0, 1)` draws of `shape` from a stateless seed."""
    if is_tensorflow():
        import tensorflow as tf

        return tf.random.stateless_uniform(shape, seed, dtype=dtype)
    return keras.random.uniform(shape, dtype=dtype, seed=_jax_key(seed))


def reserves_every_branch():
    """Whether a compiled step holds memory for every branch of a
    `keras.ops.cond`, taken or not.

    True off TensorFlow: under `jax.jit`, XLA gives each branch its buffers
    (and the conditional's gradient carries residuals of both). False on
    TensorFlow, whose graphs run the branch taken only; there a loop in the
    untaken branch still raised a causal training step's peak memory (by
    13 % at 32768 positions), so code that only saves memory in the untaken
    branch is left out.

    Example:

    >>> from keras_favor import backend
    >>> backend.reserves_every_branch() == (backend.name() != "tensorflow")
    True
    """
    return not is_tensorflow()
