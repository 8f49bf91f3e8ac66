"""`from_multi_head_attention`: a FavorAttention in place of a trained
`keras.layers.MultiHeadAttention`."""

import inspect

import keras

from keras_favor.layers.favor_attention import FavorAttention

# `MultiHeadAttention.get_config()` entries that FavorAttention takes as
# they are (the same meaning and default).
_SHARED = (
    "name",
    "trainable",
    "num_heads",
    "key_dim",
    "value_dim",
    "dropout",
    "use_bias",
    "output_shape",
    "attention_axes",
    "kernel_initializer",
    "bias_initializer",
    "kernel_regularizer",
    "bias_regularizer",
    "activity_regularizer",
    "kernel_constraint",
    "bias_constraint",
    "use_gate",
    "sliding_window",
    "seed",
)
# Entries that need no counterpart: the dtype policy is passed as the
# layer's own; flash attention is a kernel choice of exact attention.
_HANDLED = ("dtype", "flash_attention")


def _no_counterpart(name, value, default):
    return ValueError(
        f"The MultiHeadAttention option `{name}={value!r}` has no "
        "linear-time counterpart in FavorAttention (only its default, "
        f"{default!r}, converts)."
    )


def _favor_arguments(mha):
    """FavorAttention's arguments for `mha`'s configuration, or a
    `ValueError` naming an option that does not convert."""
    config = mha.get_config()
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(
            keras.layers.MultiHeadAttention.__init__
        ).parameters.items()
    }
    if config.get("use_gate"):
        raise _no_counterpart("use_gate", True, False)
    if config.get("sliding_window") is not None:
        raise _no_counterpart("sliding_window", config["sliding_window"], None)
    if config.get("attention_axes") is not None:
        rank = len(mha.get_build_config()["shapes_dict"]["query_shape"])
        if sorted(config["attention_axes"]) != list(range(1, rank - 1)):
            raise _no_counterpart(
                "attention_axes", config["attention_axes"], None
            )
    arguments = {}
    for name, value in config.items():
        if name in _SHARED:
            arguments[name] = value
        elif name not in _HANDLED and value != defaults.get(name, value):
            raise _no_counterpart(name, value, defaults.get(name))
        elif name not in _HANDLED and name not in defaults:
            raise ValueError(
                f"The MultiHeadAttention option `{name}` is unknown to "
                "keras_favor's converter; it cannot tell whether "
                "FavorAttention computes the same with it."
            )
    if arguments.get("seed") is None:
        arguments.pop("seed", None)
    return arguments


def from_multi_head_attention(mha, **favor_kwargs):
    """A FavorAttention with `mha`'s configuration and weights.

    The heads, key and value sizes, biases, output shape, initializers,
    regularizers, constraints, dropout, dtype policy and name are `mha`'s;
    the query, key, value and output weights are copied exactly (a built
    `mha` gives a built layer). What FavorAttention adds, such as
    `feature_map`, `num_features`, `local_window` or `seed`, comes from
    `favor_kwargs`. Right after conversion the outputs are FAVOR+'s
    estimate of `mha`'s, not equal to them: finetune the model (README,
    "Convert a trained model").

    Args:
        mha: a `keras.layers.MultiHeadAttention`.
        **favor_kwargs: further `FavorAttention` arguments, which take
            precedence over `mha`'s.

    Returns:
        A `FavorAttention`.

    Raises:
        ValueError: for an `mha` option that has no linear-time form
            (`use_gate=True`, a `sliding_window`, `attention_axes` naming
            only some position axes, or an option of the installed Keras
            with a value other than its default), naming the option.

    Example:

    ```python
    favor = keras_favor.convert.from_multi_head_attention(
        mha, num_features=128, seed=0
    )
    ```
    """
    if not isinstance(mha, keras.layers.MultiHeadAttention):
        raise ValueError(
            "`mha` must be a keras.layers.MultiHeadAttention. Received: "
            f"mha={mha!r}"
        )
    arguments = _favor_arguments(mha)
    arguments["dtype"] = mha.dtype_policy
    arguments.update(favor_kwargs)
    favor = FavorAttention(**arguments)
    if mha.built:
        shapes = mha.get_build_config()["shapes_dict"]
        favor.build(
            shapes["query_shape"],
            shapes["value_shape"],
            shapes.get("key_shape"),
        )
        favor.load_multi_head_attention_weights(mha)
    return favor
