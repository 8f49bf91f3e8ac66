"""The models the benchmarks time, and their compiled steps.

Sizes follow the Performer paper's Figure 3: 8 heads of 64 channels, 256
random features; blocks of hidden size 512 and intermediate size 2048.
"""

import keras
import numpy as np

import keras_favor
from keras_favor.initializers import clone_initializer

NUM_HEADS, KEY_DIM, NUM_FEATURES = 8, 64, 256
HIDDEN, INTERMEDIATE, NUM_BLOCKS = NUM_HEADS * KEY_DIM, 2048, 2


def build(level, kind, causal, length, chunk_size=None, **favor_options):
    """`(model, forward)`: a built model, and the function of `x` that a step runs.

    `level="layer"`: `FavorAttention` (`kind="favor"`) or
    `keras.layers.MultiHeadAttention` (`"exact"`) as self-attention;
    `"stack"`: `NUM_BLOCKS` pre-norm `PerformerBlock`s with `kind` attention,
    where `"identity"` keeps only the value and output projections, position
    by position: everything but mixing positions, the paper's lower bound.
    `favor_options` (`recompute_length`...) go to each FAVOR+ attention.
    """
    shape, options = (1, length, HIDDEN), dict(favor_options)
    if chunk_size is not None:
        options["chunk_size"] = chunk_size
    if level == "layer":
        layer = (
            keras_favor.FavorAttention(
                NUM_HEADS, KEY_DIM, num_features=NUM_FEATURES, seed=0, **options
            )
            if kind == "favor"
            else keras.layers.MultiHeadAttention(NUM_HEADS, KEY_DIM)
        )
        layer.build(shape, shape)
        return layer, lambda x: layer(x, x, use_causal_mask=causal)
    block = IdentityBlock if kind == "identity" else keras_favor.PerformerBlock
    stack = keras.Sequential(
        [
            block(
                NUM_HEADS,
                INTERMEDIATE,
                attention=kind,
                causal=causal,
                num_features=NUM_FEATURES,
                seed=0,
                **options,
            )
            for _ in range(NUM_BLOCKS)
        ]
    )
    stack.build(shape)
    return stack, stack


class ValueOutputAttention(keras.layers.Layer):
    """Attention without mixing of positions: the value and output projections
    of each position alone. It takes the call and cache arguments of
    `FavorAttention` (its cache is empty), so a `PerformerBlock` runs it."""

    def __init__(
        self,
        num_heads,
        key_dim,
        dropout=0.0,
        seed=None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._dense = dict(
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            dtype=self.dtype_policy,
        )
        self.value_dense = keras.layers.Dense(
            num_heads * key_dim, name="value", **self._dense
        )

    def build(self, query_shape, value_shape=None):
        self.value_dense.build(query_shape)
        self.output_dense = keras.layers.Dense(
            query_shape[-1], name="attention_output", **self._dense
        )
        self.output_dense.build(
            self.value_dense.compute_output_shape(query_shape)
        )

    def call(self, query, cache=None, **unused):
        outputs = self.output_dense(self.value_dense(query))
        return outputs if cache is None else (outputs, cache)

    def empty_cache(self, batch_size, max_length=None):
        return ()


class IdentityBlock(keras_favor.PerformerBlock):
    """`PerformerBlock` with `ValueOutputAttention` (`attention="identity"`): the
    cost of everything in the block except mixing positions, the lower bound of
    the Performer paper's Figure 3."""

    ATTENTION_KINDS = ("identity",)

    def __init__(self, *args, attention="identity", **kwargs):
        super().__init__(*args, attention=attention, **kwargs)

    def _attention_layer(self, key_dim):
        return ValueOutputAttention(
            self.num_heads,
            key_dim,
            kernel_initializer=clone_initializer(self.kernel_initializer),
            bias_initializer=clone_initializer(self.bias_initializer),
            dtype=self.dtype_policy,
            name="self_attention",
        )


def compiled_step(forward, variables, pass_, jit_compile=False):
    """A `tf.function` of `x` returning a scalar that depends on the whole step:
    for `pass_="forward"` the sum of `forward(x)`, else (`"forward_backward"`)
    the sum of its gradients with respect to `variables`. Nothing is pruned, and
    fetching the scalar waits for the whole step (TensorFlow backend)."""
    import tensorflow as tf

    def step(x):
        if pass_ == "forward":
            return tf.reduce_sum(forward(x))
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(forward(x))
        return tf.add_n(
            [tf.reduce_sum(g) for g in tape.gradient(loss, variables)]
        )

    return tf.function(step, jit_compile=jit_compile)


def random_inputs(length, seed=0):
    """A `(1, length, HIDDEN)` float32 input, a tensor of the Keras backend."""
    values = np.random.default_rng(seed).standard_normal((1, length, HIDDEN))
    return keras.ops.convert_to_tensor(values.astype(np.float32))
