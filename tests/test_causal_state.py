"""The causal state carried across pieces of a sequence equals the whole."""

import numpy as np
import pytest
import tensorflow as tf

import keras_favor
from keras_favor import ops as favor_ops

FEATURE_MAPS = ["softmax", "softmax_hyperbolic", "softmax_trig", "relu", "elu"]
LENGTH = 19


def attention_setup(rng, feature_map):
    """Float32 heads `(2, 2, LENGTH, 8)`, a padding mask and feature fns."""
    layer = keras_favor.FavorAttention(
        num_heads=2, key_dim=8, num_features=16, feature_map=feature_map,
        seed=3,
    )
    layer(np.zeros((1, 2, 16), "float32"))
    # Scale 0.5 keeps the signed trigonometric features' normalizers away
    # from 0, where any two summation orders differ by more than round-off.
    heads = [
        tf.constant(rng.normal(scale=0.5, size=(2, 2, LENGTH, 8)), tf.float32)
        for _ in range(3)
    ]
    valid = np.arange(LENGTH)[None, :] < np.array([[LENGTH], [12]])
    mask = tf.constant(valid)[:, None, :]
    num_features = layer.feature_map.feature_dim(16, 8)
    return heads, mask, layer._feature_fns(), num_features


def in_pieces(heads, mask, fns, num_features, cuts, chunk_size=4):
    """Causal attention over `[0, cuts[0]), [cuts[0], cuts[1]), ...`, each
    piece starting from the state the previous one returned."""
    feature_fn, query_feature_fn = fns
    bounds = [0, *cuts, LENGTH]
    state, outputs = None, []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        piece_outputs, state = favor_ops.causal_linear_attention(
            *(h[:, :, start:stop] for h in heads),
            feature_fn, num_features, mask=mask[:, :, start:stop],
            chunk_size=chunk_size, query_feature_fn=query_feature_fn,
            initial_state=state, return_state=True,
        )
        outputs.append(piece_outputs)
    return tf.concat(outputs, axis=2), state


def outputs_state_and_gradients(run, heads, target, mode):
    def compute(*heads):
        with tf.GradientTape() as tape:
            tape.watch(heads)
            outputs, state = run(list(heads))
            loss = tf.reduce_sum(outputs * target)
        return outputs, state, tape.gradient(loss, list(heads))

    if mode != "eager":
        compute = tf.function(compute, jit_compile=mode == "xla")
    return compute(*heads)


@pytest.mark.parametrize(
    "feature_map, mode",
    [(name, "graph") for name in FEATURE_MAPS]
    + [("softmax", "eager"), ("softmax", "xla")],
)
@pytest.mark.parametrize("cuts", [(9,), (1, 2, 7, 8, 13, 18)])
def test_pieces_with_carried_state_equal_the_whole(rng, feature_map, cuts, mode):
    # Uneven pieces (of 1 to 6 positions) cross the chunks of 4 anywhere;
    # the second row's keys after position 12 are padding.
    heads, mask, fns, num_features = attention_setup(rng, feature_map)
    target = tf.constant(rng.normal(size=(2, 2, LENGTH, 8)), tf.float32)
    whole = outputs_state_and_gradients(
        lambda h: in_pieces(h, mask, fns, num_features, ()), heads, target,
        mode,
    )
    pieces = outputs_state_and_gradients(
        lambda h: in_pieces(h, mask, fns, num_features, cuts), heads, target,
        mode,
    )
    for actual, expected in zip(
        tf.nest.flatten(pieces), tf.nest.flatten(whole)
    ):
        assert_close_to_round_off(actual, expected, 2e-6)


def assert_close_to_round_off(actual, expected, tolerance):
    """Equal up to `tolerance` times the largest entry of `expected`: the
    pieces sum the same terms in another order."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance * scale)


def test_state_of_one_position_steps_equals_the_whole_state(rng):
    heads, mask, fns, num_features = attention_setup(rng, "softmax")
    _, whole = in_pieces(heads, mask, fns, num_features, ())
    _, stepped = in_pieces(
        heads, mask, fns, num_features, tuple(range(1, LENGTH))
    )
    key_values, key_sum, level = whole
    assert key_values.shape == (2, 2, num_features, 8)
    assert key_sum.shape == (2, 2, num_features)
    assert level.shape == (2, 2, num_features)
    # The sums are stored times exp(-level), with levels that the
    # one-position step keeps per feature: compared at one common level.
    for actual, expected in zip(at_top_level(stepped), at_top_level(whole)):
        assert_close_to_round_off(actual, expected, 1e-6)


def at_top_level(state):
    """The state's sums times `exp(level - top)`, `top` the largest level
    of each batch row and head: one representation of the same sums."""
    key_values, key_sum, level = (np.asarray(x, np.float64) for x in state)
    to_top = np.exp(level - level.max(axis=-1, keepdims=True))
    return key_values * to_top[..., None], key_sum * to_top


def test_state_carries_across_recomputed_groups(rng):
    # Groups of 8 positions recomputed in the backward pass, inside one
    # piece and across pieces: the same numbers as one group.
    heads, mask, (feature_fn, query_feature_fn), num_features = (
        attention_setup(rng, "softmax")
    )

    def run(recompute_length, initial_state=None):
        with tf.GradientTape() as tape:
            tape.watch(heads)
            outputs, state = favor_ops.causal_linear_attention(
                *heads, feature_fn, num_features, mask=mask, chunk_size=4,
                query_feature_fn=query_feature_fn, return_state=True,
                initial_state=initial_state,
                recompute_length=recompute_length,
            )
            loss = tf.reduce_sum(tf.sin(outputs)) + tf.reduce_sum(state[0])
        return [outputs, *state, *tape.gradient(loss, heads)]

    for actual, expected in zip(run(8), run(LENGTH)):
        assert_close_to_round_off(actual, expected, 1e-6)


def test_empty_causal_state_is_no_key(rng):
    heads, mask, (feature_fn, query_feature_fn), num_features = (
        attention_setup(rng, "softmax")
    )
    options = dict(
        mask=mask, chunk_size=4, query_feature_fn=query_feature_fn
    )
    expected = favor_ops.causal_linear_attention(
        *heads, feature_fn, num_features, **options
    )
    actual = favor_ops.causal_linear_attention(
        *heads, feature_fn, num_features, **options,
        initial_state=favor_ops.empty_causal_state(2, 2, num_features, 8),
    )
    np.testing.assert_array_equal(actual, expected)


def test_initial_state_of_the_wrong_shape_raises(rng):
    heads, mask, (feature_fn, _), num_features = attention_setup(
        rng, "softmax"
    )
    state = favor_ops.empty_causal_state(2, 2, num_features + 1, 8)
    with pytest.raises(ValueError, match="key_values"):
        favor_ops.causal_linear_attention(
            *heads, feature_fn, num_features, initial_state=state
        )
