"""The `PerformerBlock` layer."""

import keras
from keras import ops

from keras_favor import feature_maps as feature_maps_lib
from keras_favor import projections as projections_lib
from keras_favor.layers.favor_attention import FavorAttention
from keras_favor.layers.float32_cache import without_argument_casting
from keras_favor.validation import batch_size as validation_batch_size
from keras_favor.validation import check_cache_shapes
from keras_favor.validation import dropout_rate
from keras_favor.validation import is_int
from keras_favor.validation import optional_seed
from keras_favor.validation import non_negative_int
from keras_favor.validation import positive_int

ATTENTION_KINDS = ("favor", "exact", "identity")


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
    whose cost grows linearly with the sequence length. For baselines and
    ablations with the very same block, `attention="exact"` uses
    `keras.layers.MultiHeadAttention` (quadratic softmax attention) and
    `attention="identity"` replaces attention by its value and output
    projections alone, applied to each position (no mixing of positions):
    the cost of everything in the block except mixing, the lower bound of
    the Performer paper's Figure 3.

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
        attention: `"favor"` (default), `"exact"` or `"identity"`, see above.
        feature_map, num_features, projection, seed, chunk_size,
        recompute_length, local_window: passed to `FavorAttention` (unused
            by the other attention kinds, except
            `seed`, which also seeds exact attention's dropout).
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.
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
            row of `inputs`: where an exact-attention block writes its keys
            and values (FAVOR+'s recurrent state does not need it).

    Returns:
        A `(batch, length, hidden_dim)` tensor, in the layer's compute dtype;
        with a `cache`, the tuple `(outputs, new_cache)`. Run in pieces, each
        given the cache the previous one returned, a sequence gets the
        outputs of one call over the whole of it.

    Example:

    ```python
    model = keras.Sequential([
        keras.Input((None,), dtype="int32"),
        keras.layers.Embedding(1000, 64, mask_zero=True),
        keras_favor.layers.PerformerBlock(num_heads=4, intermediate_dim=128),
        keras_favor.layers.PerformerBlock(num_heads=4, intermediate_dim=128),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(2),
    ])
    ```

    References:
        - [Choromanski et al., 2021](https://arxiv.org/abs/2009.14794)
        - [Vaswani et al., 2017](https://arxiv.org/abs/1706.03762)
        - [Xiong et al., 2020](https://arxiv.org/abs/2002.04745) (pre-norm)
    """

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
        feature_map="softmax",
        num_features=256,
        projection="orthogonal",
        seed=None,
        chunk_size=64,
        recompute_length=32768,
        local_window=0,
        **kwargs,
    ):
        super().__init__(
            **without_argument_casting("PerformerBlock", kwargs)
        )
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
        if attention not in ATTENTION_KINDS:
            raise ValueError(
                f"`attention` must be one of {list(ATTENTION_KINDS)}. "
                f"Received: attention={attention!r}"
            )
        self.attention = attention
        self.feature_map = feature_maps_lib.get(feature_map)
        self.num_features = positive_int(num_features, "num_features")
        self.projection = projections_lib.get(projection)
        self.seed = optional_seed(seed)
        self.chunk_size = positive_int(chunk_size, "chunk_size")
        self.recompute_length = positive_int(
            recompute_length, "recompute_length"
        )
        self.local_window = non_negative_int(local_window, "local_window")

    def build(self, input_shape):
        if len(input_shape) != 3 or input_shape[-1] is None:
            raise ValueError(
                "PerformerBlock expects inputs of shape (batch, length, "
                f"hidden_dim) with a known hidden_dim. Received: "
                f"inputs.shape={input_shape}"
            )
        hidden_dim = input_shape[-1]
        key_dim = self.key_dim or self._default_key_dim(hidden_dim)
        self.attention_layer = self._attention_layer(key_dim, input_shape)
        if self.attention_layer is not None:
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

    def _attention_layer(self, key_dim, input_shape):
        hidden_dim = input_shape[-1]
        if self.attention == "identity":
            # The value and output projections, position by position.
            self.value_dense = self._dense(
                self.num_heads * key_dim, None, "value"
            )
            self.value_dense.build(input_shape)
            self.attention_output_dense = self._dense(
                hidden_dim, None, "attention_output"
            )
            self.attention_output_dense.build(
                self.value_dense.compute_output_shape(input_shape)
            )
            return None
        common = dict(
            num_heads=self.num_heads,
            key_dim=key_dim,
            dropout=self.dropout,
            kernel_initializer=self._new_initializer(self.kernel_initializer),
            bias_initializer=self._new_initializer(self.bias_initializer),
            seed=self.seed,
            dtype=self.dtype_policy,
            name="self_attention",
        )
        if self.attention == "exact":
            return keras.layers.MultiHeadAttention(**common)
        return FavorAttention(
            feature_map=self.feature_map,
            num_features=self.num_features,
            projection=self.projection,
            chunk_size=self.chunk_size,
            recompute_length=self.recompute_length,
            local_window=self.local_window,
            **common,
        )

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
            kernel_initializer=self._new_initializer(self.kernel_initializer),
            bias_initializer=self._new_initializer(self.bias_initializer),
            dtype=self.dtype_policy,
            name=name,
        )

    @staticmethod
    def _new_initializer(initializer):
        # A fresh copy per sub-layer, so that a seeded initializer does not
        # give every kernel the same values.
        return initializer.__class__.from_config(initializer.get_config())

    def _attend(self, x, mask, training, cache=None, cache_update_index=None):
        if self.attention_layer is None:
            outputs = self.attention_output_dense(self.value_dense(x))
            return outputs if cache is None else (outputs, cache)
        if cache is not None and self.attention == "exact":
            return _exact_attention_with_cache(
                self.attention_layer, x, mask, cache, cache_update_index
            )
        if cache is not None:
            return self.attention_layer(
                x, query_mask=mask, use_causal_mask=True, cache=cache,
                cache_update_index=cache_update_index,
            )
        return self.attention_layer(
            x,
            x,
            query_mask=mask,
            value_mask=mask,
            use_causal_mask=self.causal,
            training=training,
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
            A tuple of tensors, for `call(..., cache=...)`:
            `FavorAttention.empty_cache(batch_size)` for `"favor"`; zero
            keys `(B, max_length, N, h)`, values `(B, max_length, N, h)`
            and their mask `(B, max_length)` (no key yet) for `"exact"`;
            an empty tuple for `"identity"`.
        """
        if not self.built:
            raise ValueError(
                "empty_cache() needs a built block: call it on data (or "
                "build the model) first."
            )
        if not self.causal:
            raise ValueError(
                "A decoding cache exists for causal blocks only "
                "(`causal=True`): a bidirectional position also sees later "
                "ones."
            )
        batch_size = validation_batch_size(batch_size)
        if self.attention == "favor":
            return self.attention_layer.empty_cache(batch_size, max_length)
        if self.attention == "identity":
            return ()
        max_length = positive_int(max_length, "max_length")
        layer = self.attention_layer
        heads = (batch_size, max_length, layer.num_heads)
        return (
            ops.zeros(heads + (layer.key_dim,), self.compute_dtype),
            ops.zeros(
                heads + (layer.value_dim or layer.key_dim,),
                self.compute_dtype,
            ),
            ops.zeros((batch_size, max_length), "bool"),
        )

    def _feedforward(self, x, training):
        x = self.intermediate_dense(x)
        x = self.feedforward_dropout(x, training=training)
        return self.output_dense(x)

    def _residual(self, x, sublayer, norm, dropout, training):
        if self.normalize_first:
            return x + dropout(sublayer(norm(x)), training=training)
        return norm(x + dropout(sublayer(x), training=training))

    def call(
        self, inputs, mask=None, training=None, cache=None,
        cache_update_index=None,
    ):
        # Keras's argument casting is off (`float32_cache`): the residual
        # stream is cast here, the cache stays as it came.
        inputs = ops.cast(inputs, self.compute_dtype)
        if cache is not None:
            return self._call_with_cache(
                inputs, mask, cache, cache_update_index
            )
        x = self._residual(
            inputs,
            lambda y: self._attend(y, mask, training),
            self.attention_norm,
            self.attention_dropout,
            training,
        )
        return self._feedforward_block(x, training)

    def _call_with_cache(self, inputs, mask, cache, cache_update_index):
        """`call` for the positions after `cache`, no dropout: the outputs
        and the cache after them."""
        if not self.causal:
            raise ValueError(
                "A `cache` is for causal blocks (`causal=True`): a "
                "bidirectional position also sees later ones."
            )
        if self.attention == "exact":
            _check_key_value_cache(
                self.attention_layer, inputs, cache, cache_update_index
            )
        new_cache = []

        def attend(y):
            outputs, updated = self._attend(
                y, mask, False, cache, cache_update_index
            )
            new_cache.append(updated)
            return outputs

        x = self._residual(
            inputs, attend, self.attention_norm, self.attention_dropout,
            False,
        )
        return self._feedforward_block(x, False), new_cache[0]

    def _feedforward_block(self, x, training):
        return self._residual(
            x,
            lambda y: self._feedforward(y, training),
            self.feedforward_norm,
            self.feedforward_dropout,
            training,
        )

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
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
                "feature_map": feature_maps_lib.serialize(self.feature_map),
                "num_features": self.num_features,
                "projection": projections_lib.serialize(self.projection),
                "seed": self.seed,
                "chunk_size": self.chunk_size,
                "recompute_length": self.recompute_length,
                "local_window": self.local_window,
            }
        )
        return config


def _check_key_value_cache(mha, x, cache, index):
    """A `ValueError` naming the argument unless `cache` is a key/value
    cache for `x`'s batch with room for `x` at `index`."""
    if index is None:
        raise ValueError(
            "`cache_update_index` is needed with `attention=\"exact\"`: "
            "the position in the key/value cache where `inputs` go."
        )
    batch, length = x.shape[:2]
    slots = cache[2].shape[1] if len(cache) == 3 else None
    value_dim = mha.value_dim or mha.key_dim
    check_cache_shapes(
        cache,
        [
            (batch, slots, mha.num_heads, mha.key_dim),
            (batch, slots, mha.num_heads, value_dim),
            (batch, slots),
        ],
        "inputs", "empty_cache(batch_size, max_length)",
    )
    if is_int(index) and None not in (length, slots) and (
        index < 0 or index + length > slots
    ):
        raise ValueError(
            f"`cache_update_index` ({index}) and the {length} new positions "
            f"do not fit in the key/value cache of {slots} positions (its "
            "`max_length`)."
        )


def _exact_attention_with_cache(mha, x, mask, cache, index):
    """`MultiHeadAttention`'s causal self-attention for the positions
    `index, index + 1, ...` of `x`, over its key/value cache: the keys and
    values of `x` are written at `index`, then each query attends to the
    cached keys at or before its own position."""
    keys, values, key_mask = cache
    new_mask = ops.ones(ops.shape(x)[:2], "bool") if mask is None else mask
    # The dense sub-layers get no Keras mask (they would warn that they do
    # not support masking): the key mask below does its job.
    x = ops.copy(x)
    start = ops.cast(index, "int32")
    keys = ops.slice_update(
        keys, (0, start, 0, 0), ops.cast(mha.key_dense(x), keys.dtype)
    )
    values = ops.slice_update(
        values, (0, start, 0, 0), ops.cast(mha.value_dense(x), values.dtype)
    )
    key_mask = ops.slice_update(
        key_mask, (0, start), ops.cast(new_mask, "bool")
    )
    positions = start + ops.arange(ops.shape(x)[1], dtype="int32")
    causal = ops.arange(ops.shape(keys)[1], dtype="int32")[None, :] <= (
        positions[:, None]
    )
    attention_mask = ops.logical_and(causal[None], key_mask[:, None, :])
    outputs = ops.dot_product_attention(
        mha.query_dense(x), keys, values,
        mask=attention_mask[:, None, :, :],
        scale=1.0 / float(mha.key_dim) ** 0.5,
    )
    return mha.output_dense(outputs), (keys, values, key_mask)
