"""One sequence split across `tf.distribute` replicas gives the numbers of
one device.

Inside `keras_favor.distribute.sequence_replicas()`, a `MirroredStrategy`
on 2 or 4 logical CPUs (tests/conftest.py) gives each replica a consecutive
segment of every sequence; the outputs, the gradients with respect to every
segment's inputs and the per-replica weight gradients summed equal the
layer on the whole sequence, to float32 round-off (the replicas sum the
same terms in another order), as do two steps of a custom training loop (with a local window:
tests/integration/test_replica_context_parallel_training.py). The length,
36, gives segments of 18 and 9 positions, which the chunk (4) does not
divide; the second row's keys from position 20 on are padding.
"""

import numpy as np
import pytest

import keras_favor
from keras_favor.layers import favor_kernels
from tests.distribute import context_parallel_cases as cases
from tests.distribute import replica_cases
from tests.distribute.replica_cases import LENGTH
from tests.distribute.replica_cases import local
from tests.distribute.replica_cases import mirrored
from tests.distribute.replica_cases import segments

pytestmark = pytest.mark.tensorflow_only


def outputs_and_gradients(layer, inputs, mask, target, causal):
    """`layer`'s outputs and the gradients of `sum(outputs * target)` with
    respect to the inputs and the trainable weights, under the replica
    context (or the default one), in a training call."""
    import tensorflow as tf

    inputs = tf.convert_to_tensor(inputs)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        outputs = layer(
            inputs,
            inputs,
            attention_mask=mask,
            use_causal_mask=causal,
            training=True,
        )
        loss = tf.reduce_sum(outputs * target)
    grads = tape.gradient(loss, [inputs, *layer.trainable_variables])
    return outputs, grads


def across_replicas(strategy, layer, inputs, mask, target, causal):
    """`outputs_and_gradients` with each replica holding a segment: the
    outputs and input gradients joined along the sequence, the weight
    gradients summed."""
    distributed = [segments(strategy, x) for x in (inputs, mask, target)]
    with keras_favor.distribute.sequence_replicas():
        outputs, grads = strategy.run(
            lambda x, m, t: outputs_and_gradients(layer, x, m, t, causal),
            distributed,
        )
    joined = [
        np.concatenate(local(strategy, x), axis=1) for x in (outputs, grads[0])
    ]
    summed = [sum(np.asarray(g) for g in local(strategy, w)) for w in grads[1:]]
    return joined + summed


def case(rng, feature_map="softmax", window=0):
    layer = keras_favor.FavorAttention(
        num_heads=2,
        key_dim=8,
        num_features=16,
        feature_map=feature_map,
        local_window=window,
        seed=3,
        chunk_size=4,
    )
    inputs = rng.normal(scale=0.5, size=(2, LENGTH, 16)).astype("float32")
    layer.build(inputs.shape, inputs.shape)
    mask = np.arange(LENGTH)[None, :] < np.array([[LENGTH], [20]])
    target = rng.normal(size=(2, LENGTH, 16)).astype("float32")
    return layer, inputs, mask, target


@pytest.mark.parametrize(
    "num_replicas, causal, feature_map, window",
    [
        (2, False, "softmax", 0),
        (4, True, "softmax", 0),
        (4, False, "softmax_trig", 0),
        (2, True, "softmax_trig", 0),
        (2, True, "favor++", 0),
        (4, False, "favor++", 0),
        (2, True, "softmax", 5),
        (4, True, "softmax", 12),
    ],
    ids=[
        "bidirectional-2",
        "causal-4",
        "trig-bidirectional-4",
        "trig-causal-2",
        "favor++-causal-2",
        "favor++-bidirectional-4",
        "window-5-on-2",
        "window-12-over-two-replicas-of-4",
    ],
)
def test_replicas_equal_one_device(
    rng, num_replicas, causal, feature_map, window
):
    strategy = mirrored(num_replicas)
    # Mirrored weights: the replicas' updates of FAVOR++'s moving
    # statistic are averaged into one.
    with strategy.scope():
        layer, inputs, mask, target = case(rng, feature_map, window)
    restart_moving_statistic(layer)
    outputs, grads = outputs_and_gradients(layer, inputs, mask, target, causal)
    expected = [outputs, *grads, *moving_statistic(layer)]
    restart_moving_statistic(layer)
    actual = across_replicas(strategy, layer, inputs, mask, target, causal)
    actual += moving_statistic(layer)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        cases.assert_round_off(a, e, cases.WEIGHTS_TOLERANCE)


def restart_moving_statistic(layer):
    """FAVOR++'s moving statistic, which a causal call reads and a causal
    training call then updates from the whole sequence's statistic, set
    to a nonzero start (other maps have none)."""
    if layer.feature_map.uses_statistics:
        layer.input_statistic.assign(np.array([0.5, 2.0], "float32"))


def moving_statistic(layer):
    """FAVOR++'s moving statistic as a list; `[]` for other maps."""
    if not layer.feature_map.uses_statistics:
        return []
    return [np.asarray(layer.input_statistic)]


def test_outside_the_scope_each_replica_attends_to_its_segment(rng):
    layer, inputs, mask, target = case(rng)
    strategy = mirrored(2)
    distributed = [segments(strategy, x) for x in (inputs, mask)]
    outputs = strategy.run(
        lambda x, m: layer(x, x, attention_mask=m), distributed
    )
    half = LENGTH // 2
    for index, part in enumerate(local(strategy, outputs)):
        own = slice(index * half, (index + 1) * half)
        expected = layer(
            inputs[:, own], inputs[:, own], attention_mask=mask[:, own]
        )
        cases.assert_round_off(part, expected)


@pytest.mark.parametrize(
    "options, call, message",
    [
        ({"dropout": 0.1}, {"training": True}, "dropout"),
        ({"local_window": 4}, {}, "local_window"),
        ({}, {"use_causal_mask": True, "cache": "empty"}, "cache"),
    ],
    ids=["dropout", "bidirectional-window", "cache"],
)
def test_what_has_no_form_across_replicas_raises(rng, options, call, message):
    layer = keras_favor.FavorAttention(
        num_heads=2, key_dim=8, num_features=16, seed=3, **options
    )
    layer.build((2, 8, 16), (2, 8, 16))
    if call.get("cache") == "empty":
        call = dict(call, cache=layer.empty_cache(2))
    strategy = mirrored(2)
    inputs = segments(strategy, np.ones((2, 16, 16), "float32"))
    with keras_favor.distribute.sequence_replicas():
        with pytest.raises(ValueError, match=message):
            strategy.run(lambda x: layer(x, x, **call), (inputs,))


def test_custom_training_loop_equals_one_device(rng):
    replica_cases.assert_training_loop_equals_one_device(rng, window=0)


def test_a_window_across_segments_of_other_lengths_raises(rng):
    import tensorflow as tf

    layer = keras_favor.FavorAttention(
        num_heads=2, key_dim=8, num_features=16, seed=3, local_window=4
    )
    layer.build((2, 8, 16), (2, 8, 16))
    strategy = mirrored(2)
    parts = [np.ones((2, length, 16), "float32") for length in (10, 8)]
    inputs = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(parts[context.replica_id_in_sync_group])
    )
    with keras_favor.distribute.sequence_replicas():
        with pytest.raises(tf.errors.InvalidArgumentError, match="one length"):
            strategy.run(lambda x: layer(x, x, use_causal_mask=True), (inputs,))


def test_kernel_carries_the_state_across_replicas(rng):
    # The kernel's `initial_state` and `return_state` (not used by the
    # layer, whose decoding cache raises across replicas): from the state
    # after another sequence, every replica returns the state after the
    # last replica's last key.
    import tensorflow as tf

    from keras_favor.distribute import replica_sequence_parallel

    layer, heads, mask, _ = cases.setup(rng)
    heads = [h[:, :, :LENGTH] for h in heads]
    mask = np.asarray(mask)[:, :, :LENGTH]
    feature_fn, query_feature_fn = favor_kernels.feature_fns(layer)

    def one_device(q, k, v, initial_state=None):
        return keras_favor.ops.causal_linear_attention(
            q,
            k,
            v,
            feature_fn,
            16,
            mask=mask,
            chunk_size=4,
            query_feature_fn=query_feature_fn,
            initial_state=initial_state,
            return_state=True,
        )

    _, initial = one_device(*(h[:, :, ::-1] for h in heads))
    expected_outputs, expected_state = one_device(*heads, initial)
    strategy = mirrored(2)
    q, k, v, m = (segments(strategy, np.asarray(x), 2) for x in (*heads, mask))

    def replica(q, k, v, m):
        return replica_sequence_parallel.sharded_linear_attention(
            replica_sequence_parallel.current_sharding(),
            q,
            k,
            v,
            layer.feature_map,
            tf.convert_to_tensor(layer.projection),
            16,
            True,
            mask=m,
            chunk_size=4,
            initial_state=initial,
            return_state=True,
        )

    with keras_favor.distribute.sequence_replicas():
        outputs, state = strategy.run(replica, (q, k, v, m))
    cases.assert_round_off(
        np.concatenate(local(strategy, outputs), axis=2), expected_outputs
    )
    for actual, want in zip(state, expected_state):
        for replica_part in local(strategy, actual):
            cases.assert_round_off(replica_part, want)
