"""`PerformerizedLayer`: a custom layer whose MultiHeadAttention sub-layers
are FavorAttention, in a form that saves and loads."""

import keras

from keras_favor.layers.favor_attention import FavorAttention


def held_attention(layer, prefix="", seen=None):
    """`{path: mha}` for every MultiHeadAttention that `layer` holds as an
    attribute, directly or through the layers it holds; a path is the
    dotted attribute names from `layer`."""
    seen = set() if seen is None else seen
    seen.add(id(layer))
    found = {}
    for name, value in list(vars(layer).items()):
        if (
            not isinstance(value, keras.layers.Layer)
            or isinstance(value, keras.Model)
            or id(value) in seen
        ):
            continue
        if isinstance(value, keras.layers.MultiHeadAttention):
            found[prefix + name] = value
        else:
            found.update(held_attention(value, f"{prefix}{name}.", seen))
    return found


def _owner(layer, path):
    *names, name = path.split(".")
    for step in names:
        layer = getattr(layer, step)
    return layer, name


def _replace_attribute(owner, name, new):
    """`owner.name = new` in place of the tracked layer there, so that
    `owner`'s weights are `new`'s, not the old layer's."""
    old = getattr(owner, name)
    # Keras has no public way to swap a built layer's sub-layer: its
    # tracker is told directly, and the check below catches a Keras whose
    # tracker works otherwise.
    tracker = getattr(owner, "_tracker", None)
    if tracker is not None:
        locked = tracker.locked
        tracker.untrack(old)
        tracker.unlock()
    setattr(owner, name, new)
    if tracker is not None and locked:
        tracker.lock()
    old_ids = {id(v) for v in old.weights}
    if any(id(v) in old_ids for v in owner.weights):
        raise RuntimeError(
            f"Could not replace the MultiHeadAttention `{name}` of layer "
            f"{owner.name!r}: the installed Keras still tracks it."
        )


def swap_attention(layer, attentions):
    """Replaces the MultiHeadAttention at each path of `attentions` (`{path:
    FavorAttention}`) inside the built `layer` by its FavorAttention."""
    for path, favor in attentions.items():
        owner, name = _owner(layer, path)
        _replace_attribute(owner, name, favor)


@keras.saving.register_keras_serializable(package="keras_favor")
class PerformerizedLayer(keras.layers.Layer):
    """A layer whose held MultiHeadAttention layers are FavorAttention.

    `keras_favor.convert.performerize` wraps a custom layer that holds its
    attention as an attribute (as keras-hub's Transformer layers do) in
    this layer: it calls the custom layer, in which each converted
    attention is a `FavorAttention`. The wrapper records which attributes
    were converted and their FavorAttention configurations, so a `.keras`
    file loads into the same layers: the custom layer is rebuilt from its
    own configuration, then its attention layers are swapped again before
    the weights load.

    Args:
        layer: the built custom layer, its attention layers already
            swapped (or, when loading, its serialized configuration).
        attentions: `{path: FavorAttention config}`, the dotted attribute
            paths from `layer` of the converted attention layers.
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
        self.layer.build_from_config(config["layer"])
        self._swap_attention()

    def _swap_attention(self):
        """New FavorAttention layers from the recorded configurations in
        place of the custom layer's MultiHeadAttention ones."""
        attentions = {}
        for path, favor_config in self.attentions.items():
            owner, name = _owner(self.layer, path)
            mha = getattr(owner, name)
            if isinstance(mha, FavorAttention):
                continue
            favor = FavorAttention.from_config(favor_config)
            shapes = mha.get_build_config()["shapes_dict"]
            favor.build(
                shapes["query_shape"], shapes["value_shape"],
                shapes.get("key_shape"),
            )
            attentions[path] = favor
        swap_attention(self.layer, attentions)
        self.built = True

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
                "attentions": self.attentions,
            }
        )
        return config
