"""`performerize`: a copy of a model with FavorAttention in place of its
`keras.layers.MultiHeadAttention` layers."""

import sys

import keras

from keras_favor.convert.attention_paths import all_layers
from keras_favor.convert.attention_paths import held_attention
from keras_favor.convert.attention_paths import is_graph_model
from keras_favor.convert.attention_paths import layer_at
from keras_favor.convert.attention_paths import swap_attention
from keras_favor.convert.from_multi_head_attention import (
    from_multi_head_attention,
)
from keras_favor.convert.performerized_layer import PerformerizedLayer
from keras_favor.convert.performerized_layer import build_like
from keras_favor.layers import favor_options
from keras_favor.layers.performer_block import PerformerBlock

# PerformerBlock's sub-layers with weights, besides its attention.
_BLOCK_SUBLAYERS = (
    "attention_norm",
    "intermediate_dense",
    "output_dense",
    "feedforward_norm",
)


def performerize(model, predicate=None, **favor_kwargs):
    """A new model with FavorAttention in place of MultiHeadAttention.

    Every `keras.layers.MultiHeadAttention` of `model` for which `predicate`
    is true becomes `from_multi_head_attention(mha, **favor_kwargs)` (its
    weights copied), wherever it is: a layer of a functional or sequential
    model, of a nested model (subclassed ones too), or a layer held by a
    custom layer as an attribute (as keras-hub's `TransformerEncoder` holds
    its attention) or in a list, tuple or dict attribute. A
    `PerformerBlock(attention="exact")` becomes the same block with
    `attention="favor"`, so a converted `build_performer` language model
    still decodes with a cache (`keras_favor.generate`). Every other weight
    equals the original's. The new model calls the attention
    layers with the same arguments, so `use_causal_mask=True` stays causal;
    a general `(B, T, S)` attention mask has no linear-time form and raises
    when the model is called. A keras-hub backbone or task, and a
    keras-hub `TransformerDecoder`, convert through `keras_favor.keras_hub`
    (keeping their keras-hub classes; see docs/keras_hub.md). `model` is
    left as it was.

    Args:
        model: a functional or sequential `keras.Model`, built.
        predicate: None (convert all) or a function of a
            MultiHeadAttention returning whether to convert it.
        **favor_kwargs: `FavorAttention` arguments for every converted
            layer, such as `num_features`, `feature_map` or `seed`.

    Returns:
        The new `keras.Model`, uncompiled.

    Raises:
        ValueError: if `model` has no MultiHeadAttention that `predicate`
            accepts (naming the attention layers it has), if one of them
            is held where it cannot be swapped (naming its path), or if a
            layer cannot be copied or converted (naming the layer).

    Example:

    ```python
    performer = keras_favor.convert.performerize(model, num_features=128)
    performer.compile("adam", loss)
    performer.fit(data)  # recover from the swap (README)
    ```
    """
    _check_model(model)
    if _is_keras_hub(model):
        return _keras_hub_conversion().convert_model(
            model, predicate, favor_kwargs
        )
    selected = _selected_attention(model, predicate or (lambda mha: True))
    # `predicate` is asked once per layer, here.
    accepted = {id(mha) for _, mha in selected}
    clones, converted_ids = [], set()

    def converted(mha):
        converted_ids.add(id(mha))
        return from_multi_head_attention(mha, **favor_kwargs)

    def clone(layer):
        if not isinstance(layer, keras.layers.Layer):
            return layer  # a stateless operation, such as `x + y`
        if isinstance(layer, keras.layers.MultiHeadAttention):
            return converted(layer) if id(layer) in accepted else _copy(layer)
        if (
            _is_exact_block(layer, favor_kwargs)
            and id(layer.attention_layer) in accepted
        ):
            return _favor_block(layer, converted(layer.attention_layer))
        held = {
            path: mha
            for path, mha in held_attention(layer).items()
            if id(mha) in accepted
        }
        if held and _is_keras_hub(layer):
            # keras-hub's decoder passes causality as a dense mask: it
            # converts as a whole, into a decoder that asks for causality.
            converted_ids.update(id(mha) for mha in held.values())
            return _keras_hub_conversion().converted_decoder(
                layer, favor_kwargs
            )
        if not held:
            new = layer.__class__.from_config(layer.get_config())
            clones.append((layer, new))
            return new
        return _holder_with_favor_attention(layer, held, converted)

    def clone_naming_the_layer(layer):
        try:
            return clone(layer)
        except _LayerError:
            raise
        except (ValueError, TypeError, NotImplementedError) as error:
            raise _LayerError(
                f"`performerize` could not copy or convert layer "
                f"{getattr(layer, 'name', layer)!r} "
                f"({type(layer).__name__}): {error}"
            ) from error

    try:
        new_model = keras.models.clone_model(
            model, clone_function=clone_naming_the_layer, recursive=True
        )
    except _LayerError as error:
        raise ValueError(str(error)) from error.__cause__
    except ValueError as error:
        raise ValueError(
            f"`performerize` copied and converted the layers of model "
            f"{model.name!r}, but rebuilding its graph from them failed: "
            f"{error}"
        ) from error
    _check_all_converted(selected, converted_ids)
    for old, new in clones:
        if old.weights:
            new.set_weights(old.get_weights())
    return new_model


class _LayerError(ValueError):
    """A layer of the model failed to copy or convert (the message names
    it)."""


def _holder_with_favor_attention(layer, held, converted):
    """A custom layer or subclassed model holding attention: a copy with its
    weights, the attention at each path of `held` swapped for
    `converted(mha)` (a layer shared by several paths converts once), in a
    wrapper that saves it."""
    inner = _copy(layer)
    favors = {}
    for mha in held.values():
        if id(mha) not in favors:
            favors[id(mha)] = converted(mha)
    attentions = {path: favors[id(mha)] for path, mha in held.items()}
    swap_attention(inner, _held_by_the_copy(inner, attentions))
    _check_swapped(layer, inner, len(favors))
    return PerformerizedLayer(
        inner,
        {path: favor.get_config() for path, favor in attentions.items()},
        name=layer.name,
    )


def _held_by_the_copy(inner, attentions):
    """`attentions` (`{path: FavorAttention}`, paths in the original
    layer), or a `ValueError` unless `inner`, the copy of the layer, holds
    a MultiHeadAttention at each path too."""
    for path in attentions:
        try:
            mha = layer_at(inner, path)
        except (AttributeError, LookupError, ValueError):
            mha = None
        if not isinstance(mha, keras.layers.MultiHeadAttention):
            raise ValueError(
                f"The copy of the layer, rebuilt from its configuration, "
                f"holds no MultiHeadAttention at `{path}`."
            )
    return attentions


def _check_swapped(layer, inner, converted_count):
    """A `ValueError` unless `inner`, the converted copy of `layer`, holds
    `converted_count` MultiHeadAttention layers fewer than `layer` (else
    the swap missed a reference to one of them)."""

    def attentions(root):
        return [
            (path, found)
            for path, found in all_layers(root)
            if isinstance(found, keras.layers.MultiHeadAttention)
        ]

    left = attentions(inner)
    if len(left) > len(attentions(layer)) - converted_count:
        raise ValueError(
            f"After the swap, the copy of layer {layer.name!r} still holds "
            f"MultiHeadAttention layers it should not: {_listed(left)}. "
            "One that the layer holds in two places, one of them not an "
            "attribute, list, tuple or dict, stays unconverted."
        )


def _check_model(model):
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`model` must be a keras.Model. Received: model={model!r}"
        )
    if not is_graph_model(model):
        raise ValueError(
            "`model` must be a functional or sequential keras.Model. "
            f"Received a subclassed model of class {type(model).__name__}. "
            "Call it in a functional model (`inputs = keras.Input(shape)`, "
            "`keras.Model(inputs, model(inputs))`) and convert that model: "
            "a subclassed model inside one converts."
        )
    if not model.built:
        raise ValueError("`model` must be built: call it on data first.")


def _selected_attention(model, predicate):
    """`[(path, mha)]`: the MultiHeadAttention layers of `model` that
    `predicate` accepts, or a `ValueError` naming the attention layers
    that `model` has if there is none."""
    layers = all_layers(model)
    attentions = [
        (path, layer)
        for path, layer in layers
        if isinstance(layer, keras.layers.MultiHeadAttention)
    ]
    selected = [(path, mha) for path, mha in attentions if predicate(mha)]
    if selected:
        return selected
    if attentions:
        raise ValueError(
            "`predicate` accepts none of the MultiHeadAttention layers of "
            f"`model`, so nothing would convert: {_listed(attentions)}."
        )
    others = [
        (path, layer)
        for path, layer in layers
        if "attention" in type(layer).__name__.lower()
    ]
    found = (
        f"its attention layers are {_listed(others)}, none a "
        "keras.layers.MultiHeadAttention"
        if others
        else "it has no attention layer"
    )
    raise ValueError(
        "`model` has no keras.layers.MultiHeadAttention to convert: "
        f"{found}. `performerize` converts MultiHeadAttention layers (and "
        "PerformerBlock(attention='exact')); for another attention class, "
        "use keras_favor.FavorAttention in its place."
    )


def _check_all_converted(selected, converted_ids):
    """A `ValueError` naming any selected attention layer that the copy
    still holds as a MultiHeadAttention."""
    missed = [
        (path, mha) for path, mha in selected if id(mha) not in converted_ids
    ]
    if missed:
        raise ValueError(
            "`performerize` could not convert the MultiHeadAttention "
            f"layers {_listed(missed)}: they are held where they cannot be "
            "swapped (inside a functional or sequential model that a "
            "custom layer holds, in a dict under a key that is not a "
            "string, or in no attribute). Hold them in attributes, lists, "
            "tuples or dicts of the custom layer, or leave them out with "
            "`predicate`."
        )


def _listed(layers):
    return ", ".join(
        f"`{path}` ({type(layer).__name__} {layer.name!r})"
        for path, layer in layers
    )


def _is_exact_block(layer, favor_kwargs):
    """Whether `layer` is a built exact-attention PerformerBlock whose
    attention converts into the block's own FavorAttention arguments."""
    return (
        isinstance(layer, PerformerBlock)
        and layer.attention == "exact"
        and layer.built
        and set(favor_kwargs) <= set(favor_options.OPTIONS)
    )


def _favor_block(block, favor):
    """`block` as a `PerformerBlock(attention="favor")` whose attention is
    `favor` (converted from the block's own), with every other weight
    copied: so the converted block still decodes with a cache."""
    config = block.get_config()
    config["attention"] = "favor"
    config["attention_options"] = favor.options_config()
    new = PerformerBlock.from_config(config)
    new.build_from_config(block.get_build_config())
    new.attention_layer.set_weights(favor.get_weights())
    for name in _BLOCK_SUBLAYERS:
        getattr(new, name).set_weights(getattr(block, name).get_weights())
    return new


def _is_keras_hub(layer):
    """Whether `layer` is a keras-hub backbone, task or TransformerDecoder,
    which convert through `keras_favor.keras_hub` (keras-hub is loaded
    whenever a model holds one of its layers)."""
    if "keras_hub" not in sys.modules:
        return False
    conversion = _keras_hub_conversion()
    return conversion.is_keras_hub_model(layer) or (
        conversion.is_keras_hub_decoder(layer)
    )


def _keras_hub_conversion():
    from keras_favor.keras_hub import conversion

    return conversion


def _copy(layer):
    """A built copy of `layer` with its weights."""
    new = layer.__class__.from_config(layer.get_config())
    if not new.built:
        # Some layers (keras-hub's) are built by `from_config` already.
        build_like(new, layer.get_build_config())
    new.set_weights(layer.get_weights())
    return new
