"""Support for `tf.distribute` training.

`enable_multi_worker_fit()` lets Keras's `model.fit` run under
`MultiWorkerMirroredStrategy` (keras-team/keras#20585). Importing
keras_favor never patches Keras; call it before `model.fit`.

On JAX, `sequence_parallel` splits one sequence across the devices of a
Keras device mesh's `sequence` axis (docs/context_parallel.md).
"""

from keras_favor.distribute.multi_worker_fit import enable_multi_worker_fit
from keras_favor.distribute.multi_worker_fit import multi_worker_fit_enabled

__all__ = ["enable_multi_worker_fit", "multi_worker_fit_enabled"]
