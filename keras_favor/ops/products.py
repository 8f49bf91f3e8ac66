"""Matrix products with a transposed factor.

`keras.ops.matmul` takes no transpose flags, and on the TensorFlow backend an
explicit transpose before it is not folded into the product: the products of
`K'^T V` and `Q' K'^T` then take about 1.15-1.4x as long, forward and
backward. On TensorFlow these use the batched matmul's own flags; other
backends compile the transpose into the product.
"""

import keras
from keras import ops


def _tensorflow_matmul(a, b, **flags):
    import tensorflow as tf

    return tf.matmul(a, b, **flags)


def matmul_transposed_a(a, b):
    """`a^T b` over the last two axes."""
    if keras.backend.backend() == "tensorflow":
        return _tensorflow_matmul(a, b, transpose_a=True)
    return ops.matmul(ops.swapaxes(a, -1, -2), b)


def matmul_transposed_b(a, b):
    """`a b^T` over the last two axes."""
    if keras.backend.backend() == "tensorflow":
        return _tensorflow_matmul(a, b, transpose_b=True)
    return ops.matmul(a, ops.swapaxes(b, -1, -2))
