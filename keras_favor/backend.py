"""What differs between the Keras backends, in one place.

On TensorFlow keras_favor runs TensorFlow's own ops (stateless random ops,
`tf.matmul`'s transpose flags, run-time shape assertions, `tf.function`);
on JAX the same computations use `keras.ops` and the backend's own random
keys: a seed gives the same draws on every call and device of a backend,
not the same draws on both.

Seeds: on TensorFlow a stateless seed is a `(2,)` int64 tensor, as
`tf.random.stateless_*` take it; on JAX it is a `(2,)` uint32 raw key, as
`keras.random.SeedGenerator.next()` returns it there.

Code whose whole job is one backend's stays with the feature it serves:

- `keras_favor.ops.grouped_recompute`: TensorFlow's grouped recomputation
  (`tf.custom_gradient` with control dependencies that keep the executor
  from running the groups side by side); other backends use `keras.remat`
  there.
- `keras_favor.distribute`: multi-worker training with `tf.distribute`.
- `keras_favor.generation.export`: the SavedModel export and its run-time
  checks of a served model's inputs.
- `keras_favor/__init__.py`: the check, at import, that Keras runs on a
  supported backend.
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
    JAX `(2,)` uint32 raw key: a uint32 tensor is one already; any other
    pair gives the key of the same two ints."""
    import jax
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
    if seed.dtype == jnp.uint32:
        return seed
    # Signed ints: the key of the same pair of Python ints, also traced.
    key = jnp.stack(_jax_words(seed[0]))
    high, low = _jax_words(seed[1])
    folded = jax.random.fold_in(key, low)
    folded = jnp.where(high != 0, jax.random.fold_in(folded, high), folded)
    return jnp.where(seed[1] != 0, folded, key)


def _jax_words(value):
    """A signed integer JAX scalar as its 64-bit (high, low) uint32 words."""
    import jax.numpy as jnp

    if value.dtype.itemsize == 8:
        high = (value >> 32).astype(jnp.uint32)
    else:
        high = jnp.where(value < 0, jnp.uint32(_UINT32), jnp.uint32(0))
    return high, value.astype(jnp.uint32)


def seed_pair(seed):
    """An int or a shape-`(2,)` integer tensor as the backend's stateless
    seed (see the module docstring)."""
    if is_tensorflow():
        import tensorflow as tf

        if isinstance(seed, int):
            return tf.constant([seed, 0], dtype=tf.int64)
        return tf.cast(tf.reshape(seed, (2,)), tf.int64)
    return _jax_key(seed)


def seed_generator(seed):
    """A `keras.random.SeedGenerator` started from the int `seed` (int64,
    or None for a random start). Its state is `[seed, 0]` where it holds
    int64 (TensorFlow); elsewhere it is two uint32 words, which hold the
    seed's low and high words (`[seed, 0]` for a seed in `[0, 2**32)`)."""
    if seed is None or is_tensorflow():
        return keras.random.SeedGenerator(seed)
    generator = keras.random.SeedGenerator(0)
    high, low = _split64(seed)
    generator.state.assign(np.array([low, high], np.uint32))
    return generator


def int_pair_seed(first, second):
    """The stateless seed `[first, second]` of two Python ints."""
    if is_tensorflow():
        import tensorflow as tf

        return tf.constant([first, second], tf.int64)
    return _jax_key([first, second])


def fold_in(seed, data, dtype="int64"):
    """`seed` folded with the integer (int or scalar tensor) `data`, which
    on TensorFlow is first cast to `dtype` (the draws depend on it there;
    other backends fold in 32-bit words whatever the dtype)."""
    if is_tensorflow():
        import tensorflow as tf

        return tf.random.experimental.stateless_fold_in(
            seed, tf.cast(data, dtype)
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
    """
    return not is_tensorflow()


def is_integer_dtype(dtype):
    """Whether `dtype` (any dtype-like, or None) is an integer dtype."""
    if dtype is None:
        return False
    if is_tensorflow():
        import tensorflow as tf

        try:
            return tf.as_dtype(dtype).is_integer
        except TypeError:
            return False
    try:
        return "int" in keras.backend.standardize_dtype(dtype)
    except (TypeError, ValueError, AttributeError):
        return False


def matmul(a, b, transpose_a=False, transpose_b=False):
    """`a @ b` over the last two axes, either factor transposed first.

    On TensorFlow an explicit transpose before `tf.matmul` is not folded
    into the product (which then takes 1.15-1.4x as long), so the batched
    matmul's own flags are used; other backends compile the transpose into
    the product.
    """
    if is_tensorflow():
        import tensorflow as tf

        return tf.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b)
    if transpose_a:
        a = keras.ops.swapaxes(a, -1, -2)
    if transpose_b:
        b = keras.ops.swapaxes(b, -1, -2)
    return keras.ops.matmul(a, b)


def runtime_shape(x):
    """The shape of `x` when it runs: on TensorFlow an int32 tensor (axes
    unknown until run time included); elsewhere `keras.ops.shape(x)`."""
    if is_tensorflow():
        import tensorflow as tf

        return tf.shape(x)
    return keras.ops.shape(x)


def cond(pred, true_fn, false_fn):
    """`true_fn()` if `pred` else `false_fn()`: decided in Python where
    `pred` holds a value now (`is_concrete`; an eager `jax.lax.cond` would
    compile both branches on every call); else on TensorFlow `tf.cond`,
    whose branches may return tensors of different static shapes."""
    if is_concrete(pred):
        taken = bool(keras.ops.convert_to_numpy(pred))
        return true_fn() if taken else false_fn()
    if is_tensorflow():
        import tensorflow as tf

        return tf.cond(pred, true_fn, false_fn)
    return keras.ops.cond(pred, true_fn, false_fn)


def _gated(tensor, check):
    import tensorflow as tf

    with tf.control_dependencies([check]):
        return tf.identity(tensor)


def checked_equal(tensor, a, b, message):
    """`tensor`, gated on the run-time assertion `a == b` on TensorFlow:
    every op that uses the returned tensor runs after the check, so a wrong
    shape fails with `message`. Other backends trace with static shapes,
    checked in Python: there `tensor` itself."""
    if not is_tensorflow():
        return tensor
    import tensorflow as tf

    return _gated(tensor, tf.debugging.assert_equal(a, b, message=message))


def checked_less_equal(tensor, a, b, message):
    """`tensor`, gated on the run-time assertion `a <= b` on TensorFlow (as
    `checked_equal`); `tensor` itself elsewhere."""
    if not is_tensorflow():
        return tensor
    import tensorflow as tf

    check = tf.debugging.assert_less_equal(
        a, tf.cast(b, a.dtype), message=message
    )
    return _gated(tensor, check)


def ensure_shape(x, shape, message):
    """`x`, checked to have `shape`: on TensorFlow with `tf.ensure_shape`
    (at run time where the static shape leaves it open); elsewhere against
    the static shape, a `ValueError` with `message` if it differs."""
    if is_tensorflow():
        import tensorflow as tf

        return tf.ensure_shape(x, shape)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(message)
    return x


def require_static_lengths(x, feature):
    """Off TensorFlow, a clear error for a symbolic (non-batch) axis of `x`
    (as `model.export` traces a `(batch, None, ...)` input on JAX):
    `feature` needs its lengths when it is traced there. TensorFlow runs
    with lengths known only at run time. A symbolic batch size is fine."""
    if is_tensorflow():
        return
    if not all(isinstance(d, (int, type(None))) for d in x.shape[1:]):
        require_tensorflow(feature)


def fit_positions(x, length, fill):
    """`x` padded with `fill` or cut along axis 1 to `length` positions;
    on TensorFlow `length` and the axis may be known only at run time."""
    static = x.shape[1]
    if is_tensorflow():
        import tensorflow as tf

        if isinstance(length, int) and isinstance(static, int):
            pad = max(length - static, 0)
        else:
            pad = tf.maximum(length - tf.shape(x)[1], 0)
        paddings = [[0, 0], [0, pad]] + [[0, 0]] * (len(x.shape) - 2)
        return tf.pad(x, paddings, constant_values=fill)[:, :length]
    pad = max(length - static, 0)
    if pad:
        paddings = [[0, 0], [0, pad]] + [[0, 0]] * (len(x.shape) - 2)
        x = keras.ops.pad(x, paddings, constant_values=fill)
    return x[:, :length]


def loop_count(count):
    """A loop's length as a compiled function takes it: on TensorFlow an
    int32 tensor, so that one trace serves every count; elsewhere the
    Python int (a static argument of `compile_function`)."""
    if is_tensorflow():
        return keras.ops.convert_to_tensor(count, "int32")
    return count


def compile_function(fn, variables, jit_compile=False, static_argnums=()):
    """`fn` compiled by the backend: a `tf.function` (XLA with
    `jit_compile=True`) on TensorFlow, without AutoGraph (`fn` uses
    `keras.ops` loops and conditionals); on JAX `jax.jit` over the values of
    `variables` (read at each call, so that later weights are used), with
    `static_argnums` static; `fn` itself elsewhere."""
    if is_tensorflow():
        import tensorflow as tf

        return tf.function(
            fn,
            jit_compile=bool(jit_compile),
            reduce_retracing=True,
            autograph=False,
        )
    if name() != "jax":
        return fn
    import jax

    def stateless(values, *args):
        with keras.StatelessScope(state_mapping=zip(variables, values)):
            return fn(*args)

    jitted = jax.jit(
        stateless, static_argnums=tuple(i + 1 for i in static_argnums)
    )

    def function(*args):
        return jitted([variable.value for variable in variables], *args)

    return function
