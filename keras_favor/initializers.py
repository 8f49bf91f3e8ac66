"""`clone_initializer`: a fresh copy of a Keras initializer."""

import keras


def clone_initializer(initializer):
    """A new initializer of the same class and config as `initializer`.

    A seeded Keras initializer object draws the same values at each use
    (and warns when reused); each weight that should get its own draws
    takes its own copy, as Keras's layers do for their sub-layers.

    Args:
        initializer: a `keras.initializers.Initializer`, or anything
            `keras.initializers.get` takes (a name, a config dict).

    Returns:
        A `keras.initializers.Initializer` not shared with the argument.
    """
    initializer = keras.initializers.get(initializer)
    return initializer.__class__.from_config(initializer.get_config())
