"""The `FavorAttention` layer."""

import random

import keras
import tensorflow as tf
from keras import ops

from keras_favor import feature_maps as feature_maps_lib
from keras_favor import projections as projections_lib
from keras_favor import ops as favor_ops
from keras_favor.layers.attention_arguments import check_causal_lengths
from keras_favor.layers.attention_arguments import check_input_shapes
from keras_favor.layers.attention_arguments import key_padding_mask
from keras_favor.layers.attention_arguments import normalized_output_shape
from keras_favor.layers.attention_arguments import output_equation
from keras_favor.validation import dropout_rate
from keras_favor.validation import optional_seed
from keras_favor.validation import positive_int

SEED_RANGE = 2**31 - 1


@keras.saving.register_keras_serializable(package="keras_favor")
class FavorAttention(keras.layers.Layer):
    """Multi-head attention in linear time and memory: Performer's FAVOR+.

    A drop-in replacement for `keras.layers.MultiHeadAttention`. It has the
    same call signature and the same sub-layers (`query_dense`, `key_dense`,
    `value_dense`, `output_dense`) with the same weight shapes, so trained
    `MultiHeadAttention` weights copy over with `set_weights`. Instead of
    `softmax(Q K^T / sqrt(d)) V` it computes
    `phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1)` with a kernel feature map
    `phi`, which never forms the `(T, S)` attention matrix: time and memory
    grow linearly with the sequence length. With `feature_map="softmax"`
    (the default) the result is an unbiased random-feature estimate of
    softmax attention whose error falls like `1 / sqrt(num_features)`.

    The random projection is a non-trainable weight, `projection`, drawn once
    when the layer is built, saved with the model and identical on every
    replica. It changes only when `redraw_features` is called (see the
    `keras_favor.FeatureRedraw` callback), never at inference.

    Features and their sums are computed in float32 under any dtype policy,
    with stabilizers that cancel exactly, so large inputs, fully padded rows
    and mixed precision give no NaN or Inf.

    Masking: key padding is supported. Keras masks on `value` and `key` (for
    example from `Embedding(mask_zero=True)`), `value_mask`, `key_mask` and
    an `attention_mask` of shape `(B, S)` or `(B, 1, S)` remove keys: a
    masked key adds nothing to the numerator or the normalizer. A general
    `(B, T, S)` attention mask has no linear-time form and raises a
    `ValueError`; use `use_causal_mask=True` for causal attention. The mask
    of `query` is carried to the output. A query that sees no key gets a
    zero attention output.

    Dropout: there is no attention matrix to drop entries from. Instead,
    during training each key feature in the numerator is dropped with
    probability `dropout` (and the survivors scaled by `1 / (1 - dropout)`),
    while the normalizer keeps all features. In expectation this is exactly
    `MultiHeadAttention`'s dropout on attention weights. It is off at
    inference.

    Args:
        num_heads: int, number of attention heads.
        key_dim: int, size of each head for query and key.
        value_dim: int, size of each head for value. Defaults to `key_dim`.
        dropout: float in `[0, 1)`, the feature dropout rate described above.
        use_bias: bool, whether the dense layers use bias vectors.
        output_shape: int or tuple of ints, the trailing shape of the output.
            Defaults to the last dimension of `query`.
        kernel_initializer, bias_initializer, kernel_regularizer,
        bias_regularizer, activity_regularizer, kernel_constraint,
        bias_constraint: as in `keras.layers.MultiHeadAttention`, applied to
            the four dense sub-layers.
        feature_map: `"softmax"` (FAVOR+ positive features, default),
            `"softmax_hyperbolic"`, `"softmax_trig"`, `"relu"`, `"elu"`, or a
            `keras_favor.feature_maps.FeatureMap`.
        num_features: int, number of random projections `m`. Defaults to 256.
        projection: `"orthogonal"` (default), `"iid"`, or a
            `keras_favor.projections.Projection`, the distribution the
            projection is drawn from.
        seed: int or None. With an int, the initial projection and every
            `redraw_features()` without an explicit seed are reproducible;
            it also seeds dropout.
        chunk_size: int, positions per chunk of the causal algorithm, which
            forms `chunk_size x chunk_size` products inside a chunk and
            carries prefix sums between chunks. Defaults to 64. It changes
            speed and memory, not the result (beyond float32 round-off).
        recompute_length: int, the memory/speed trade of long sequences.
            Sequences longer than this run in groups of this many
            positions, whose activations are recomputed in the backward
            pass instead of stored: training memory then grows with
            `recompute_length`, not with the sequence length, for one more
            evaluation of the features per group. Defaults to 32768. A
            causal training step over 32768 positions (8 heads of 64, 256
            features, batch 1) peaks under 4 GB with 16384 and runs faster
            with the default (BENCHMARKS.md). Inference is unaffected.
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        query: `(B, T, dim)` query tensor.
        value: `(B, S, dim)` value tensor. Defaults to `query`
            (self-attention, whose keys are then masked by `query_mask`),
            so that the layer also works with one input in
            `keras.Sequential`.
        key: optional `(B, S, dim)` key tensor; defaults to `value`.
        query_mask: `(B, T)` bool, filled in by Keras from the query's mask.
            Queries are not masked; as in `MultiHeadAttention`, the query's
            Keras mask becomes the output's.
        value_mask: `(B, S)` bool; False masks a key.
        key_mask: `(B, S)` bool; False masks a key.
        attention_mask: `(B, S)` or `(B, 1, S)` bool; False masks a key.
        use_causal_mask: bool. If True, query `t` attends to keys `s <= t`
            only (requires `T == S`).
        training: bool, whether dropout is active.
        mask: filled in by Keras with the query's mask when the layer is
            called on the query alone; it then masks the keys, as
            `query_mask` does.

    Returns:
        A `(B, T, dim)` tensor, or `(B, T, *output_shape)`, in the layer's
        compute dtype.

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
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        feature_map="softmax",
        num_features=256,
        projection="orthogonal",
        seed=None,
        chunk_size=64,
        recompute_length=32768,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.supports_masking = True
        self.num_heads = positive_int(num_heads, "num_heads")
        self.key_dim = positive_int(key_dim, "key_dim")
        self.value_dim = positive_int(value_dim, "value_dim", allow_none=True)
        self.dropout = dropout_rate(dropout)
        self.use_bias = bool(use_bias)
        self.output_shape_ = normalized_output_shape(output_shape)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        # As in MultiHeadAttention, the activity regularizer applies to the
        # four dense sub-layers; `self.activity_regularizer` would make the
        # base Layer apply it to the output a second time.
        self._activity_regularizer = keras.regularizers.get(
            activity_regularizer
        )
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.feature_map = feature_maps_lib.get(feature_map)
        self.num_features = positive_int(num_features, "num_features")
        self.projection_distribution = projections_lib.get(projection)
        self.seed = optional_seed(seed)
        self.chunk_size = positive_int(chunk_size, "chunk_size")
        self.recompute_length = positive_int(
            recompute_length, "recompute_length"
        )
        self.projection = None
        self.redraw_count = None

    @property
    def query_dense(self):
        return self._query_dense

    @property
    def key_dense(self):
        return self._key_dense

    @property
    def value_dense(self):
        return self._value_dense

    @property
    def output_dense(self):
        return self._output_dense

    def _dense(self, equation, output_shape, bias_axes, name):
        return keras.layers.EinsumDense(
            equation,
            output_shape=output_shape,
            bias_axes=bias_axes if self.use_bias else None,
            kernel_initializer=self.kernel_initializer.__class__.from_config(
                self.kernel_initializer.get_config()
            ),
            bias_initializer=self.bias_initializer.__class__.from_config(
                self.bias_initializer.get_config()
            ),
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            activity_regularizer=self._activity_regularizer,
            kernel_constraint=self.kernel_constraint,
            bias_constraint=self.bias_constraint,
            dtype=self.dtype_policy,
            name=name,
        )

    def _head_projection(self, name, head_dim):
        return self._dense(
            "abc,cde->abde", (None, self.num_heads, head_dim), "de", name
        )

    def build(self, query_shape, value_shape=None, key_shape=None):
        value_shape = query_shape if value_shape is None else value_shape
        key_shape = value_shape if key_shape is None else key_shape
        check_input_shapes(query_shape, value_shape, key_shape)
        value_dim = self.value_dim or self.key_dim
        self._query_dense = self._head_projection("query", self.key_dim)
        self._query_dense.build(query_shape)
        self._key_dense = self._head_projection("key", self.key_dim)
        self._key_dense.build(key_shape)
        self._value_dense = self._head_projection("value", value_dim)
        self._value_dense.build(value_shape)
        output_shape = self.output_shape_ or (query_shape[-1],)
        equation, bias_axes = output_equation(len(output_shape))
        self._output_dense = self._dense(
            equation, (None,) + output_shape, bias_axes, "attention_output"
        )
        self._output_dense.build(
            (query_shape[0], query_shape[1], self.num_heads, value_dim)
        )
        if self.feature_map.requires_projection:
            self.projection = self.add_weight(
                name="projection",
                shape=(self.num_features, self.key_dim),
                initializer=self._initial_projection,
                trainable=False,
                dtype="float32",
                autocast=False,
            )
        self.redraw_count = self.add_weight(
            name="redraw_count",
            shape=(),
            initializer="zeros",
            trainable=False,
            dtype="int32",
        )
        if self.dropout > 0:
            self._dropout_seed = keras.random.SeedGenerator(self.seed)
        self.built = True

    def _initial_projection(self, shape, dtype=None):
        seed = self.seed if self.seed is not None else random.randrange(
            SEED_RANGE
        )
        return self.projection_distribution(shape, seed)

    def redraw_features(self, seed=None):
        """Draws a new random projection in place.

        Args:
            seed: int, or a `(2,)` int tensor of a stateless seed. The same
                seed always gives the same projection. If None, the layer's
                `seed` and its redraw count define the next projection (so
                redraws are reproducible), or, without a layer seed, a random
                one is drawn.

        Returns:
            The new projection, or None for a feature map without one.
        """
        if not self.built:
            raise ValueError(
                "redraw_features() needs a built layer: call the layer on "
                "data (or build the model) first."
            )
        if self.projection is None:
            return None
        if seed is None:
            if self.seed is None:
                seed = random.randrange(SEED_RANGE)
            else:
                seed = tf.random.experimental.stateless_fold_in(
                    tf.constant([self.seed, 0], tf.int64),
                    tf.cast(self.redraw_count.value + 1, tf.int64),
                )
        self.projection.assign(
            self.projection_distribution(self.projection.shape, seed)
        )
        self.redraw_count.assign_add(1)
        return self.projection

    def _feature_fns(self):
        """Map `(B, H, T, d)` float32 key and query heads to feature parts."""
        projection = None
        if self.projection is not None:
            projection = ops.convert_to_tensor(self.projection)
        return (
            lambda heads: self.feature_map.log_scaled(heads, projection),
            lambda heads: self.feature_map.query_log_scaled(heads, projection),
        )

    def _attend(self, query, key, value, mask, use_causal_mask, training):
        """Linear attention on `(B, T, H, d)` heads; returns `(B, T, H, dv)`."""
        query, key, value = (
            ops.transpose(ops.cast(x, "float32"), (0, 2, 1, 3))
            for x in (query, key, value)
        )
        if mask is not None:
            mask = mask[:, None, :]
        dropout_rate, dropout_seed = 0.0, None
        if training and self.dropout > 0:
            dropout_rate = self.dropout
            dropout_seed = self._dropout_seed.next()
        feature_fn, query_feature_fn = self._feature_fns()
        if use_causal_mask:
            outputs = favor_ops.causal_linear_attention(
                query,
                key,
                value,
                feature_fn,
                self.feature_map.feature_dim(self.num_features, self.key_dim),
                mask=mask,
                chunk_size=self.chunk_size,
                dropout_rate=dropout_rate,
                dropout_seed=dropout_seed,
                query_feature_fn=query_feature_fn,
                recompute_length=self.recompute_length,
            )
        else:
            outputs = favor_ops.bidirectional_linear_attention(
                query,
                key,
                value,
                feature_fn,
                mask=mask,
                dropout_rate=dropout_rate,
                dropout_seed=dropout_seed,
                query_feature_fn=query_feature_fn,
                recompute_length=self.recompute_length,
            )
        return ops.transpose(outputs, (0, 2, 1, 3))

    def call(
        self,
        query,
        value=None,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        use_causal_mask=False,
        training=None,
        mask=None,
    ):
        if value is None:
            # Self-attention with a single input, as inside keras.Sequential:
            # the query's padding mask is the keys' mask. Keras passes it as
            # `mask` when the call has one tensor argument, as `query_mask`
            # when it has several.
            value = query
            query_mask = mask if query_mask is None else query_mask
            value_mask = query_mask if value_mask is None else value_mask
        if key is None:
            key = value
        # The query's Keras mask reaches the output through `compute_mask`,
        # which Keras calls with the first argument's mask.
        mask = key_padding_mask(value_mask, key_mask, attention_mask)
        # The masks are handled here: the dense sub-layers get none (they
        # would warn that they do not support masking).
        query, value, key = (ops.copy(x) for x in (query, value, key))
        if use_causal_mask:
            check_causal_lengths(query, key)
        outputs = self._attend(
            self._query_dense(query),
            self._key_dense(key),
            self._value_dense(value),
            mask,
            use_causal_mask,
            training,
        )
        return self._output_dense(ops.cast(outputs, self.compute_dtype))

    def compute_output_shape(
        self, query_shape, value_shape=None, key_shape=None
    ):
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
                "feature_map": feature_maps_lib.serialize(self.feature_map),
                "num_features": self.num_features,
                "projection": projections_lib.serialize(
                    self.projection_distribution
                ),
                "seed": self.seed,
                "chunk_size": self.chunk_size,
                "recompute_length": self.recompute_length,
                "activity_regularizer": keras.regularizers.serialize(
                    self._activity_regularizer
                ),
            }
        )
        for kind, serialize in (
            ("initializer", keras.initializers.serialize),
            ("regularizer", keras.regularizers.serialize),
            ("constraint", keras.constraints.serialize),
        ):
            for name in (f"kernel_{kind}", f"bias_{kind}"):
                config[name] = serialize(getattr(self, name))
        return config
