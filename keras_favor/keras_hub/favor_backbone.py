"""`FavorBackbone`: a keras-hub backbone whose MultiHeadAttention-based
Transformer layers compute FAVOR+ attention."""

import keras
import keras_hub

from keras_favor.convert.attention_paths import all_layers
from keras_favor.keras_hub import favor_rotary_decoder
from keras_favor.keras_hub import favor_transformer_decoder
from keras_favor.keras_hub.attention_swap import check_dense_weights
from keras_favor.keras_hub.attention_swap import convert_held_attention
from keras_favor.layers.favor_attention import FavorAttention
from keras_favor.layers.favor_options import checked_options

_ENCODER = keras_hub.layers.TransformerEncoder
_DECODER = keras_hub.layers.TransformerDecoder


class FavorBackbone:
    """The converted form of a keras-hub backbone class: mixed in before
    it (`favor_backbone_class`), it converts the backbone's Transformer
    layers when the backbone is made (so also when a `.keras` file loads)
    and records `favor_options` in its config.

    Converted: every `keras_hub.layers.TransformerEncoder` (its attention
    becomes `FavorAttention`) and `TransformerDecoder` (it becomes a
    `FavorTransformerDecoder`), and Llama's, Qwen's and Gemma's decoders
    (their attention becomes `FavorRotaryAttention`). Any other layer
    holding attention raises a `ValueError` naming its class, as does an
    attention layer whose weights are not `MultiHeadAttention`'s
    (Whisper's key projection has no bias).

    Args:
        favor_options: dict of `FavorAttention` options for every converted
            attention layer.
        **kwargs: the backbone class's arguments.
    """

    def __init__(self, *args, favor_options=None, **kwargs):
        super().__init__(*args, **kwargs)
        convert_backbone_layers(self, favor_options or {})

    @property
    def favor_options(self):
        return dict(self._favor_options)

    def get_config(self):
        config = super().get_config()
        config["favor_options"] = self.favor_options
        return config


_CLASSES = {}


def favor_backbone_class(backbone_class):
    """The registered `FavorBackbone` subclass of `backbone_class` (a
    keras-hub `Backbone` class), `Favor<ClassName>`, made once."""
    if issubclass(backbone_class, FavorBackbone):
        return backbone_class
    if backbone_class not in _CLASSES:
        name = "Favor" + backbone_class.__name__
        new_class = type(
            name,
            (FavorBackbone, backbone_class),
            {"__module__": __name__, "__qualname__": name},
        )
        _CLASSES[backbone_class] = keras.saving.register_keras_serializable(
            package="keras_favor"
        )(new_class)
    return _CLASSES[backbone_class]


def register_backbone_classes():
    """Registers the converted class of every backbone that keras-hub
    exports, so a converted model's `.keras` file loads once this package
    is imported."""
    for value in vars(keras_hub.models).values():
        if (
            isinstance(value, type)
            and issubclass(value, keras_hub.models.Backbone)
            and value is not keras_hub.models.Backbone
        ):
            favor_backbone_class(value)


def _unconvertible_layers(layers):
    """The layers among `layers` whose attention this conversion does not
    handle: attention layers of other classes, subclasses of keras-hub's
    encoder and decoder (whose own `call` a conversion would not keep) and
    MultiHeadAttention layers that no keras-hub encoder or decoder holds."""
    handled = {
        id(getattr(layer, attribute))
        for layer in layers
        if type(layer) in (_ENCODER, _DECODER)
        for attribute in ("_self_attention_layer", "_cross_attention_layer")
        if getattr(layer, attribute, None) is not None
    }
    handled.update(
        id(favor_rotary_decoder.held_attention(layer))
        for layer in layers
        if favor_rotary_decoder.is_rotary_decoder(layer)
    )
    found = []
    for layer in layers:
        if isinstance(layer, keras.layers.MultiHeadAttention):
            if id(layer) not in handled:
                found.append(layer)
        elif isinstance(layer, (_ENCODER, _DECODER)):
            if type(layer) not in (_ENCODER, _DECODER):
                found.append(layer)
        elif "attention" in type(layer).__name__.lower() and (
            id(layer) not in handled
        ):
            found.append(layer)
    return found


def convert_backbone_layers(backbone, favor_options):
    """Converts, inside the built `backbone`, every keras-hub
    TransformerEncoder and TransformerDecoder; a `ValueError` naming any
    other attention-holding layer (before anything changes)."""
    options = checked_options(dict(favor_options))
    layers = [layer for _, layer in all_layers(backbone)]
    for layer in layers:
        for attribute in ("_self_attention_layer", "_cross_attention_layer"):
            mha = getattr(layer, attribute, None)
            if isinstance(mha, keras.layers.MultiHeadAttention):
                check_dense_weights(mha)
        if favor_rotary_decoder.is_rotary_decoder(layer):
            favor_rotary_decoder.check_convertible(layer)
    others = _unconvertible_layers(layers)
    if others:
        raise ValueError(
            f"The {type(backbone).__name__} has attention that does not "
            "convert to FAVOR+: "
            + ", ".join(
                f"{layer.name!r} ({type(layer).__name__})" for layer in others
            )
            + ". keras_favor converts keras-hub's TransformerEncoder and "
            "TransformerDecoder, whose attention is MultiHeadAttention, "
            "and the decoders of Llama, Qwen and Gemma."
        )
    converted = 0
    for layer in layers:
        if type(layer) is _DECODER:
            favor_transformer_decoder.convert_in_place(layer, options)
            converted += 1
        elif type(layer) is _ENCODER:
            converted += convert_held_attention(layer, options)
        elif favor_rotary_decoder.is_rotary_decoder(layer):
            favor_rotary_decoder.convert_in_place(layer, options)
            converted += 1
    if not converted and not any(
        isinstance(layer, FavorAttention) for layer in layers
    ):
        raise ValueError(
            f"The {type(backbone).__name__} has no keras-hub "
            "TransformerEncoder or TransformerDecoder to convert."
        )
    backbone._favor_options = options


def convert_backbone(backbone, favor_options):
    """A converted copy of the keras-hub `backbone`: the same class's
    `FavorBackbone` subclass, every weight copied (attention weights into
    FavorAttention); `backbone` is left as it was."""
    new = type(backbone).from_config(backbone.get_config())
    new.set_weights(backbone.get_weights())
    convert_backbone_layers(new, favor_options)
    # Only methods and `favor_options` are added: the layers stay.
    new.__class__ = favor_backbone_class(type(backbone))
    return new
