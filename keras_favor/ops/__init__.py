"""Linear attention operations on `(batch, heads, length, dim)` heads."""

from keras_favor.ops.linear_attention import bidirectional_linear_attention
from keras_favor.ops.linear_attention import causal_linear_attention
