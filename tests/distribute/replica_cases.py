"""Shared parts of the tests of `tf.distribute` replicas that hold
segments of one sequence (`keras_favor.distribute.sequence_replicas()`):
`MirroredStrategy` on the logical CPUs of tests/conftest.py, segments of
NumPy arrays, and a small training loop."""

import keras
import numpy as np

import keras_favor
from tests.distribute import context_parallel_cases as cases

LENGTH = 36


def mirrored(num_replicas):
    """A `MirroredStrategy` on the first `num_replicas` logical CPUs. Each
    gets collective keys of its own, as TensorFlow's own tests do: two
    strategies of one process otherwise share group keys, and one of 2
    replicas then collides with one of 4."""
    import tensorflow as tf

    tf.distribute.MirroredStrategy._collective_key_base += 100000
    return tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(num_replicas)]
    )


def segments(strategy, array, axis=1):
    """`array` split along `axis` (the sequence), replica `i` the `i`-th
    segment."""
    import tensorflow as tf

    parts = np.split(array, strategy.num_replicas_in_sync, axis=axis)
    return strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(parts[context.replica_id_in_sync_group])
    )


def local(strategy, per_replica):
    return strategy.experimental_local_results(per_replica)


def performer(seed, window):
    """Dense, a causal `PerformerBlock`, Dense: `(B, L, 8)` to `(B, L, 1)`,
    every layer position-wise but the attention."""
    inputs = keras.Input((None, 8))
    hidden = keras.layers.Dense(16)(inputs)
    hidden = keras_favor.PerformerBlock(
        num_heads=2,
        intermediate_dim=16,
        key_dim=8,
        causal=True,
        num_features=16,
        seed=seed,
        chunk_size=4,
        local_window=window,
    )(hidden)
    return keras.Model(inputs, keras.layers.Dense(1)(hidden))


def train(model, optimizer, strategy, inputs, targets, steps):
    """`steps` steps of SGD on the squared error summed over the whole
    sequence and batch divided by their size; each replica's gradient is
    that of its segment's terms, and the optimizer sums them across
    replicas."""
    import tensorflow as tf

    count = float(np.prod(targets.shape))

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(x) - y)) / count
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def step(x, y):
        losses = strategy.run(replica_step, (x, y))
        return strategy.reduce("SUM", losses, axis=None)

    if strategy.num_replicas_in_sync > 1:
        inputs, targets = (segments(strategy, a) for a in (inputs, targets))
    return [float(step(inputs, targets)) for _ in range(steps)]


def assert_training_loop_equals_one_device(rng, window):
    """Two steps of `train` on 2 replicas, each holding half of the
    sequence, give the losses and weights of one device."""
    import tensorflow as tf

    inputs = rng.normal(size=(2, LENGTH, 8)).astype("float32")
    targets = rng.normal(size=(2, LENGTH, 1)).astype("float32")
    one_device = performer(3, window)
    initial = one_device.get_weights()
    strategy = mirrored(2)
    with strategy.scope():
        model = performer(3, window)
        model.set_weights(initial)
        optimizer = keras.optimizers.SGD(0.5)
    with keras_favor.distribute.sequence_replicas():
        losses = train(model, optimizer, strategy, inputs, targets, 2)
    expected_losses = train(
        one_device,
        keras.optimizers.SGD(0.5),
        tf.distribute.get_strategy(),
        inputs,
        targets,
        2,
    )
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    for actual, expected in zip(model.get_weights(), one_device.get_weights()):
        cases.assert_round_off(actual, expected, cases.WEIGHTS_TOLERANCE)
    # The steps moved the weights: the comparison is not of the start.
    assert not np.allclose(initial[0], one_device.get_weights()[0])
