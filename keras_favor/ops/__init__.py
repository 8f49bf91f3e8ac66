"""Linear attention operations on `(batch, heads, length, dim)` heads."""

from keras_favor.ops.linear_attention import bidirectional_linear_attention
from keras_favor.ops.linear_attention import causal_linear_attention
from keras_favor.ops.naive import naive_linear_attention
from keras_favor.ops.naive import softmax_attention

__all__ = [
    "bidirectional_linear_attention",
    "causal_linear_attention",
    "naive_linear_attention",
    "softmax_attention",
]
