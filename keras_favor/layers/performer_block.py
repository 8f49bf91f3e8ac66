"""The `PerformerBlock` layer."""

import keras
from keras import ops

from keras_favor.initializers import clone_initializer
from keras_favor.layers import favor_options
from keras_favor.layers.cached_softmax_attention import CachedSoftmaxAttention
from keras_favor.layers.favor_attention import FavorAttention
from keras_favor.layers.float32_cache import without_argument_casting
from keras_favor.validation import dropout_rate
from keras_favor.validation import positive_int


@keras.saving.register_keras_serializable(package="keras_favor")
class PerformerBlock(keras.layers.Layer):
    """A Transformer block whose self-attention is FAVOR+ linear attention.

    Self-attention, then a two-layer feed-forward network, each wrapped in a
    residual connection with layer normalization and dropout. With
    `normalize_first=True` (pre-norm, the default) each sub-block computes
    `x + dropout(f(layer_norm(x)))`; with `normalize_first=False` (post-norm,
    the original Transformer) it computes `layer_norm(x + dropout(f(x)))`.
    The block has one input and one output of the same shape, so blocks
    stack inside `keras.Sequential`.

    `attention="favor"` (the default) uses `keras_favor.FavorAttention`,
    whose cost grows linearly with the sequence length. For baselines with
    the very same block, `attention="exact"` uses
    `keras_favor.layers.CachedSoftmaxAttention` (`MultiHeadAttention`'s
    quadratic softmax attention, with the same decoding cache protocol).

    Masking: the block supports Keras masks (for example from
    `Embedding(mask_zero=True)`). Masked positions are removed as keys from
    attention, and the mask is returned unchanged for the next layer. With
    `causal=True`, position `t` attends to positions `<= t` only, which
    combines with the padding mask.

    Args:
        num_heads: int, number of attention heads.
        intermediate_dim: int, width of the feed-forward hidden layer.
        key_dim: int, size of each attention head. Defaults to the input's
            last dimension divided by `num_heads`.
        dropout: float in `[0, 1)`, dropout rate of the attention (passed to
            the attention layer), after each sub-block and inside the
            feed-forward network.
        activation: activation of the feed-forward hidden layer.
        normalize_first: bool, pre-norm (True) or post-norm (False).
        causal: bool, whether attention is causal (for language models).
        layer_norm_epsilon: float, epsilon of the layer normalizations.
        kernel_initializer: initializer of all dense kernels.
        bias_initializer: initializer of all dense biases.
        attention: `"favor"` (default) or `"exact"`, see above.
        attention_options: dict of `FavorAttention`'s FAVOR options (such
            as `feature_map`, `num_features`, `seed`, `local_window`; see
            `FavorAttention` for them and their defaults). They may also be
            given as keyword arguments of the block. Exact attention uses
            `seed` alone, for its dropout.
        **kwargs: FAVOR options, or base layer arguments (`name`, `dtype`).
            `autocast` stays False: the block casts its inputs to the
            compute dtype, and a decoding `cache` stays float32.

    Call arguments:
        inputs: `(batch, length, hidden_dim)` tensor.
        mask: optional `(batch, length)` bool padding mask; False marks
            padding. Set automatically from a Keras mask.
        training: bool, whether dropout is active.
        cache: decoding only (causal blocks): the cache of the positions
            before `inputs`, from `empty_cache` or a previous cached call.
            The call then returns `(outputs, new_cache)` and runs without
            dropout; `mask` marks the padding of the new positions.
        cache_update_index: int or scalar tensor, the position of the first
            row of `inputs`, passed to the attention layer (exact attention
            writes its keys and values there).

    Returns:
        A `(batch, length, hidden_dim)` tensor, in the layer's compute dtype;
        with a `cache`, the tuple `(outputs, new_cache)`. Run in pieces, each
        given the cache the previous one returned, a sequence gets the
        outputs of one call over the whole of it.

    Example:

    ```python
    model = keras.Sequential(
        [
            keras.Input((None,), dtype="int32"),
            keras.layers.Embedding(1000, 64, mask_zero=True),
            keras_favor.layers.PerformerBlock(
                num_heads=4, intermediate_dim=128
            ),
            keras_favor.layers.PerformerBlock(
                num_heads=4, intermediate_dim=128
            ),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(2),
        ]
    )
    ```

    References:
        - [Choromanski et al., 2021](https://arxiv.org/abs/2009.14794)
        - [Vaswani et al., 2017](https://arxiv.org/abs/1706.03762)
        - [Xiong et al., 2020](https://arxiv.org/abs/2002.04745) (pre-norm)
    """

    ATTENTION_KINDS = ("favor", "exact")

    def __init__(
        self,
        num_heads,
        intermediate_dim,
        key_dim=None,
        dropout=0.0,
        activation="gelu",
        normalize_first=True,
        causal=False,
        layer_norm_epsilon=1e-5,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        attention="favor",
        attention_options=None,
        **kwargs,
    ):
        attention_options = favor_options.gathered_options(
            attention_options, kwargs
        )
        super().__init__(**without_argument_casting("PerformerBlock", kwargs))
        self.supports_masking = True
        self.num_heads = positive_int(num_heads, "num_heads")
        self.intermediate_dim = positive_int(
            intermediate_dim, "intermediate_dim"
        )
        self.key_dim = positive_int(key_dim, "key_dim", allow_none=True)
        self.dropout = dropout_rate(dropout)
        self.activation = keras.activations.get(activation)
        self.normalize_first = bool(normalize_first)
        self.causal = bool(causal)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.attention = self._checked_attention(attention)
        self.attention_options = favor_options.checked_options(
            attention_options
        )

    def _checked_attention(self, attention):
        if attention == "identity" and "identity" not in self.ATTENTION_KINDS:
            raise ValueError(
                '`attention="identity"` is a benchmark baseline, not a '
                "layer of the library: use `IdentityBlock` from the "
                "repository's `benchmarks/models.py`."
            )
        if attention not in self.ATTENTION_KINDS:
            raise ValueError(
                f"`attention` must be one of {list(self.ATTENTION_KINDS)}. "
                f"Received: attention={attention!r}"
            )
        return attention

    def build(self, input_shape):
        if len(input_shape) != 3 or input_shape[-1] is None:
            raise ValueError(
                "PerformerBlock expects inputs of shape (batch, length, "
                f"hidden_dim) with a known hidden_dim. Received: "
                f"inputs.shape={input_shape}"
            )
        hidden_dim = input_shape[-1]
        key_dim = self.key_dim or self._default_key_dim(hidden_dim)
        self.attention_layer = self._attention_layer(key_dim)
        self.attention_layer.build(input_shape, input_shape)
        self.attention_norm = self._layer_norm("attention_norm", input_shape)
        self.attention_dropout = keras.layers.Dropout(
            self.dropout, dtype=self.dtype_policy, name="attention_dropout"
        )
        self.intermediate_dense = self._dense(
            self.intermediate_dim, self.activation, "intermediate_dense"
        )
        self.intermediate_dense.build(input_shape)
        self.output_dense = self._dense(hidden_dim, None, "output_dense")
        self.output_dense.build(
            tuple(input_shape[:-1]) + (self.intermediate_dim,)
        )
        self.feedforward_norm = self._layer_norm(
            "feedforward_norm", input_shape
        )
        self.feedforward_dropout = keras.layers.Dropout(
            self.dropout, dtype=self.dtype_policy, name="feedforward_dropout"
        )
        self.built = True

    def _default_key_dim(self, hidden_dim):
        if hidden_dim % self.num_heads:
            raise ValueError(
                f"The hidden size ({hidden_dim}) is not divisible by "
                f"`num_heads` ({self.num_heads}): pass `key_dim`."
            )
        return hidden_dim // self.num_heads

    def _attention_layer(self, key_dim):
        """The self-attention layer (not built): it takes the call and
        cache arguments of `FavorAttention`."""
        common = dict(
            num_heads=self.num_heads,
            key_dim=key_dim,
            dropout=self.dropout,
            kernel_initializer=clone_initializer(self.kernel_initializer),
            bias_initializer=clone_initializer(self.bias_initializer),
            dtype=self.dtype_policy,
            name="self_attention",
        )
        if self.attention == "exact":
            return CachedSoftmaxAttention(
                seed=self.attention_options["seed"], **common
            )
        return FavorAttention(**common, **self.attention_options)

    def _layer_norm(self, name, input_shape):
        layer = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name=name
        )
        layer.build(input_shape)
        return layer

    def _dense(self, units, activation, name):
        return keras.layers.Dense(
            units,
            activation=activation,
            kernel_initializer=clone_initializer(self.kernel_initializer),
            bias_initializer=clone_initializer(self.bias_initializer),
            dtype=self.dtype_policy,
            name=name,
        )

    def empty_cache(self, batch_size, max_length=None):
        """The decoding cache of a causal block before any position.

        Args:
            batch_size: int, number of sequences.
            max_length: int, the most positions the cache will hold: needed
                by `attention="exact"`, whose key/value cache grows with
                the positions; FAVOR+'s recurrent state has the same size
                at every position, and with a `local_window` longer than
                `max_length` keeps `max_length` keys, not the window's.

        Returns:
            The attention layer's `empty_cache(batch_size, max_length)`, a
            tuple of tensors for `call(..., cache=...)`.
        """
        if not self.built:
            raise ValueError(
                "empty_cache() needs a built block: call it on data (or "
                "build the model) first."
            )
        self._check_causal()
        return self.attention_layer.empty_cache(batch_size, max_length)

    def _check_causal(self):
        if not self.causal:
            raise ValueError(
                "A decoding cache exists for causal blocks only "
                "(`causal=True`): a bidirectional position also sees later "
                "ones."
            )

    def call(
        self,
        inputs,
        mask=None,
        training=None,
        cache=None,
        cache_update_index=None,
    ):
        # Keras's argument casting is off (`float32_cache`): the residual
        # stream is cast here, the cache stays as it came.
        inputs = ops.cast(inputs, self.compute_dtype)
        if cache is not None:
            self._check_causal()
            training = False
        attended = self.attention_layer(
            self._sublayer_input(inputs, self.attention_norm),
            query_mask=mask,
            use_causal_mask=self.causal,
            training=training,
            cache=cache,
            cache_update_index=cache_update_index,
        )
        if cache is not None:
            attended, cache = attended
        x = self._residual(
            inputs,
            attended,
            self.attention_norm,
            self.attention_dropout,
            training,
        )
        hidden = self.intermediate_dense(
            self._sublayer_input(x, self.feedforward_norm)
        )
        hidden = self.feedforward_dropout(hidden, training=training)
        x = self._residual(
            x,
            self.output_dense(hidden),
            self.feedforward_norm,
            self.feedforward_dropout,
            training,
        )
        return x if cache is None else (x, cache)

    def _sublayer_input(self, x, norm):
        return norm(x) if self.normalize_first else x

    def _residual(self, x, outputs, norm, dropout, training):
        """`x` plus a sub-layer's `outputs`, normalized after (post-norm)."""
        x = x + dropout(outputs, training=training)
        return x if self.normalize_first else norm(x)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        options = self.attention_options
        if self.built and self.attention == "favor":
            # What the layer has now, LoRA enabled after build included.
            options = self.attention_layer.options_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "intermediate_dim": self.intermediate_dim,
                "key_dim": self.key_dim,
                "dropout": self.dropout,
                "activation": keras.activations.serialize(self.activation),
                "normalize_first": self.normalize_first,
                "causal": self.causal,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(
                    self.bias_initializer
                ),
                "attention": self.attention,
                "attention_options": dict(options),
            }
        )
        return config
