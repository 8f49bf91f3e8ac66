"""A narrow fix that lets Keras 3 `model.fit` run under
`tf.distribute.MultiWorkerMirroredStrategy`.

Stock Keras (verified on 3.15.1, keras-team/keras#20585) fails in two places
of `keras/src/backend/tensorflow/trainer.py` as soon as the strategy runs in
multi-worker mode:

1. `TensorFlowTrainer._maybe_symbolic_build` builds the model from the first
   batch, which it gets by `strategy.reduce("MEAN", batch, axis=None)`. A
   multi-worker strategy cannot reduce a `PerReplica` batch eagerly, and
   `fit` stops with "Attempt to convert a value (PerReplica...) to a Tensor".
2. `reduce_per_replica`, with the default `"auto"` (`"mean"`) reduction of
   training logs, calls `strategy.reduce("MEAN", value, axis=0)` in
   multi-worker mode. The logs are scalars, which have no axis 0.

The fix replaces both with what the single-worker code path does: the
symbolic build uses one replica's batch (only its shapes and dtypes matter),
and the mean of the logs is taken across replicas (`axis=None`), as
`MirroredStrategy` does. Everywhere else, including every strategy that is
not multi-worker, the original Keras functions run unchanged.

`import keras_favor` applies the fix when the installed Keras needs it (see
`multi_worker_fit_fix_needed`). Set the environment variable
`KERAS_FAVOR_NO_MULTI_WORKER_FIX=1` before the import to leave Keras as it is.
"""

import os

import keras
import tensorflow as tf

DISABLE_VARIABLE = "KERAS_FAVOR_NO_MULTI_WORKER_FIX"

# Keras versions [first, last_checked] known to have keras-team/keras#20585.
# After checking that a newer Keras release still fails under
# MultiWorkerMirroredStrategy (tests/test_distributed.py does), raise the
# upper bound; when a release fixes it, make that release the bound.
AFFECTED_KERAS_VERSIONS = ((3, 0), (3, 15))


def keras_version():
    """The installed Keras `(major, minor)`."""
    major, minor = keras.version().split(".")[:2]
    return int(major), int(minor)


def multi_worker_fit_fix_needed():
    """Whether the installed Keras needs the fix: a TensorFlow backend and a
    version in `AFFECTED_KERAS_VERSIONS`."""
    first, last = AFFECTED_KERAS_VERSIONS
    return (
        keras.backend.backend() == "tensorflow"
        and first <= keras_version() <= last
    )


def trainer_module():
    from keras.src.backend.tensorflow import trainer

    return trainer


def in_multi_worker_mode(strategy):
    return isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ) and strategy.extended._in_multi_worker_mode()


def first_replica_value(value):
    if isinstance(value, tf.distribute.DistributedValues):
        return value.values[0]
    return value


def fixed_maybe_symbolic_build(original):
    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is None or not in_multi_worker_mode(strategy):
            return original(self, iterator=iterator, data_batch=data_batch)
        for _, _, distributed_iterator in iterator:
            data_batch = tf.nest.map_structure(
                first_replica_value, next(distributed_iterator)
            )
            break
        return original(self, data_batch=data_batch)

    _maybe_symbolic_build.fixes = original
    return _maybe_symbolic_build


def fixed_reduce_per_replica(original):
    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not in_multi_worker_mode(
            strategy
        ):
            return original(values, strategy, reduction)
        return tf.nest.map_structure(
            lambda value: strategy.reduce("MEAN", value, axis=None), values
        )

    reduce_per_replica.fixes = original
    return reduce_per_replica


def multi_worker_fit_fix_applied():
    """Whether `apply_multi_worker_fit_fix` has patched Keras."""
    trainer = trainer_module()
    return hasattr(trainer.reduce_per_replica, "fixes")


def apply_multi_worker_fit_fix():
    """Patches Keras so that `model.fit` works under
    `MultiWorkerMirroredStrategy` (keras-team/keras#20585).

    Idempotent. Only the multi-worker code paths change; see the module
    docstring for the two failures it fixes.
    """
    if multi_worker_fit_fix_applied():
        return
    trainer = trainer_module()
    cls = trainer.TensorFlowTrainer
    cls._maybe_symbolic_build = fixed_maybe_symbolic_build(
        cls._maybe_symbolic_build
    )
    trainer.reduce_per_replica = fixed_reduce_per_replica(
        trainer.reduce_per_replica
    )


def apply_multi_worker_fit_fix_if_needed():
    """Applies the fix when Keras needs it, unless the environment variable
    `KERAS_FAVOR_NO_MULTI_WORKER_FIX` is set to a non-empty value other than
    `0`. Returns whether the fix is in place."""
    disabled = os.environ.get(DISABLE_VARIABLE, "") not in ("", "0")
    if multi_worker_fit_fix_needed() and not disabled:
        apply_multi_worker_fit_fix()
    return multi_worker_fit_fix_applied()
