"""`performerize` for keras-hub: backbones, tasks and Transformer
decoders."""

import keras
import keras_hub

from keras_favor.keras_hub import favor_transformer_decoder
from keras_favor.keras_hub.attention_swap import check_dense_weights
from keras_favor.keras_hub.favor_backbone import convert_backbone
from keras_favor.keras_hub.favor_causal_lm import favor_causal_lm_class
from keras_favor.keras_hub.favor_seq_2_seq_lm import favor_seq_2_seq_lm_class


def is_keras_hub_model(model):
    """Whether `model` is a keras-hub `Backbone` or `Task`."""
    return isinstance(model, (keras_hub.models.Backbone, keras_hub.models.Task))


def is_keras_hub_decoder(layer):
    return isinstance(layer, keras_hub.layers.TransformerDecoder)


def convert_model(model, predicate, favor_options):
    """`performerize(model, ...)` for a keras-hub backbone or task: the
    same class for a task (a CausalLM's `FavorCausalLM` subclass; its
    backbone converted, its preprocessor and
    other weights kept), the `FavorBackbone` subclass for a backbone."""
    if predicate is not None:
        raise ValueError(
            "`predicate` must be None for a keras-hub backbone or task: its "
            "Transformer layers convert together (the backbone records one "
            f"set of FAVOR options). Received: predicate={predicate!r}"
        )
    if isinstance(model, keras_hub.models.Backbone):
        return convert_backbone(model, favor_options)
    backbone = convert_backbone(model.backbone, favor_options)
    return _task_with_backbone(model, backbone)


def task_class(task_class_):
    """The class of a converted task of class `task_class_`: a CausalLM's
    `FavorCausalLM` subclass and a Seq2SeqLM's `FavorSeq2SeqLM` subclass,
    which generate on the recurrent state; any other task's own class."""
    if issubclass(task_class_, keras_hub.models.Seq2SeqLM):
        return favor_seq_2_seq_lm_class(task_class_)
    if issubclass(task_class_, keras_hub.models.CausalLM):
        return favor_causal_lm_class(task_class_)
    return task_class_


def _task_with_backbone(task, backbone):
    """A task of `task`'s (converted) class around `backbone`, with
    `task`'s preprocessor and configuration, and its weights outside the
    backbone copied."""
    config = task.get_config()
    config.update(backbone=backbone, preprocessor=task.preprocessor)
    new = task_class(type(task)).from_config(config)
    new_layers = {layer.name: layer for layer in new.layers}
    for layer in task.layers:
        if layer is task.backbone or not layer.weights:
            continue
        new_layers[layer.name].set_weights(layer.get_weights())
    return new


def converted_decoder(decoder, favor_options):
    """A `FavorTransformerDecoder` copy of the built keras-hub
    `TransformerDecoder` `decoder`, every weight copied."""
    if type(decoder) is not keras_hub.layers.TransformerDecoder:
        for attribute in ("_self_attention_layer", "_cross_attention_layer"):
            mha = getattr(decoder, attribute, None)
            if isinstance(mha, keras.layers.MultiHeadAttention):
                check_dense_weights(mha)
        raise ValueError(
            f"Layer {decoder.name!r} is a {type(decoder).__name__}, a "
            "subclass of keras-hub's TransformerDecoder: its own call would "
            "be lost in conversion, so it does not convert. keras_favor "
            "converts keras_hub.layers.TransformerDecoder itself."
        )
    new = type(decoder).from_config(decoder.get_config())
    if not new.built:
        new.build_from_config(decoder.get_build_config())
    new.set_weights(decoder.get_weights())
    return favor_transformer_decoder.convert_in_place(new, favor_options)
