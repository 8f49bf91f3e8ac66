"""`FavorAttention`'s four dense sub-layers: their arguments, building them,
copying `MultiHeadAttention` weights, LoRA, quantization, the dtype
policies that save them, and the public members that expose them
(`MultiHeadAttentionWeights`)."""

import re

import keras

from keras_favor.initializers import clone_initializer
from keras_favor.layers import multi_head_layout as layout
from keras_favor.validation import optional_positive_number
from keras_favor.validation import positive_int

DENSE_NAMES = ("query_dense", "key_dense", "value_dense", "output_dense")


def dense_layers(layer):
    return [getattr(layer, name) for name in DENSE_NAMES]


def set_sublayer_arguments(
    layer,
    kernel_initializer,
    bias_initializer,
    kernel_regularizer,
    bias_regularizer,
    activity_regularizer,
    kernel_constraint,
    bias_constraint,
):
    """Sets `MultiHeadAttention`'s arguments of the dense sub-layers on
    `layer`, each as Keras gets it from a name or config."""
    layer.kernel_initializer = keras.initializers.get(kernel_initializer)
    layer.bias_initializer = keras.initializers.get(bias_initializer)
    layer.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
    layer.bias_regularizer = keras.regularizers.get(bias_regularizer)
    # As in MultiHeadAttention, the activity regularizer applies to the
    # four dense sub-layers; `layer.activity_regularizer` would make the
    # base Layer apply it to the output a second time.
    layer._activity_regularizer = keras.regularizers.get(activity_regularizer)
    layer.kernel_constraint = keras.constraints.get(kernel_constraint)
    layer.bias_constraint = keras.constraints.get(bias_constraint)


def einsum_dense(layer, equation, output_shape, bias_axes, name):
    """A dense sub-layer of `layer` as `MultiHeadAttention` makes them: a
    fresh copy of each initializer, the layer's dtype policy."""
    return keras.layers.EinsumDense(
        equation,
        output_shape=output_shape,
        bias_axes=bias_axes if layer.use_bias else None,
        kernel_initializer=clone_initializer(layer.kernel_initializer),
        bias_initializer=clone_initializer(layer.bias_initializer),
        kernel_regularizer=layer.kernel_regularizer,
        bias_regularizer=layer.bias_regularizer,
        activity_regularizer=layer._activity_regularizer,
        kernel_constraint=layer.kernel_constraint,
        bias_constraint=layer.bias_constraint,
        dtype=sublayer_policy(layer, name),
        name=name,
    )


def sublayer_policy(layer, name):
    """The dtype policy of the sub-layer `name`: the layer's, or, when a
    `DTypePolicyMap` (see `sublayer_dtype_policy`), the one it maps the
    sub-layer's path to. The sub-layer gets a plain policy, which Keras's
    quantized layers need to save themselves."""
    policy = layer.dtype_policy
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        return policy[f"{layer.path}/{name}"]
    return policy


def build_dense_layers(layer, query_shape, value_shape, key_shape):
    """Builds `layer`'s query, key, value and output sub-layers, assigned in
    `MultiHeadAttention`'s order, which `layer.weights` follows."""
    value_dim = layer.value_dim or layer.key_dim
    dense = []
    for name, shape, head_dim in (
        ("query", query_shape, layer.key_dim),
        ("key", key_shape, layer.key_dim),
        ("value", value_shape, value_dim),
    ):
        projection = layout.head_projection(
            len(shape), layer.num_heads, head_dim
        )
        dense.append(einsum_dense(layer, *projection, name))
        dense[-1].build(shape)
    output_shape = layer.output_shape_ or (query_shape[-1],)
    projection = layout.output_projection(len(query_shape), output_shape)
    dense.append(einsum_dense(layer, *projection, "attention_output"))
    heads_shape = dense[0].compute_output_shape(query_shape)
    dense[-1].build(tuple(heads_shape[:-1]) + (value_dim,))
    (
        layer._query_dense,
        layer._key_dense,
        layer._value_dense,
        layer._output_dense,
    ) = dense


def check_built(layer, action):
    if not layer.built:
        raise ValueError(
            f"{action} needs a built layer: call the layer on data (or build "
            "the model) first."
        )


def assign_dense_weights(layer, weights, source):
    """Assigns `weights`, listed as `MultiHeadAttention.get_weights()` lists
    them (query kernel and bias, key, value, output), to the dense
    sub-layers; `source` names them in errors."""
    variables = [w for dense in dense_layers(layer) for w in dense.weights]
    if len(weights) != len(variables):
        raise ValueError(
            f"{source} holds {len(weights)} weights, but FavorAttention "
            f"'{layer.name}' takes either all its {len(layer.weights)} "
            f"weights or the {len(variables)} of its dense sub-layers, "
            "listed as MultiHeadAttention lists them: "
            f"{[v.path for v in variables]}. Configure both layers alike "
            "(num_heads, key_dim, value_dim, use_bias, output_shape)."
        )
    for variable, value in zip(variables, weights):
        if tuple(variable.shape) != tuple(value.shape):
            raise ValueError(
                f"Weight {variable.path} has shape {tuple(variable.shape)}, "
                f"but {source} gives it shape {tuple(value.shape)}. Configure "
                "both layers alike (num_heads, key_dim, value_dim, use_bias, "
                "output_shape)."
            )
    for variable, value in zip(variables, weights):
        variable.assign(value)


def copy_multi_head_attention(layer, mha):
    """Copies the weights of a built `keras.layers.MultiHeadAttention`."""
    if not isinstance(mha, keras.layers.MultiHeadAttention):
        raise ValueError(
            "`mha` must be a keras.layers.MultiHeadAttention. Received: "
            f"mha={mha!r}"
        )
    check_built(layer, "load_multi_head_attention_weights()")
    if not mha.built:
        raise ValueError("`mha` must be built: call it on data first.")
    if getattr(mha, "_use_gate", False):
        raise ValueError(
            "`mha` uses `use_gate=True`, which FavorAttention does not "
            "support: its gate weights have no place here."
        )
    weights = [w for dense in dense_layers(mha) for w in dense.get_weights()]
    assign_dense_weights(layer, weights, f"MultiHeadAttention '{mha.name}'")


def enable_lora(layer, rank, lora_alpha, a_initializer, b_initializer):
    """LoRA of rank `rank` on the four dense sub-layers. Only the low-rank
    factors train: the kernels and the biases are frozen."""
    for dense in dense_layers(layer):
        dense.enable_lora(
            rank,
            lora_alpha=lora_alpha,
            a_initializer=a_initializer,
            b_initializer=b_initializer,
        )
        if dense.bias is not None:
            dense.bias.trainable = False


def quantize(layer, mode, type_check, config):
    """Quantizes the four dense sub-layers (the attention itself stays in
    float32, like the projection)."""
    for dense in dense_layers(layer):
        dense.quantize(mode, type_check=type_check, config=config)


def sublayer_dtype_policy(layer):
    """The layer's dtype policy for `get_config`: a `DTypePolicyMap` that
    also holds the policy of each quantized dense sub-layer (so that a
    loaded layer builds them quantized), or None if none is quantized."""
    if not layer.built:
        return None
    quantized = [
        dense
        for dense in dense_layers(layer)
        if dense.quantization_mode is not None
    ]
    if not quantized:
        return None
    default = layer.dtype_policy
    if isinstance(default, keras.dtype_policies.DTypePolicyMap):
        default = default.default_policy
    policies = keras.dtype_policies.DTypePolicyMap(default_policy=default)
    for dense in quantized:
        # Matches the sub-layer's path wherever the layer is nested.
        pattern = f"(?:.*/)?{re.escape(layer.name)}/{re.escape(dense.name)}"
        policies[pattern] = dense.dtype_policy
    return keras.dtype_policies.serialize(policies)


def sublayer_config(layer):
    """The config entries of the dense sub-layers' options: initializers,
    regularizers, constraints, and `dtype` when some are quantized."""
    config = {
        "activity_regularizer": keras.regularizers.serialize(
            layer._activity_regularizer
        )
    }
    for kind, serialize in (
        ("initializer", keras.initializers.serialize),
        ("regularizer", keras.regularizers.serialize),
        ("constraint", keras.constraints.serialize),
    ):
        for name in (f"kernel_{kind}", f"bias_{kind}"):
            config[name] = serialize(getattr(layer, name))
    dtype = sublayer_dtype_policy(layer)
    if dtype is not None:
        config["dtype"] = dtype
    return config


class MultiHeadAttentionWeights:
    """`MultiHeadAttention`'s four dense sub-layers as an attention layer's
    public members: read-only properties, weights loaded from a
    `MultiHeadAttention`, LoRA and quantization. The layer creates the
    sub-layers in `build` (`build_dense_layers`)."""

    query_dense = property(lambda self: self._query_dense)
    key_dense = property(lambda self: self._key_dense)
    value_dense = property(lambda self: self._value_dense)
    output_dense = property(lambda self: self._output_dense)

    def load_multi_head_attention_weights(self, mha):
        """Copies the dense weights of a built `MultiHeadAttention` of the
        same configuration; the projection and redraw count stay."""
        copy_multi_head_attention(self, mha)

    def set_weights(self, weights):
        """Sets `get_weights()`'s list, or the dense weights alone as
        `MultiHeadAttention.get_weights()` lists them."""
        if self.built and len(weights) != len(self.weights):
            assign_dense_weights(self, weights, "`weights`")
        else:
            super().set_weights(weights)

    def enable_lora(
        self,
        rank,
        lora_alpha=None,
        a_initializer="he_uniform",
        b_initializer="zeros",
    ):
        """LoRA finetuning: low-rank updates of the four dense kernels, the
        only weights that then train (kernels and biases freeze)."""
        check_built(self, "enable_lora()")
        rank = positive_int(rank, "rank")
        lora_alpha = optional_positive_number(lora_alpha, "lora_alpha")
        enable_lora(self, rank, lora_alpha, a_initializer, b_initializer)
        self.lora_rank, self.lora_alpha = rank, lora_alpha

    def quantize(self, mode=None, type_check=True, config=None):
        """Quantizes the four dense sub-layers (e.g. `mode="int8"`); the
        attention itself stays float32."""
        quantize(self, mode, type_check, config)
