"""Linear attention operations on `(batch, heads, length, dim)` heads.

`bidirectional_linear_attention` and `causal_linear_attention` are the
linear-time kernels; `local_window_attention` mixes exact softmax attention
over nearby keys with them, under one normalizer; `naive_linear_attention` computes the same thing through
the quadratic score matrix, and `softmax_attention` is exact softmax
attention, both as references for tests and measurements.
`CausalState` and `LocalWindowState` are the states the causal kernels
carry from one piece of a sequence to the next (`causal_state`).
"""

from keras_favor.ops.bidirectional_attention import (
    attend_to_bidirectional_key_sums,
)
from keras_favor.ops.bidirectional_attention import bidirectional_key_sums
from keras_favor.ops.bidirectional_attention import (
    bidirectional_linear_attention,
)
from keras_favor.ops.causal_attention import causal_linear_attention
from keras_favor.ops.causal_state import CausalState
from keras_favor.ops.causal_state import LocalWindowState
from keras_favor.ops.causal_state import empty_causal_state
from keras_favor.ops.causal_state import empty_local_window_state
from keras_favor.ops.local_window import local_window_attention
from keras_favor.ops.naive import naive_linear_attention
from keras_favor.ops.naive import softmax_attention

__all__ = [
    "CausalState",
    "LocalWindowState",
    "attend_to_bidirectional_key_sums",
    "bidirectional_key_sums",
    "bidirectional_linear_attention",
    "causal_linear_attention",
    "empty_causal_state",
    "empty_local_window_state",
    "local_window_attention",
    "naive_linear_attention",
    "softmax_attention",
]
