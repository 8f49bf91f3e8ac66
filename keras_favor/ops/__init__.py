"""Linear attention operations on feature tensors."""

from keras_favor.ops.linear_attention import bidirectional_key_features
from keras_favor.ops.linear_attention import bidirectional_linear_attention
from keras_favor.ops.linear_attention import causal_key_features
from keras_favor.ops.linear_attention import causal_linear_attention
from keras_favor.ops.linear_attention import query_features
