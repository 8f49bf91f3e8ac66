"""`PerformerizedLayer`: a custom layer whose MultiHeadAttention sub-layers
are FavorAttention, in a form that saves and loads."""

import keras

from keras_favor.convert.attention_paths import layer_at
from keras_favor.convert.attention_paths import swap_attention
from keras_favor.layers.favor_attention import FavorAttention

# The sizes given to unknown axes to infer the output shapes (at least 2,
# as Keras's JAX backend assumes, so that no axis looks broadcastable).
_TRACED_SIZES = (2, 3)


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

    Output shapes: a symbolic call (building a functional model on
    `keras.Input((None, dim))`) traces `layer` with each unknown axis set to
    a fixed size, then to another: an output axis that changes with them is
    unknown (`None`). So the wrapper builds into functional models on every
    backend, also where FavorAttention cannot trace an unknown length (JAX).

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

    def compute_output_spec(self, *args, **kwargs):
        """The outputs' shapes and dtypes: `call` traced twice, with the
        unknown axes of the inputs at two fixed sizes; an output axis that
        differs between the two is unknown."""
        specs = []
        for size in _TRACED_SIZES:
            sized_args, sized_kwargs = keras.tree.map_structure(
                lambda x, size=size: _with_known_axes(x, size), (args, kwargs)
            )
            specs.append(
                super().compute_output_spec(*sized_args, **sized_kwargs)
            )
        return keras.tree.map_structure(_unknown_where_different, *specs)

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


def _with_known_axes(x, size):
    """`x`, a symbolic tensor, with `size` for each unknown axis (other
    values are returned as they are)."""
    if not isinstance(x, keras.KerasTensor):
        return x
    shape = tuple(size if axis is None else axis for axis in x.shape)
    return keras.KerasTensor(
        shape, dtype=x.dtype, sparse=x.sparse, ragged=x.ragged
    )


def _unknown_where_different(first, second):
    """`first`, a symbolic tensor, with `None` for each axis on which it
    differs from `second` (the same output traced at other input sizes)."""
    if not isinstance(first, keras.KerasTensor):
        return first
    shape = tuple(
        a if a == b else None
        for a, b in zip(first.shape, second.shape, strict=True)
    )
    return keras.KerasTensor(
        shape, dtype=first.dtype, sparse=first.sparse, ragged=first.ragged
    )
