"""`performerize`: a copy of a model with FavorAttention in place of its
`keras.layers.MultiHeadAttention` layers."""

import keras

from keras_favor.convert.from_multi_head_attention import (
    from_multi_head_attention,
)
from keras_favor.convert.performerized_layer import PerformerizedLayer
from keras_favor.convert.performerized_layer import held_attention
from keras_favor.convert.performerized_layer import swap_attention
from keras_favor.layers.performer_block import PerformerBlock

# FavorAttention arguments that PerformerBlock takes under the same name.
_BLOCK_FAVOR_ARGUMENTS = (
    "feature_map", "num_features", "projection", "seed", "chunk_size",
    "recompute_length", "local_window",
)
# PerformerBlock's sub-layers with weights, besides its attention.
_BLOCK_SUBLAYERS = (
    "attention_norm", "intermediate_dense", "output_dense", "feedforward_norm",
)


def performerize(model, predicate=None, **favor_kwargs):
    """A new model with FavorAttention in place of MultiHeadAttention.

    Every `keras.layers.MultiHeadAttention` of `model` for which `predicate`
    is true becomes `from_multi_head_attention(mha, **favor_kwargs)` (its
    weights copied), wherever it is: a layer of a functional or sequential
    model, of a nested model, or a layer held as an attribute by a custom
    layer (as keras-hub's `TransformerEncoder` holds its attention). A
    `PerformerBlock(attention="exact")` becomes the same block with
    `attention="favor"`, so a converted `build_performer` language model
    still decodes with a cache (`keras_favor.generate`). Every other weight
    equals the original's. The new model calls the attention
    layers with the same arguments, so `use_causal_mask=True` stays causal;
    a general `(B, T, S)` attention mask has no linear-time form and raises
    when the model is called. `model` is left as it was.

    Args:
        model: a functional or sequential `keras.Model`, built.
        predicate: None (convert all) or a function of a
            MultiHeadAttention returning whether to convert it.
        **favor_kwargs: `FavorAttention` arguments for every converted
            layer, such as `num_features`, `feature_map` or `seed`.

    Returns:
        The new `keras.Model`, uncompiled.

    Example:

    ```python
    performer = keras_favor.convert.performerize(model, num_features=128)
    performer.compile("adam", loss)
    performer.fit(data)  # recover from the swap (README)
    ```
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`model` must be a keras.Model. Received: model={model!r}"
        )
    if not model.built:
        raise ValueError("`model` must be built: call it on data first.")
    predicate = predicate or (lambda mha: True)
    clones = []

    def converted(mha):
        return from_multi_head_attention(mha, **favor_kwargs)

    def clone(layer):
        if not isinstance(layer, keras.layers.Layer):
            return layer  # a stateless operation, such as `x + y`
        if isinstance(layer, keras.layers.MultiHeadAttention):
            return converted(layer) if predicate(layer) else _copy(layer)
        if _is_exact_block(layer, favor_kwargs) and predicate(
            layer.attention_layer
        ):
            return _favor_block(layer, converted(layer.attention_layer))
        held = {
            path: mha for path, mha in held_attention(layer).items()
            if predicate(mha)
        }
        if isinstance(layer, keras.Model) or not held:
            new = layer.__class__.from_config(layer.get_config())
            clones.append((layer, new))
            return new
        # A custom layer holding attention: a copy with its weights, its
        # attention swapped, in a wrapper that saves the swap.
        inner = _copy(layer)
        attentions = {path: converted(mha) for path, mha in held.items()}
        swap_attention(inner, attentions)
        return PerformerizedLayer(
            inner,
            {path: favor.get_config() for path, favor in attentions.items()},
            name=layer.name,
        )

    try:
        new_model = keras.models.clone_model(
            model, clone_function=clone, recursive=True
        )
    except ValueError as error:
        raise ValueError(
            "`performerize` converts functional and sequential models (and "
            "the layers and models nested in them); cloning this model "
            f"failed: {error}"
        ) from error
    for old, new in clones:
        if old.weights:
            new.set_weights(old.get_weights())
    return new_model


def _is_exact_block(layer, favor_kwargs):
    """Whether `layer` is a built exact-attention PerformerBlock whose
    attention converts into the block's own FavorAttention arguments."""
    return (
        isinstance(layer, PerformerBlock)
        and layer.attention == "exact"
        and layer.built
        and set(favor_kwargs) <= set(_BLOCK_FAVOR_ARGUMENTS)
    )


def _favor_block(block, favor):
    """`block` as a `PerformerBlock(attention="favor")` whose attention is
    `favor` (converted from the block's own), with every other weight
    copied: so the converted block still decodes with a cache."""
    config = block.get_config()
    config["attention"] = "favor"
    favor_config = favor.get_config()
    config.update({name: favor_config[name] for name in _BLOCK_FAVOR_ARGUMENTS})
    new = PerformerBlock.from_config(config)
    new.build_from_config(block.get_build_config())
    new.attention_layer.set_weights(favor.get_weights())
    for name in _BLOCK_SUBLAYERS:
        getattr(new, name).set_weights(getattr(block, name).get_weights())
    return new


def _copy(layer):
    """A built copy of `layer` with its weights."""
    new = layer.__class__.from_config(layer.get_config())
    new.build_from_config(layer.get_build_config())
    new.set_weights(layer.get_weights())
    return new
