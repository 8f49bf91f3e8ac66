"""The `FavorAttention` layer."""

import keras
from keras import ops

from keras_favor.layers import attention_arguments as arguments
from keras_favor.layers import attention_cache
from keras_favor.layers import dense_sublayers
from keras_favor.layers import favor_kernels
from keras_favor.layers import favor_options
from keras_favor.layers import float32_cache
from keras_favor.ops.grouped_recompute import RECOMPUTE_LENGTH
from keras_favor.validation import dropout_rate
from keras_favor.validation import positive_int


@keras.saving.register_keras_serializable(package="keras_favor")
class FavorAttention(
    dense_sublayers.MultiHeadAttentionWeights, keras.layers.Layer
):
    """Multi-head attention in linear time and memory: Performer's FAVOR+.

    A drop-in replacement for `keras.layers.MultiHeadAttention` wherever
    linear attention allows. Instead of `softmax(Q K^T / sqrt(d)) V` it
    computes `phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1)` with a feature map
    `phi`, never forming the `(T, S)` attention matrix. With the default
    `feature_map="softmax"` it is an unbiased random-feature estimate of
    softmax attention, with an error falling like `1 / sqrt(num_features)`.

    Weights: `query_dense`, `key_dense`, `value_dense` and `output_dense`
    are `MultiHeadAttention`'s sub-layers, with its equations and weight
    shapes for every input rank. `get_weights()` lists the layer's own
    non-trainable weights first, `projection` (the random projection: drawn
    at build, saved, the same on every replica, changed only by
    `redraw_features`) and `redraw_count`, then `MultiHeadAttention`'s eight
    weights in its order. `set_weights` also takes those eight alone, as
    `MultiHeadAttention.get_weights()` returns them, and
    `load_multi_head_attention_weights(mha)` copies a built layer's.
    `enable_lora` and `quantize` act on the four dense sub-layers.

    Masking: keys can be masked, queries cannot. Keras masks on `value` and
    `key` (as from `Embedding(mask_zero=True)`), `value_mask`, `key_mask`
    and an `attention_mask` of shape `(B, S)` or `(B, 1, S)`, each with the
    keys' batch size and length, remove keys from numerator and normalizer.
    A general `(B, T, S)` mask has no linear-time form and raises. The
    query's mask reaches the output; a query that sees no key gets zeros.

    Dropout drops key features of the numerator in training, which is
    `MultiHeadAttention`'s dropout in expectation. Features and their sums
    are float32 under any dtype policy, with stabilizers that cancel.

    Args:
        num_heads: int, number of attention heads.
        key_dim: int, size of each head for query and key.
        value_dim: int, size of each head for value. Defaults to `key_dim`.
        dropout: float in `[0, 1)`, the feature dropout rate.
        use_bias: bool, whether the dense layers use bias vectors.
        output_shape: positive int or tuple of them, the output's trailing
            shape. Defaults to the last dimension of `query`.
        attention_axes: None (default), attention over all axes between
            batch and features jointly; only values naming all of them pass.
        kernel_initializer: as in `MultiHeadAttention`, for the dense
            layers, and so are `bias_initializer`, `kernel_regularizer`,
            `bias_regularizer`, `activity_regularizer`, `kernel_constraint`
            and `bias_constraint`.
        use_gate, sliding_window: `MultiHeadAttention` options without a
            linear-time form here: only the defaults (False, None) pass.
        feature_map: `"softmax"` (default), `"softmax_hyperbolic"`,
            `"softmax_trig"`, `"relu"`, `"elu"`, or a `FeatureMap`.
        num_features: int, number of random projections. Defaults to 256.
        projection: `"orthogonal"` (default), `"iid"`, `"simplex"`, or a
            `Projection`, the distribution of the projection.
        seed: None or an int in `[-2**63, 2**63)` (int64, as the random ops
            take it). An int makes the initial projection, dropout and every
            `redraw_features()` without a seed reproducible.
        chunk_size: int, positions per chunk of the causal algorithm (speed
            and memory, not the result). Defaults to 64.
        recompute_length: int; longer sequences run in groups of this many
            positions, recomputed in the backward pass, so training memory
            grows with it, not with the length. Defaults to 32768.
        local_window: int >= 0. With `w > 0`, each query weighs the keys
            within `w` positions exactly, by the softmax kernel
            `exp(q . k / sqrt(key_dim))`, and all other keys by the random
            features, with one normalizer over all keys: causal, the keys
            `t - w < s <= t`; bidirectional, `|t - s| < w`. It costs
            `O(L min(w, L) key_dim)` more (a cached step `O(min(w, n)
            key_dim)` for a cache made for `n` positions, `empty_cache`),
            is exact softmax attention where `w >= L`, and needs a feature
            map that estimates the softmax kernel and queries and keys of
            one length.
            Defaults to 0 (random features for every key).
        lora_rank, lora_alpha: None, or `enable_lora`'s arguments, which
            `get_config` records so a saved LoRA layer loads with LoRA.
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.
            `autocast` stays False: the dense sub-layers cast the inputs to
            the compute dtype, and a decoding `cache` stays float32.

    Call arguments:
        query: `(B, *T, dim)`, one or more position axes `T`.
        value: `(B, *S, dim)`. Defaults to `query` (self-attention, the keys
            then masked by the query's mask), for `keras.Sequential`.
        key: `(B, *S, dim)`, defaults to `value`; without `value` it raises.
        query_mask: `(B, *T)`, filled in by Keras; it reaches the output.
        value_mask, key_mask: `(B, *S)` bool; False masks a key.
        attention_mask: `(B, *S)` or `(B, 1, *S)` bool; False masks a key.
        return_attention_scores: must be False: there is no score matrix.
        training: bool, whether dropout is active.
        use_causal_mask: bool: query `i` sees keys `j <= i`, positions in
            row-major order; for `T > S` the last queries see every key
            (`MultiHeadAttention`'s lower-triangular `(T, S)` mask).
        mask: filled in by Keras for a one-input call: it masks the keys.
        cache: decoding only: the causal state before `query`'s first
            position, from `empty_cache(batch_size)` or a previous cached
            call. Causal self-attention only (`use_causal_mask=True`,
            `query` alone, shape `(B, T, dim)`); any number `T` of new
            positions (a whole prompt is one chunked pass); keys masked by
            `query_mask` or `value_mask` leave the state as it is (left
            padding); no dropout.
        cache_update_index: the position of `query`'s first row, for
            keras-hub's calling convention (`CachedMultiHeadAttention`).
            The state has the same size at every position and does not
            need it; an int checks that the positions fit a window cache
            made for fewer positions than the window.

    Returns:
        `(B, *T, dim)`, or `(B, *T, *output_shape)`, in the compute dtype.
        With a `cache`, the tuple `(outputs, new_cache)`: the state after
        the last position, of the same shapes. Run in pieces, each given
        the cache the previous one returned, a sequence gets the outputs
        of one causal call over the whole of it.

    Example:

    ```python
    inputs = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(1000, 64, mask_zero=True)(inputs)
    x = keras_favor.FavorAttention(num_heads=4, key_dim=16)(x, x)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(x))
    model = keras.Model(inputs, outputs)
    ```

    References:
        - [Choromanski et al., 2021](https://arxiv.org/abs/2009.14794)
        - [Katharopoulos et al., 2020](https://arxiv.org/abs/2006.16236)
    """

    def __init__(
        self,
        num_heads,
        key_dim,
        value_dim=None,
        dropout=0.0,
        use_bias=True,
        output_shape=None,
        attention_axes=None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        use_gate=False,
        sliding_window=None,
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
        super().__init__(
            **float32_cache.without_argument_casting("FavorAttention", kwargs)
        )
        self.supports_masking = True
        self.num_heads = positive_int(num_heads, "num_heads")
        self.key_dim = positive_int(key_dim, "key_dim")
        self.value_dim = positive_int(value_dim, "value_dim", allow_none=True)
        self.dropout = dropout_rate(dropout)
        self.use_bias = bool(use_bias)
        self.output_shape_ = arguments.normalized_output_shape(output_shape)
        self.attention_axes = arguments.normalized_attention_axes(
            attention_axes
        )
        arguments.check_linear_time_options(use_gate, sliding_window)
        dense_sublayers.set_sublayer_arguments(
            self,
            kernel_initializer,
            bias_initializer,
            kernel_regularizer,
            bias_regularizer,
            activity_regularizer,
            kernel_constraint,
            bias_constraint,
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
            lora_rank,
            lora_alpha,
        )
        self.projection = None
        self.redraw_count = None

    def build(self, query_shape, value_shape=None, key_shape=None):
        shapes = arguments.input_shapes(query_shape, value_shape, key_shape)
        arguments.check_attention_axes(
            self.attention_axes, query=shapes[0], value=shapes[1]
        )
        dense_sublayers.build_dense_layers(self, *shapes)
        favor_kernels.add_favor_weights(self)
        if self.lora_rank:
            dense_sublayers.enable_lora(
                self, self.lora_rank, self.lora_alpha, "he_uniform", "zeros"
            )
        self.built = True

    def redraw_features(self, seed=None):
        """Draws a new random projection in place.

        Args:
            seed: None, an int, or a `(2,)` int tensor of a stateless seed.
                The same seed always gives the same projection. If None, the
                layer's `seed` and its redraw count `k` give the next one
                (`fold_in([seed, 0], k)`, reproducible), or, without a layer
                seed, a stateful seed generator gives a new one at every
                call, eager or inside a `tf.function`.

        Returns:
            The new projection, or None for a feature map without one.
        """
        dense_sublayers.check_built(self, "redraw_features()")
        return favor_kernels.redraw_projection(self, seed)

    def empty_cache(self, batch_size, max_length=None):
        """The decoding cache before any position, for `call(...,
        cache=...)`: the causal state of `batch_size` sequences (an int, or
        a scalar tensor in a graph) with no key, in the protocol that exact
        attention shares (`CachedSoftmaxAttention`).

        Args:
            batch_size: int or scalar int tensor.
            max_length: None, or the most positions the cache will see. With
                a `local_window` `w` the cache then keeps `min(w,
                max_length)` keys, so that a cached step costs
                `O(min(w, max_length) d)` however long the window; a call
                past `max_length` positions raises where its
                `cache_update_index` is an int. Ignored without a window.

        Returns:
            A plain tuple of tensors (the floating ones float32) whose
            sizes do not depend on the position: those of
            `keras_favor.ops.CausalState`, the running sums and their
            stabilizer levels; with a `local_window` `w`, those of
            `keras_favor.ops.LocalWindowState`, which also keeps the last
            `min(w, max_length)` keys and values.
        """
        dense_sublayers.check_built(self, "empty_cache()")
        return attention_cache.empty_favor_state(self, batch_size, max_length)

    def options_config(self):
        """The layer's FAVOR options (`OPTIONS`), serialized as in
        `get_config`: what a `PerformerBlock`'s config records."""
        return favor_options.options_config(self)

    def call(
        self,
        query,
        value=None,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
        mask=None,
        cache=None,
        cache_update_index=None,
    ):
        if value is None and key is None:
            # Self-attention with a single input, as inside keras.Sequential:
            # the query's padding mask is the keys' mask. Keras passes it as
            # `mask` when the call has one tensor argument, as `query_mask`
            # when it has several.
            query_mask = mask if query_mask is None else query_mask
            value_mask = query_mask if value_mask is None else value_mask
        value, key, mask = attention_cache.checked_inputs(
            self,
            query,
            value,
            key,
            return_attention_scores,
            use_causal_mask,
            cache,
            cache_update_index,
            value_mask=value_mask,
            key_mask=key_mask,
            attention_mask=attention_mask,
        )
        if cache is not None:
            cache = float32_cache.float32_cache(cache)
        arguments.check_traceable_lengths(query, value, key)
        # The query's Keras mask reaches the output through `compute_mask`.
        statistics_mask = None
        if self.feature_map.uses_statistics:
            statistics_mask = arguments.statistics_query_mask(
                query_mask, mask, query, value, key
            )
        outputs = favor_kernels.attend_inputs(
            self,
            query,
            value,
            key,
            mask,
            use_causal_mask,
            training,
            cache,
            statistics_mask,
        )
        if cache is not None:
            outputs, cache = outputs
        outputs = self._output_dense(ops.cast(outputs, self.compute_dtype))
        return outputs if cache is None else (outputs, cache)

    def compute_output_spec(
        self,
        query,
        value=None,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
        mask=None,
        cache=None,
        cache_update_index=None,
    ):
        # Symbolic calls run the same checks as `call`.
        value, key, _ = attention_cache.checked_inputs(
            self,
            query,
            value,
            key,
            return_attention_scores,
            use_causal_mask,
            cache,
            cache_update_index,
            value_mask=value_mask,
            key_mask=key_mask,
            attention_mask=attention_mask,
        )
        shape = self.compute_output_shape(query.shape, value.shape, key.shape)
        outputs = keras.KerasTensor(shape, dtype=self.compute_dtype)
        if cache is None:
            return outputs
        return outputs, tuple(
            keras.KerasTensor(x.shape, dtype=x.dtype) for x in cache
        )

    def compute_output_shape(
        self, query_shape, value_shape=None, key_shape=None
    ):
        arguments.input_shapes(query_shape, value_shape, key_shape)
        output_shape = self.output_shape_ or (query_shape[-1],)
        return tuple(query_shape[:-1]) + tuple(output_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "key_dim": self.key_dim,
                "value_dim": self.value_dim,
                "dropout": self.dropout,
                "use_bias": self.use_bias,
                "output_shape": self.output_shape_,
                "attention_axes": self.attention_axes,
                "use_gate": False,
                "sliding_window": None,
            }
        )
        config.update(self.options_config())
        config.update(dense_sublayers.sublayer_config(self))
        return config
