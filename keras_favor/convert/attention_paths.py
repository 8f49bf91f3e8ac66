"""Where a model's MultiHeadAttention layers are held, and swapping them.

A path names a sub-layer from a layer: attribute names, list and tuple
indices and dict keys, joined by dots (`"blocks.0.attention"`).
"""

import keras

from keras_favor.layer_tree import TRACKING_LIST
from keras_favor.layer_tree import children
from keras_favor.layer_tree import depth_first
from keras_favor.layer_tree import holds_layers
from keras_favor.layer_tree import is_graph_model


def held_attention(layer, prefix="", seen=None):
    """`{path: mha}` for every MultiHeadAttention that `layer` holds as an
    attribute, directly, in a list, tuple or dict, or through the layers it
    holds (not through a functional or sequential model, whose layers are
    fixed in its graph). An attention layer held at several paths is listed
    at each."""
    seen = set() if seen is None else seen
    seen.add(id(layer))
    found = {}
    for step, value in children(layer):
        if not _is_addressable(step) or not holds_layers(value):
            continue
        if isinstance(value, keras.layers.MultiHeadAttention):
            found[prefix + step] = value
        elif id(value) not in seen and not is_graph_model(value):
            found.update(held_attention(value, f"{prefix}{step}.", seen))
    return found


def _is_addressable(step):
    """Whether `step` can be one part of a dotted path."""
    return isinstance(step, str) and step != "" and "." not in step


def all_layers(model):
    """`[(path, layer)]` for every layer inside `model`, each once: the
    layers of functional and sequential models by name, the layers that
    others hold by attribute, and those Keras tracks in no attribute by
    name."""
    return [
        (".".join(path), value)
        for path, value in depth_first(model, _named_children)
        if isinstance(value, keras.layers.Layer)
    ]


def _named_children(node):
    """The children `all_layers` follows from `node`, by name."""
    if is_graph_model(node):
        return [(layer.name, layer) for layer in node.layers]
    steps = children(node)
    if isinstance(node, keras.layers.Layer):
        steps += [
            (layer.name, layer) for layer in getattr(node, TRACKING_LIST, [])
        ]
    return [(step, value) for step, value in steps if holds_layers(value)]


def _nodes(layer, path):
    """The nodes from `layer` to the one holding the last step of `path`,
    and the path's steps."""
    steps = path.split(".")
    nodes = [layer]
    for step in steps[:-1]:
        nodes.append(_child(nodes[-1], step))
    return nodes, steps


def _child(node, step):
    if isinstance(node, (list, tuple)):
        return node[int(step)]
    if isinstance(node, dict):
        return node[step]
    return getattr(node, step)


def layer_at(layer, path):
    """The layer at `path` from `layer`."""
    nodes, steps = _nodes(layer, path)
    return _child(nodes[-1], steps[-1])


def _put(nodes, steps, new):
    """Puts `new` at the last step, rebuilding a tuple that holds it."""
    owner, step = nodes[-1], steps[-1]
    if isinstance(owner, tuple):
        items = list(owner)
        items[int(step)] = new
        # `__class__`, not `type`: TensorFlow wraps a layer's tuples in a
        # proxy that reports the tuple's class.
        rebuilt = (
            owner.__class__(*items)
            if hasattr(owner, "_fields")
            else owner.__class__(items)
        )
        _put(nodes[:-1], steps[:-1], rebuilt)
    elif isinstance(owner, (list, dict)):
        owner[int(step) if isinstance(owner, list) else step] = new
    else:
        setattr(owner, step, new)


def _replace(layer, path, new):
    """Puts `new` at `path` in place of the tracked layer there, so that
    the layer owning it has `new`'s weights, not the old layer's."""
    nodes, steps = _nodes(layer, path)
    old = _child(nodes[-1], steps[-1])
    owner = [n for n in nodes if isinstance(n, keras.layers.Layer)][-1]
    # Keras has no public way to swap a built layer's sub-layer: its
    # tracker is told directly, and the check below catches a Keras whose
    # tracker works otherwise.
    tracker = getattr(owner, "_tracker", None)
    locked = tracker is not None and tracker.locked
    if tracker is not None:
        tracker.untrack(old)
        tracker.unlock()
        tracker.track(new)
    try:
        _put(nodes, steps, new)
    finally:
        if locked:
            tracker.lock()
    old_ids = {id(v) for v in old.weights}
    if any(id(v) in old_ids for v in owner.weights):
        raise RuntimeError(
            f"Could not replace the MultiHeadAttention at `{path}` of layer "
            f"{layer.name!r}: the installed Keras still tracks it."
        )


def swap_attention(layer, attentions):
    """Replaces the MultiHeadAttention at each path of `attentions` (`{path:
    FavorAttention}`) inside the built `layer` by its FavorAttention."""
    for path, favor in attentions.items():
        _replace(layer, path, favor)
