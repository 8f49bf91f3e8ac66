"""`PerformerizedLayer`: a custom layer whose MultiHeadAttention sub-layers
are FavorAttention, in a form that saves and loads."""

import keras

from keras_favor.convert.attention_paths import layer_at
from keras_favor.convert.attention_paths import swap_attention
from keras_favor.layers.favor_attention import FavorAttention


def build_like(layer, build_config):
    """Builds `layer` from `build_config`, as `Layer.build_from_config`
    does, and marks it built: a model whose `build` is Keras's default is
    built by running its `call`, which leaves it unmarked (and would
    record no input shape when built again)."""
    layer.build_from_config(build_config)
    if not layer.built and build_config and "input_shape" in build_config:
        layer.build(build_config["input_shape"])


@keras.saving.register_keras_serializable(package="keras_favor")
class PerformerizedLayer(keras.layers.Layer):
    """A layer whose held MultiHeadAttention layers are FavorAttention.

    `keras_favor.convert.performerize` wraps a custom layer or subclassed
    model that holds its attention as an attribute (as keras-hub's
    Transformer layers do), or in a list, tuple or dict attribute, in this
    layer: it calls the custom layer, in which each converted attention is
    a `FavorAttention`. The wrapper saves the paths of the converted
    attention layers and their FavorAttention configurations as they are
    when saved (so with LoRA enabled or quantization done after the
    conversion), so a `.keras` file loads into the same layers: the custom
    layer is rebuilt from its own configuration, then its attention layers
    are swapped again before the weights load.

    Args:
        layer: the built custom layer, its attention layers already
            swapped (or, when loading, its serialized configuration).
        attentions: `{path: FavorAttention config}`, the paths from `layer`
            of the converted attention layers: attribute names, list and
            tuple indices and dict keys, joined by dots.
        **kwargs: base layer keyword arguments, such as `name`.

    Call arguments:
        As `layer`'s: every argument is passed to it.

    Returns:
        `layer`'s outputs.

    Masking: the Keras mask of an input reaches `layer` as it would without
    the wrapper (tested: padding invariance of a wrapped masked layer), and
    `layer`'s `compute_mask` gives the output's.

    Example:

    ```python
    performer = keras_favor.convert.performerize(model)  # wraps as needed
    performer.save("performer.keras")
    keras.saving.load_model("performer.keras")
    ```

    References:
        - [Choromanski et al., 2021](https://arxiv.org/abs/2009.14794)
    """

    def __init__(self, layer, attentions, **kwargs):
        super().__init__(**kwargs)
        if isinstance(layer, dict):
            layer = keras.saving.deserialize_keras_object(layer)
        self.layer = layer
        self.attentions = {
            path: dict(config) for path, config in attentions.items()
        }
        self.supports_masking = getattr(layer, "supports_masking", False)
        if layer.built:
            # Also a layer deserialized with its build configuration.
            self._swap_attention()

    def build(self, input_shape):
        """Builds the custom layer for an input of `input_shape` (its first
        argument's), then swaps its attention layers."""
        if not self.layer.built:
            self.layer.build(input_shape)
        self._swap_attention()

    def build_from_config(self, config):
        """Builds the custom layer as it was built, then swaps its
        attention layers for FavorAttention ones to load weights into."""
        build_like(self.layer, config["layer"])
        self._swap_attention()

    def _swap_attention(self):
        """New FavorAttention layers from the recorded configurations in
        place of the custom layer's MultiHeadAttention ones (one for an
        attention layer held at several paths)."""
        attentions, by_id = {}, {}
        for path, favor_config in self.attentions.items():
            mha = layer_at(self.layer, path)
            if isinstance(mha, FavorAttention):
                continue
            if id(mha) not in by_id:
                favor = FavorAttention.from_config(favor_config)
                shapes = mha.get_build_config()["shapes_dict"]
                favor.build(
                    shapes["query_shape"],
                    shapes["value_shape"],
                    shapes.get("key_shape"),
                )
                by_id[id(mha)] = favor
            attentions[path] = by_id[id(mha)]
        swap_attention(self.layer, attentions)
        self.built = True

    def _attention_configs(self):
        """`{path: config}` of the attention layers as they are now, so that
        LoRA enabled or quantization done after the conversion saves."""
        configs = {}
        for path, recorded in self.attentions.items():
            favor = layer_at(self.layer, path) if self.built else None
            configs[path] = (
                favor.get_config()
                if isinstance(favor, FavorAttention)
                else dict(recorded)
            )
        return configs

    def get_build_config(self):
        return {"layer": self.layer.get_build_config()}

    def call(self, *args, **kwargs):
        return self.layer(*args, **kwargs)

    def compute_mask(self, *args, **kwargs):
        return self.layer.compute_mask(*args, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "layer": keras.saving.serialize_keras_object(self.layer),
                "attentions": self._attention_configs(),
            }
        )
        return config
