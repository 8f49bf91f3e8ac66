"""An opt-in fix that lets Keras 3 `model.fit` run under
`tf.distribute.MultiWorkerMirroredStrategy`.

Importing keras_favor changes nothing in Keras. Stock Keras with the
TensorFlow backend (keras-team/keras#20585; checked up to 3.15) fails in
`model.fit` as soon as a `MultiWorkerMirroredStrategy` runs in multi-worker
mode, in two places of its TensorFlow trainer:

1. `TensorFlowTrainer._maybe_symbolic_build` builds the model from the first
   batch, which it gets by `strategy.reduce("MEAN", batch, axis=None)`. A
   multi-worker strategy cannot reduce a `PerReplica` batch eagerly, and
   `fit` stops with "Attempt to convert a value (PerReplica...) to a Tensor".
2. `reduce_per_replica`, a function of the module that defines
   `TensorFlowTrainer`, reduces the training logs with the default `"auto"`
   (`"mean"`) reduction by calling `strategy.reduce("MEAN", value, axis=0)`
   in multi-worker mode. The logs are scalars, which have no axis 0.

`enable_multi_worker_fit()` replaces these two functions with wrappers that
do what the single-worker code path does: the symbolic build uses one
replica's batch (only its shapes and dtypes matter), and the mean of the
logs is taken across replicas (`axis=None`), as `MirroredStrategy` does.
For every other strategy, and for every other reduction, the wrappers call
the original Keras functions unchanged. The trainer class is found in the
method resolution order of `keras.Model`, and `reduce_per_replica` in the
module that defines it.

Call it once per process, before `model.fit` under
`MultiWorkerMirroredStrategy`:

```python
keras_favor.distribute.enable_multi_worker_fit()
strategy = tf.distribute.MultiWorkerMirroredStrategy()
```

It patches only Keras versions known to fail with the TensorFlow backend,
and only once.
"""

import sys

import keras

from keras_favor import backend

# Keras versions [first, last_checked] known to have keras-team/keras#20585.
# After checking that a newer Keras release still fails under
# MultiWorkerMirroredStrategy (tests/distribute/test_distributed.py does), raise the
# upper bound; when a release fixes it, make that release the bound.
_AFFECTED_KERAS_VERSIONS = ((3, 0), (3, 15))

# Set on each wrapper: the Keras function it wraps.
_WRAPPED = "_keras_favor_wrapped"


def enable_multi_worker_fit():
    """Lets `model.fit` run under `MultiWorkerMirroredStrategy`.

    Patches the two functions of Keras's TensorFlow trainer that fail in
    multi-worker mode (keras-team/keras#20585; the module docstring of
    `keras_favor.distribute.multi_worker_fit` says what changes). Call it
    before `model.fit`. Idempotent, and a no-op unless the installed Keras
    is a version known to need it. `tf.distribute` is TensorFlow's: on
    another backend it raises a `RuntimeError` naming the backend.

    Returns:
        True if this call patched Keras; False if Keras was already patched
        or does not need the fix.
    """
    backend.require_tensorflow(
        "keras_favor.distribute.enable_multi_worker_fit (tf.distribute)"
    )
    if not _keras_needs_fix() or multi_worker_fit_enabled():
        return False
    trainer_class = _tensorflow_trainer_class()
    trainer_module = sys.modules[trainer_class.__module__]
    build = vars(trainer_class)["_maybe_symbolic_build"]
    if not _is_wrapper(build):
        trainer_class._maybe_symbolic_build = _fixed_maybe_symbolic_build(build)
    if not _is_wrapper(trainer_module.reduce_per_replica):
        trainer_module.reduce_per_replica = _fixed_reduce_per_replica(
            trainer_module.reduce_per_replica
        )
    return True


def multi_worker_fit_enabled():
    """Whether `enable_multi_worker_fit()` has patched Keras.

    Returns:
        True if both trainer functions are patched.
    """
    trainer_class = _tensorflow_trainer_class(required=False)
    if trainer_class is None:
        return False
    trainer_module = sys.modules[trainer_class.__module__]
    return _is_wrapper(
        vars(trainer_class).get("_maybe_symbolic_build")
    ) and _is_wrapper(getattr(trainer_module, "reduce_per_replica", None))


def _keras_version():
    """The installed Keras `(major, minor)`."""
    major, minor = keras.version().split(".")[:2]
    return int(major), int(minor)


def _keras_needs_fix():
    """Whether the backend is TensorFlow and the Keras version is in
    `_AFFECTED_KERAS_VERSIONS`."""
    first, last = _AFFECTED_KERAS_VERSIONS
    return (
        keras.backend.backend() == "tensorflow"
        and first <= _keras_version() <= last
    )


def _tensorflow_trainer_class(required=True):
    """The class of `keras.Model`'s bases that defines the TensorFlow
    training loop, or None (with `required=False`) if there is none."""
    for cls in keras.Model.__mro__:
        if cls.__name__ == "TensorFlowTrainer":
            module = sys.modules[cls.__module__]
            if "_maybe_symbolic_build" in vars(cls) and hasattr(
                module, "reduce_per_replica"
            ):
                return cls
    if required:
        raise RuntimeError(
            f"`enable_multi_worker_fit` does not recognize Keras "
            f"{keras.version()}: `keras.Model` has no `TensorFlowTrainer` "
            "base defining `_maybe_symbolic_build` next to a module-level "
            "`reduce_per_replica`."
        )
    return None


def _is_wrapper(function):
    return hasattr(function, _WRAPPED)


def _in_multi_worker_mode(strategy):
    import tensorflow as tf

    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and strategy.extended._in_multi_worker_mode()
    )


def _first_replica_value(value):
    import tensorflow as tf

    if isinstance(value, tf.distribute.DistributedValues):
        return value.values[0]
    return value


def _fixed_maybe_symbolic_build(original):
    """`original` (`TensorFlowTrainer._maybe_symbolic_build`), building
    from the first replica's batch in multi-worker mode."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is None or not _in_multi_worker_mode(strategy):
            return original(self, iterator=iterator, data_batch=data_batch)
        import tensorflow as tf

        for _, _, distributed_iterator in iterator:
            data_batch = tf.nest.map_structure(
                _first_replica_value, next(distributed_iterator)
            )
            break
        return original(self, data_batch=data_batch)

    setattr(_maybe_symbolic_build, _WRAPPED, original)
    return _maybe_symbolic_build


def _fixed_reduce_per_replica(original):
    """`original` (the trainer module's `reduce_per_replica`), taking the
    mean across replicas with `axis=None` in multi-worker mode."""

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not _in_multi_worker_mode(
            strategy
        ):
            return original(values, strategy, reduction)
        import tensorflow as tf

        return tf.nest.map_structure(
            lambda value: strategy.reduce("MEAN", value, axis=None), values
        )

    setattr(reduce_per_replica, _WRAPPED, original)
    return reduce_per_replica
