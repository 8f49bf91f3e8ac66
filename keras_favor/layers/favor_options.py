"""The FAVOR options of `FavorAttention`: their names, checks and config.

Beside `MultiHeadAttention`'s own arguments, these choose the FAVOR+
mechanism. `PerformerBlock` and `build_performer` pass them through to the
layer (as `attention_options`), and a block's config records them as
`options_config` serializes them.
"""

from keras_favor import feature_maps as feature_maps_lib
from keras_favor import projections as projections_lib
from keras_favor.validation import non_negative_int
from keras_favor.validation import optional_positive_number
from keras_favor.validation import optional_seed
from keras_favor.validation import positive_int

OPTIONS = (
    "feature_map",
    "num_features",
    "projection",
    "seed",
    "chunk_size",
    "recompute_length",
    "local_window",
    "lora_rank",
    "lora_alpha",
)


def set_options(
    layer,
    feature_map,
    num_features,
    projection,
    seed,
    chunk_size,
    recompute_length,
    local_window,
    lora_rank,
    lora_alpha,
):
    """Checks the options (see `FavorAttention`) and sets them on `layer`;
    a bad value raises a `ValueError` that names it."""
    layer.feature_map = feature_maps_lib.get(feature_map)
    layer.num_features = positive_int(num_features, "num_features")
    layer.projection_distribution = projections_lib.get(projection)
    layer.seed = optional_seed(seed)
    layer.chunk_size = positive_int(chunk_size, "chunk_size")
    layer.recompute_length = positive_int(recompute_length, "recompute_length")
    layer.local_window = non_negative_int(local_window, "local_window")
    if layer.local_window and not layer.feature_map.estimates_softmax:
        raise ValueError(
            "`local_window` needs a feature map that estimates the "
            "softmax kernel (softmax, softmax_hyperbolic, softmax_trig), "
            "whose estimate can share a normalizer with the exact "
            f"kernel. Received: feature_map={layer.feature_map!r}"
        )
    layer.lora_rank = positive_int(lora_rank, "lora_rank", allow_none=True)
    layer.lora_alpha = optional_positive_number(lora_alpha, "lora_alpha")


def options_config(layer):
    """`layer`'s options, serialized as its `get_config` holds them."""
    return {
        "feature_map": feature_maps_lib.serialize(layer.feature_map),
        "num_features": layer.num_features,
        "projection": projections_lib.serialize(layer.projection_distribution),
        "seed": layer.seed,
        "chunk_size": layer.chunk_size,
        "recompute_length": layer.recompute_length,
        "local_window": layer.local_window,
        "lora_rank": layer.lora_rank,
        "lora_alpha": layer.lora_alpha,
    }


def checked_options(options):
    """`options`, a mapping of `OPTIONS` names, checked by `FavorAttention`
    itself and completed with its defaults, serialized as `options_config`
    gives them (an unknown name or a bad value raises a `ValueError` that
    names it)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(
            f"Unknown FavorAttention options {unknown}: the options are "
            f"{list(OPTIONS)}."
        )
    # A named layer: an automatic name would count as one of the
    # `favor_attention_<n>` names of the user's layers.
    from keras_favor.layers.favor_attention import FavorAttention

    layer = FavorAttention(1, 1, name="attention_options", **options)
    return layer.options_config()


def gathered_options(attention_options, kwargs):
    """`attention_options` with the FAVOR options given as keyword
    arguments (as configs saved before `attention_options` have them),
    which are taken out of `kwargs`."""
    options = dict(attention_options or {})
    for name in OPTIONS:
        if name in kwargs:
            if name in options:
                raise ValueError(
                    f"`{name}` was given twice: as a keyword argument and "
                    "in `attention_options`."
                )
            options[name] = kwargs.pop(name)
    return options
