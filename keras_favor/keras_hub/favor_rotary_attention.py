"""`FavorRotaryAttention`: the grouped-query, rotary attention of
keras-hub's Llama, Qwen and Gemma decoders in FAVOR+."""

import math

import keras
import keras_hub
from keras import ops

from keras_favor.initializers import clone_initializer
from keras_favor.keras_hub import packed_state
from keras_favor.layers import attention_cache
from keras_favor.layers import favor_kernels
from keras_favor.layers import favor_options
from keras_favor.layers import float32_cache
from keras_favor.layers.favor_options import OPTIONS
from keras_favor.ops.grouped_recompute import RECOMPUTE_LENGTH
from keras_favor.validation import dropout_rate
from keras_favor.validation import positive_int

DENSE_NAMES = ("query_dense", "key_dense", "value_dense", "output_dense")


@keras.saving.register_keras_serializable(package="keras_favor")
class FavorRotaryAttention(keras.layers.Layer):
    """Causal grouped-query self-attention with rotary position embeddings,
    computed by FAVOR+: what keras-hub's `LlamaAttention`, `QwenAttention`
    and `CachedGemmaAttention` become in a converted model.

    Queries and keys are projected and rotated (RoPE at their absolute
    positions) exactly as in the original; the rotated heads then go
    through FAVOR+'s feature map, so the random features estimate
    `exp(q . k * scale)` of the rotated heads, the original's scores. Each
    key and value head serves `num_query_heads // num_key_value_heads`
    query heads, as the original repeats them. With a `local_window` `w`,
    the keys within `w` positions of each query are weighed exactly: with
    `w` at least the length, the layer computes the original's softmax
    attention.

    The layer is always causal. Its mask argument is a key padding mask
    `(B, S)`; the converted decoders (`favor_rotary_decoder`) pass it in
    place of keras-hub's dense causal `(B, T, S)` mask.

    Args:
        num_query_heads: int, the number of query heads.
        num_key_value_heads: int, the number of key and value heads; it
            divides `num_query_heads`.
        head_dim: int, the size of each head.
        query_equation, key_equation, output_equation: the `EinsumDense`
            equations of the query, key (and value) and output projections,
            the original's kernel layout.
        rope_max_wavelength: float, the rotary embedding's longest
            wavelength.
        rope_scaling_factor: float, the rotary embedding's position scale.
        interleave_rope: bool, whether the rotated halves are interleaved
            afterwards (Gemma's layout of rotated heads).
        score_scale: float or None, the scale of the original's scores
            `q . k`. Defaults to `1 / sqrt(head_dim)`, FAVOR+'s own.
        query_bias_axes, key_bias_axes: None (no bias, default) or the
            `EinsumDense` bias axes of the query and of the key and value
            projections (Qwen's).
        kernel_initializer, bias_initializer: the projections'
            initializers.
        dropout: float in `[0, 1)`, FAVOR+'s feature dropout rate.
        feature_map: as in `FavorAttention`, and so are `num_features`,
            `projection`, `seed`, `chunk_size`, `recompute_length` and
            `local_window`.
        lora_rank, lora_alpha: accepted with the FAVOR options; a
            `lora_rank` other than None raises.
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        hidden_states: `(B, T, dim)`.
        attention_mask: None or `(B, T)` bool, False for padding keys.
        cache: None, or the causal state before the first position, from
            `empty_cache` (a tuple) or packed into one `(B, P)` float32
            tensor (`packed_state`); it comes back in the same form.
        cache_update_index: the position of the first row (the rotary
            embedding's start); 0 when None.
        training: bool, whether dropout is active.

    Returns:
        `(B, T, dim)`; with a `cache`, also the state after the last row.
    """

    def __init__(
        self,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        query_equation="bqm,muh->bquh",
        key_equation="bkm,mvh->bkvh",
        output_equation="bquh,uhm->bqm",
        rope_max_wavelength=10000,
        rope_scaling_factor=1.0,
        interleave_rope=False,
        score_scale=None,
        query_bias_axes=None,
        key_bias_axes=None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        dropout=0.0,
        feature_map="softmax",
        num_features=256,
        projection="orthogonal",
        seed=None,
        chunk_size=64,
        recompute_length=RECOMPUTE_LENGTH,
        local_window=0,
        lora_rank=None,
        lora_alpha=None,
        **kwargs,
    ):
        if lora_rank is not None:
            raise ValueError(
                "FavorRotaryAttention takes no `lora_rank`: call "
                "`enable_lora` on its dense sub-layers. Received: "
                f"lora_rank={lora_rank!r}"
            )
        super().__init__(
            **float32_cache.without_argument_casting(
                "FavorRotaryAttention", kwargs
            )
        )
        self.num_query_heads = positive_int(num_query_heads, "num_query_heads")
        self.num_key_value_heads = positive_int(
            num_key_value_heads, "num_key_value_heads"
        )
        if num_query_heads % num_key_value_heads:
            raise ValueError(
                "`num_key_value_heads` must divide `num_query_heads`. "
                f"Received: num_query_heads={num_query_heads}, "
                f"num_key_value_heads={num_key_value_heads}"
            )
        self.head_dim = positive_int(head_dim, "head_dim")
        self.equations = (query_equation, key_equation, output_equation)
        self.rope_max_wavelength = rope_max_wavelength
        self.rope_scaling_factor = rope_scaling_factor
        self.interleave_rope = bool(interleave_rope)
        self.score_scale = None if score_scale is None else float(score_scale)
        self.bias_axes = (query_bias_axes, key_bias_axes)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.dropout = dropout_rate(dropout)
        # The names FAVOR+'s kernels and caches read.
        self.num_heads, self.key_dim, self.value_dim = (
            self.num_query_heads,
            self.head_dim,
            None,
        )
        favor_options.set_options(
            self,
            feature_map,
            num_features,
            projection,
            seed,
            chunk_size,
            recompute_length,
            local_window,
            None,
            lora_alpha,
        )
        self.rotary_embedding = keras_hub.layers.RotaryEmbedding(
            max_wavelength=rope_max_wavelength,
            scaling_factor=rope_scaling_factor,
            dtype=self.dtype_policy,
            name="rotary_embedding",
        )
        self.projection = None
        self.redraw_count = None

    def _dense(self, equation, output_shape, name, bias_axes=None):
        return keras.layers.EinsumDense(
            equation,
            output_shape=output_shape,
            bias_axes=bias_axes,
            kernel_initializer=clone_initializer(self.kernel_initializer),
            bias_initializer=clone_initializer(self.bias_initializer),
            dtype=self.dtype_policy,
            name=name,
        )

    def build(self, inputs_shape):
        query_equation, key_equation, output_equation = self.equations
        heads = (None, self.num_query_heads, self.head_dim)
        key_heads = (None, self.num_key_value_heads, self.head_dim)
        query_bias_axes, key_bias_axes = self.bias_axes
        self.query_dense = self._dense(
            query_equation, heads, "query", query_bias_axes
        )
        self.key_dense = self._dense(
            key_equation, key_heads, "key", key_bias_axes
        )
        self.value_dense = self._dense(
            key_equation, key_heads, "value", key_bias_axes
        )
        self.output_dense = self._dense(
            output_equation, (None, inputs_shape[-1]), "attention_output"
        )
        for dense in DENSE_NAMES[:3]:
            getattr(self, dense).build(inputs_shape)
        self.output_dense.build((None, None) + heads[1:])
        favor_kernels.add_favor_weights(self)
        self.built = True

    def load_attention_weights(self, attention, dense_names):
        """Copies the four projections' weights of the keras-hub attention
        layer `attention`, held in its attributes `dense_names` (query,
        key, value, output)."""
        for name, source in zip(DENSE_NAMES, dense_names):
            getattr(self, name).set_weights(
                getattr(attention, source).get_weights()
            )

    def redraw_features(self, seed=None):
        """Draws a new random projection in place (as
        `FavorAttention.redraw_features`)."""
        return favor_kernels.redraw_projection(self, seed)

    def empty_cache(self, batch_size, max_length=None):
        """The causal state before any position (as
        `FavorAttention.empty_cache`)."""
        return attention_cache.empty_favor_state(self, batch_size, max_length)

    def _rotate(self, heads, start_index):
        heads = self.rotary_embedding(heads, start_index=start_index)
        if not self.interleave_rope:
            return heads
        halves = ops.split(heads, 2, axis=-1)
        return ops.reshape(ops.stack(halves, axis=-1), ops.shape(heads))

    def _heads(self, hidden_states, start_index):
        """Rotated, scaled query heads and the key and value heads repeated
        to the query heads, each `(B, T, num_query_heads, head_dim)`."""
        query = self._rotate(self.query_dense(hidden_states), start_index)
        key = self._rotate(self.key_dense(hidden_states), start_index)
        value = self.value_dense(hidden_states)
        if self.score_scale is not None:
            # FAVOR+ scales scores by 1 / sqrt(head_dim): the rest of the
            # original's scale goes into the queries.
            query = query * ops.cast(
                self.score_scale * math.sqrt(self.head_dim), query.dtype
            )
        groups = self.num_query_heads // self.num_key_value_heads
        key = ops.repeat(key, groups, axis=2)
        value = ops.repeat(value, groups, axis=2)
        return query, key, value

    def call(
        self,
        hidden_states,
        attention_mask=None,
        cache=None,
        cache_update_index=None,
        training=None,
    ):
        if attention_mask is not None and len(attention_mask.shape) != 2:
            raise ValueError(
                "FavorRotaryAttention is causal and takes a key padding mask "
                "of shape (batch, length): a general attention mask has no "
                "linear-time form. Received: attention_mask of shape "
                f"{tuple(attention_mask.shape)}"
            )
        hidden_states = ops.cast(hidden_states, self.compute_dtype)
        start_index = 0 if cache_update_index is None else cache_update_index
        packed = cache is not None and not isinstance(cache, (tuple, list))
        if packed:
            cache = packed_state.unpack(self, cache)
        if cache is not None:
            attention_cache.check_favor_state(
                self, hidden_states, cache, cache_update_index
            )
            cache = float32_cache.float32_cache(cache)
        mask = None
        if attention_mask is not None:
            mask = ops.cast(attention_mask, "bool")
        query, key, value = self._heads(hidden_states, start_index)
        outputs = favor_kernels.attend(
            self, query, key, value, mask, True, training, cache
        )
        if cache is not None:
            outputs, cache = outputs
        outputs = self.output_dense(ops.cast(outputs, self.compute_dtype))
        if cache is None:
            return outputs
        return outputs, packed_state.pack(cache) if packed else cache

    def compute_output_shape(self, inputs_shape):
        return inputs_shape

    def get_config(self):
        config = super().get_config()
        query_equation, key_equation, output_equation = self.equations
        config.update(
            {
                "num_query_heads": self.num_query_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim,
                "query_equation": query_equation,
                "key_equation": key_equation,
                "output_equation": output_equation,
                "rope_max_wavelength": self.rope_max_wavelength,
                "rope_scaling_factor": self.rope_scaling_factor,
                "interleave_rope": self.interleave_rope,
                "score_scale": self.score_scale,
                "query_bias_axes": self.bias_axes[0],
                "key_bias_axes": self.bias_axes[1],
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(
                    self.bias_initializer
                ),
                "dropout": self.dropout,
            }
        )
        options = favor_options.options_config(self)
        config.update(
            {name: options[name] for name in OPTIONS if "lora" not in name}
        )
        return config
