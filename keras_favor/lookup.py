"""What `feature_maps` and `projections` share: the config protocol of
their base classes and look-up by name, config or instance, in the manner of
`keras.activations.get`."""

import copy

import keras


class Configurable:
    """Keras config protocol for objects built from their `__init__`
    arguments: subclasses return those arguments from `get_config`."""

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def public_name(cls):
    """`keras_favor.feature_maps.FeatureMap` for the class `FeatureMap`."""
    package = cls.__module__.rsplit(".", 1)[0]
    return f"{package}.{cls.__name__}"


def serialize_option(instance):
    """The Keras config of a feature map or projection, a dict of its own.

    Inside `model.save` or `load_model`, Keras marks objects it serializes
    twice as shared and writes a `shared_object_id` into every config it
    returned for them, later too. It tells them apart by `id()`, which a
    temporary object can reuse after another was freed (the options check
    makes temporaries). These objects hold nothing but their arguments, so
    the config is copied and keeps no such id: equal options give equal
    configs, saved or not.
    """
    config = copy.deepcopy(keras.saving.serialize_keras_object(instance))
    config.pop("shared_object_id", None)
    return config


def lookup(identifier, base_class, names, argument):
    """Returns a `base_class` instance from a name, a config or an instance.

    Args:
        identifier: a key of `names`, a dict made by
            `keras.saving.serialize_keras_object`, or an instance of
            `base_class` (returned as is).
        base_class: the class every result is an instance of.
        names: dict from accepted names to classes built with no argument.
        argument: the argument name to quote in errors.
    """
    if isinstance(identifier, base_class):
        return identifier
    if isinstance(identifier, str) and identifier in names:
        return names[identifier]()
    if isinstance(identifier, dict):
        instance = keras.saving.deserialize_keras_object(identifier)
        if isinstance(instance, base_class):
            return instance
    raise ValueError(
        f"Unknown `{argument}`: {identifier!r}. Valid names are "
        f"{sorted(names)}, or pass a {public_name(base_class)} instance or "
        "its config."
    )
