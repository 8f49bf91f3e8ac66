"""Support for `tf.distribute` training.

`enable_multi_worker_fit()` lets Keras's `model.fit` run under
`MultiWorkerMirroredStrategy` (keras-team/keras#20585). Importing
keras_favor never patches Keras; call it before `model.fit`.

One sequence split across devices (docs/context_parallel.md): on JAX,
`sequence_parallel` shards along a Keras device mesh's `sequence` axis; on
TensorFlow, inside `sequence_replicas()` each `tf.distribute` replica holds
a segment of the sequence (`replica_sequence_parallel`).
"""

from keras_favor.distribute.multi_worker_fit import enable_multi_worker_fit
from keras_favor.distribute.multi_worker_fit import multi_worker_fit_enabled
from keras_favor.distribute.replica_sequence_parallel import sequence_replicas

__all__ = [
    "enable_multi_worker_fit",
    "multi_worker_fit_enabled",
    "sequence_replicas",
]
