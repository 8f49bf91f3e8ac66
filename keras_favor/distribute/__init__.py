"""Support for `tf.distribute` training, including a fix for Keras'
`model.fit` under `MultiWorkerMirroredStrategy` (keras-team/keras#20585)
that `import keras_favor` applies when the installed Keras needs it."""

from keras_favor.distribute.multi_worker_fit import (
    apply_multi_worker_fit_fix,
)
from keras_favor.distribute.multi_worker_fit import (
    apply_multi_worker_fit_fix_if_needed,
)
from keras_favor.distribute.multi_worker_fit import (
    multi_worker_fit_fix_applied,
)
from keras_favor.distribute.multi_worker_fit import (
    multi_worker_fit_fix_needed,
)

apply_multi_worker_fit_fix_if_needed()
