"""The models the benchmarks time: one attention layer, or a block stack.

Sizes follow the Performer paper's Figure 3: 8 heads of 64 channels,
256 random features, hidden size 512, intermediate size 2048, two blocks.
"""

import keras

import keras_favor

NUM_HEADS = 8
KEY_DIM = 64
HIDDEN = NUM_HEADS * KEY_DIM
INTERMEDIATE = 2048
NUM_BLOCKS = 2
NUM_FEATURES = 256

ATTENTIONS = ("favor", "exact", "identity")


class ValueProjection(keras.layers.Layer):
    """Attention replaced by the identity: the value and output projections.

    Returns `output_dense(value_dense(value))`, the paper's lower-bound "X"
    line: everything a block computes except mixing positions.
    """

    def __init__(self, num_heads, key_dim, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.key_dim = key_dim

    def build(self, query_shape, value_shape):
        self.value_dense = keras.layers.EinsumDense(
            "abc,cde->abde",
            (None, self.num_heads, self.key_dim),
            bias_axes="de",
            dtype=self.dtype_policy,
            name="value",
        )
        self.value_dense.build(value_shape)
        self.output_dense = keras.layers.EinsumDense(
            "abcd,cde->abe",
            (None, query_shape[-1]),
            bias_axes="e",
            dtype=self.dtype_policy,
            name="attention_output",
        )
        self.output_dense.build(
            (value_shape[0], value_shape[1], self.num_heads, self.key_dim)
        )

    def call(self, query, value, use_causal_mask=False):
        return self.output_dense(self.value_dense(value))


def attention_layer(kind, chunk_size=None):
    """A self-attention layer of the benchmark's size.

    Args:
        kind: `"favor"` (`FavorAttention`), `"exact"`
            (`keras.layers.MultiHeadAttention`) or `"identity"`
            (`ValueProjection`).
        chunk_size: causal chunk size of `FavorAttention`; None keeps the
            layer's default.
    """
    if kind == "favor":
        options = {} if chunk_size is None else {"chunk_size": chunk_size}
        return keras_favor.FavorAttention(
            NUM_HEADS, KEY_DIM, num_features=NUM_FEATURES, seed=0, **options
        )
    if kind == "exact":
        return keras.layers.MultiHeadAttention(NUM_HEADS, KEY_DIM)
    if kind == "identity":
        return ValueProjection(NUM_HEADS, KEY_DIM)
    raise ValueError(
        f"`kind` must be one of {ATTENTIONS}. Received: kind={kind!r}"
    )


class PreNormBlock(keras.layers.Layer):
    """LayerNorm, attention, residual; LayerNorm, Dense(gelu), Dense, residual.

    The benchmark's own block, parametrised by its attention layer so the
    same block runs with FAVOR+, exact and identity attention.
    """

    def __init__(self, attention, intermediate, causal, **kwargs):
        super().__init__(**kwargs)
        self.attention = attention
        self.intermediate = intermediate
        self.causal = causal

    def build(self, input_shape):
        hidden = input_shape[-1]
        self.attention_norm = keras.layers.LayerNormalization(epsilon=1e-6)
        self.attention_norm.build(input_shape)
        self.attention.build(input_shape, input_shape)
        self.ffn_norm = keras.layers.LayerNormalization(epsilon=1e-6)
        self.ffn_norm.build(input_shape)
        self.ffn_in = keras.layers.Dense(self.intermediate, activation="gelu")
        self.ffn_in.build(input_shape)
        self.ffn_out = keras.layers.Dense(hidden)
        self.ffn_out.build(tuple(input_shape[:-1]) + (self.intermediate,))

    def call(self, x):
        normed = self.attention_norm(x)
        x = x + self.attention(normed, normed, use_causal_mask=self.causal)
        return x + self.ffn_out(self.ffn_in(self.ffn_norm(x)))


def block_stack(kind, causal, chunk_size=None):
    """`NUM_BLOCKS` pre-norm blocks of hidden size 512 with `kind` attention."""
    return keras.Sequential(
        [
            PreNormBlock(
                attention_layer(kind, chunk_size), INTERMEDIATE, causal
            )
            for _ in range(NUM_BLOCKS)
        ]
    )
