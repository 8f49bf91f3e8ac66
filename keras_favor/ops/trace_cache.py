"""Pure functions of tensors, traced once per signature on TensorFlow.

Every `fit`, `evaluate`, `predict` and export traces the model again, and
a causal step traces its kernels once more where the backward pass
recomputes them. `call_traced(fn, args)` runs `fn(args)` through a
`tf.function` kept per function, keyword arguments and signature of
`args`, so that each of those traces calls one traced graph, and the
gradient of that graph is built once. It applies where TensorFlow builds
a graph outside XLA: eager calls run as they are, and inside an
XLA-compiled function (`jit_compile=True`) a call of another function
would make XLA take the step's inputs and variables for compile-time
constants, compiling the step again at every call. Other backends call
`fn` as it is; `jax.jit` has its own cache.

`fn` must be a function of its arguments alone: a function without a
closure, or a `functools.partial` of one with hashable keyword arguments
only. It reads no variable.
"""

import collections
import functools
import threading

from keras_favor import backend

# Traced functions kept, the most recently used.
_LIMIT = 128
_traced = collections.OrderedDict()
# Replicas of a tf.distribute strategy are traced in threads of their own.
_lock = threading.Lock()


def pure_function_and_keywords(fn, name):
    """`(function, keywords)` of `fn`, a function without a closure or a
    `functools.partial` of one with hashable keyword arguments only;
    raises a ValueError naming the argument `name` otherwise."""
    func, keywords = fn, {}
    if isinstance(fn, functools.partial) and not fn.args:
        func, keywords = fn.func, fn.keywords
    try:
        hash(tuple(sorted(keywords.items())))
        pure = callable(func) and not getattr(func, "__closure__", None)
    except TypeError:
        pure = False
    if not pure or isinstance(func, functools.partial):
        raise ValueError(
            f"`{name}` must be a function of its inputs alone: a function "
            "without a closure, or a `functools.partial` of one with "
            f"hashable keyword arguments only. Received: {fn}"
        )
    return func, keywords


def call_traced(fn, args):
    """`fn(args)`, a list of tensors (None for an absent one), through a
    `tf.function` traced once per signature of `args` where TensorFlow
    builds a graph outside XLA (module docstring); `fn` called as it is
    elsewhere.

    Returns:
        The list `fn` returns.
    """
    func, keywords = pure_function_and_keywords(fn, "fn")
    args = list(args)
    if not (backend.is_tensorflow() and _in_a_graph_outside_xla()):
        return list(func(args, **keywords))
    key = (
        func,
        tuple(sorted(keywords.items())),
        tuple(
            None if x is None else (tuple(x.shape), x.dtype.name) for x in args
        ),
    )
    with _lock:
        traced = _traced.pop(key, None)
        if traced is None:
            traced = _tf_function(func, keywords)
        _traced[key] = traced
        while len(_traced) > _LIMIT:
            _traced.popitem(last=False)
    return list(traced(*args))


def _in_a_graph_outside_xla():
    import tensorflow as tf

    return (
        not tf.executing_eagerly()
        and tf.__internal__.get_enclosing_xla_context() is None
    )


def _tf_function(func, keywords):
    import tensorflow as tf

    return tf.function(
        lambda *args: list(func(list(args), **keywords)), autograph=False
    )
