"""The layers inside a model, walked one way for every caller.

A functional or sequential model holds its layers in its graph
(`model.layers`); any other layer (subclassed layers and models) holds its
sub-layers in attributes, directly or in lists, tuples and dicts. These
helpers list a node's children, skipping the attributes in which Keras
keeps its own bookkeeping (which hold the sub-layers a second time), and
walk a model depth first: `FeatureRedraw` finds its `FavorAttention` layers
with them, `performerize` the `MultiHeadAttention` layers to convert.
"""

import functools

import keras

# The Layer attribute in which Keras tracks every sub-layer.
TRACKING_LIST = "_layers"
# Bookkeeping attributes of Keras and TensorFlow that hold a layer's
# sub-layers again, beside the attributes through which the layer reaches
# them (not all are set on a fresh layer).
_BOOKKEEPING = frozenset(
    {
        TRACKING_LIST,
        "_tracked",
        "_self_unconditional_checkpoint_dependencies",
        "_self_unconditional_dependency_names",
        "_self_unconditional_deferred_dependencies",
        "_self_saveable_object_factories",
    }
)


def is_graph_model(layer):
    """Whether `layer` is a functional or sequential model (or a subclass
    of one, as KerasHub backbones are), whose layers are its graph's."""
    return isinstance(layer, (keras.Sequential, keras.Function))


@functools.cache
def keras_attribute_names():
    """The attributes in which Keras keeps its own state on a layer: those
    of a plain `keras.layers.Layer` holding one sub-layer (less that
    sub-layer), and the bookkeeping that TensorFlow adds later."""
    probe = keras.layers.Layer(name="keras_favor_probe")
    probe.sublayer = keras.layers.Layer(name="keras_favor_probe_sublayer")
    return (frozenset(vars(probe)) - {"sublayer"}) | _BOOKKEEPING


def children(node):
    """`(step, value)` pairs: the attributes of a layer (less Keras's own,
    `keras_attribute_names`) by name, in the order they were first set, the
    items of a list or tuple by index (a string) and of a dict by key."""
    if isinstance(node, (list, tuple)):
        return [(str(index), value) for index, value in enumerate(node)]
    if isinstance(node, dict):
        return list(node.items())
    names = keras_attribute_names()
    return [
        (name, value) for name, value in vars(node).items() if name not in names
    ]


def holds_layers(value):
    """Whether `value` is a layer or a container that may hold some."""
    return isinstance(value, (keras.layers.Layer, list, tuple, dict))


def layers_in(value):
    """The layers in `value`: `value` itself, or those inside it if it is a
    list, tuple or dict (searched recursively, in order; sets are not)."""
    if isinstance(value, keras.layers.Layer):
        return [value]
    if isinstance(value, (list, tuple, dict)):
        return [
            layer for _, item in children(value) for layer in layers_in(item)
        ]
    return []


def sublayers(layer):
    """The direct sub-layers of `layer`, each once, at its first position.

    - A functional or sequential model: `layer.layers`, the order of
      `model.get_layer(index=...)` (for a functional model the order of
      its graph, from the inputs).
    - Any other layer: the layers held by its attributes (`children`), in
      the order the attributes were first assigned (for a layer built by
      its `__init__`, also one loaded from a `.keras` file, the order of
      `__init__`), searching lists, tuples and dicts among them in order.

    Args:
        layer: a `keras.layers.Layer`.

    Returns:
        A list of `keras.layers.Layer`.
    """
    if is_graph_model(layer):
        found = layer.layers
    else:
        found = layers_in([value for _, value in children(layer)])
    unique = {}
    for child in found:
        if child is not layer:
            unique.setdefault(id(child), child)
    return list(unique.values())


def depth_first(root, steps):
    """Every node reached from `root`, once each, depth first.

    Args:
        root: where the walk starts (not itself yielded).
        steps: `steps(node)` gives the `(step, child)` pairs to follow from
            `node`, in order.

    Yields:
        `(path, node)`: the tuple of steps from `root` to `node`, at the
        first path that reaches it.
    """
    seen = {id(root)}

    def visit(node, path):
        for step, child in steps(node):
            if id(child) in seen:
                continue
            seen.add(id(child))
            child_path = path + (step,)
            yield child_path, child
            yield from visit(child, child_path)

    yield from visit(root, ())
