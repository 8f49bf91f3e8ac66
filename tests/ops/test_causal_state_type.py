"""The causal states themselves: their shapes, their value before any key,
their checks, and the one-level form the chunked kernel carries."""

import keras
import numpy as np
import pytest

import keras_favor
from keras_favor import ops as favor_ops
from keras_favor.ops import causal_state
from keras_favor.ops import stabilizers
from tests import reference

pytestmark = pytest.mark.backend_independent

BATCH, HEADS, LENGTH, KEY_DIM, VALUE_DIM = 2, 3, 7, 4, 5


def heads(rng, length=LENGTH):
    """Float32 query, key `(B, H, L, d)` and value `(B, H, L, D)`."""
    return [
        keras.ops.convert_to_tensor(
            rng.normal(size=(BATCH, HEADS, length, dim)).astype("float32")
        )
        for dim in (KEY_DIM, KEY_DIM, VALUE_DIM)
    ]


def positive_features(x):
    """Feature parts `(values, log_scale)` of a plain positive map with
    `KEY_DIM` features."""
    return keras.ops.relu(x) + 0.1, None


def causal(query, key, value, **kwargs):
    return favor_ops.causal_linear_attention(
        query,
        key,
        value,
        positive_features,
        KEY_DIM,
        chunk_size=2,
        return_state=True,
        **kwargs,
    )


def window(query, key, value, **kwargs):
    return favor_ops.local_window_attention(
        query,
        key,
        value,
        positive_features,
        KEY_DIM,
        3,
        True,
        chunk_size=2,
        return_state=True,
        **kwargs,
    )


def as_numpy(state):
    return [keras.ops.convert_to_numpy(x) for x in state]


def test_shapes_of_each_state():
    assert favor_ops.CausalState.shapes(2, 3, 16, 5) == (
        (2, 3, 16, 5),
        (2, 3, 16),
        (2, 3, 16),
    )
    shapes = favor_ops.LocalWindowState.shapes(2, 3, 16, 4, 5, 6)
    assert shapes == (
        (2, 3, 16, 5),
        (2, 3, 16),
        (2, 3, 16),
        (2, 3, 6, 4),
        (2, 3, 6, 5),
        (2, 1, 6),
    )
    assert shapes.causal == favor_ops.CausalState.shapes(2, 3, 16, 5)
    assert shapes._fields[3:] == ("window_keys", "window_values", "window_mask")


def test_empty_states_hold_no_key():
    state = favor_ops.empty_causal_state(2, 3, 16, 5)
    assert isinstance(state, favor_ops.CausalState)
    key_values, key_sum, level = as_numpy(state)
    assert [x.shape for x in (key_values, key_sum, level)] == list(
        favor_ops.CausalState.shapes(2, 3, 16, 5)
    )
    assert not key_values.any() and not key_sum.any()
    no_key = np.float32(stabilizers.NO_KEY_LEVEL)
    np.testing.assert_array_equal(level, no_key)
    window_state = favor_ops.empty_local_window_state(2, 3, 16, 4, 5, 6)
    assert isinstance(window_state, favor_ops.LocalWindowState)
    arrays = as_numpy(window_state)
    assert [x.shape for x in arrays] == list(
        favor_ops.LocalWindowState.shapes(2, 3, 16, 4, 5, 6)
    )
    for expected, actual in zip(as_numpy(state), arrays[:3]):
        np.testing.assert_array_equal(actual, expected)
    assert not arrays[3].any() and not arrays[4].any()
    assert arrays[5].dtype == bool and not arrays[5].any()


@pytest.mark.parametrize("attention", [causal, window])
def test_empty_state_is_no_state_and_a_plain_tuple_is_a_state(attention, rng):
    inputs = heads(rng)
    outputs, state = reference.evaluate(attention, *inputs)
    assert type(state).__name__ == (
        "CausalState" if attention is causal else "LocalWindowState"
    )
    sizes = (BATCH, HEADS, KEY_DIM)
    empty = (
        favor_ops.empty_causal_state(*sizes, VALUE_DIM)
        if attention is causal
        else favor_ops.empty_local_window_state(*sizes, KEY_DIM, VALUE_DIM, 3)
    )
    from_empty = reference.evaluate(
        lambda *arrays: attention(*arrays[:3], initial_state=arrays[3:]),
        *inputs,
        *empty,
    )
    for actual, expected in zip(
        as_numpy([from_empty[0], *from_empty[1]]), as_numpy([outputs, *state])
    ):
        np.testing.assert_array_equal(actual, expected)


def wrong(state, index, shape):
    """`state` with its tensor `index` replaced by zeros of `shape`."""
    state = list(state)
    state[index] = keras.ops.zeros(shape, state[index].dtype)
    return tuple(state)


@pytest.mark.parametrize(
    "index, shape, name",
    [
        (0, (BATCH, HEADS, KEY_DIM + 1, VALUE_DIM), "key_values"),
        (1, (BATCH, HEADS + 1, KEY_DIM), "key_sum"),
        (2, (BATCH, HEADS, KEY_DIM, 1), "level"),
    ],
)
def test_causal_state_checks_name_the_argument_and_the_tensor(
    rng, index, shape, name
):
    inputs = heads(rng)
    state = favor_ops.empty_causal_state(BATCH, HEADS, KEY_DIM, VALUE_DIM)
    expected = favor_ops.CausalState.shapes(BATCH, HEADS, KEY_DIM, VALUE_DIM)[
        index
    ]
    message = (
        rf"`initial_state\[{index}\]` \({name}\) must have shape "
        + re_tuple(expected)
    )
    with pytest.raises(ValueError, match=message):
        causal(*inputs, initial_state=wrong(state, index, shape))
    with pytest.raises(ValueError, match="`initial_state` must be the tuple"):
        causal(*inputs, initial_state=state[:2])


@pytest.mark.parametrize(
    "index, shape, name",
    [
        (1, (BATCH, HEADS, KEY_DIM + 1), "key_sum"),
        (3, (BATCH, HEADS, 3, KEY_DIM + 1), "window_keys"),
        (4, (BATCH, HEADS, 3), "window_values"),
        (5, (BATCH, 3), "window_mask"),
    ],
)
def test_local_window_state_checks_name_the_argument_and_the_tensor(
    rng, index, shape, name
):
    inputs = heads(rng)
    state = favor_ops.empty_local_window_state(
        BATCH, HEADS, KEY_DIM, KEY_DIM, VALUE_DIM, 3
    )
    with pytest.raises(
        ValueError, match=rf"`initial_state\[{index}\]` \({name}\) must have"
    ):
        window(*inputs, initial_state=wrong(state, index, shape))
    with pytest.raises(ValueError, match="tuple of 6 tensors"):
        window(*inputs, initial_state=state[:3])


def test_layer_cache_checks_name_the_tensor(rng):
    layer = keras_favor.FavorAttention(
        num_heads=2, key_dim=4, num_features=8, seed=1, local_window=3
    )
    x = np.zeros((2, 5, 8), "float32")
    layer.build(x.shape)
    cache = layer.empty_cache(2)
    assert type(cache) is tuple
    bad = wrong(cache, 4, (2, 2, 3, 7))
    with pytest.raises(
        ValueError, match=r"`cache\[4\]` \(window_values\) must have shape"
    ):
        layer(x, use_causal_mask=True, cache=bad)


def re_tuple(shape):
    return r"\(" + ", ".join(str(x) for x in shape) + r"\)"


def test_one_level_form_keeps_the_sums_it_stands_for(rng):
    # Sums times exp(level) are what a state stands for; rescaling every
    # feature to the largest level keeps them, with factors <= 1.
    key_values = rng.uniform(size=(2, 3, 4, 5)).astype("float32")
    key_sum = rng.uniform(size=(2, 3, 4)).astype("float32")
    level = rng.normal(scale=3.0, size=(2, 3, 4)).astype("float32")
    level[0, 0, 1] = stabilizers.NO_KEY_LEVEL
    one = causal_state.one_level(
        favor_ops.CausalState(key_values, key_sum, level)
    )
    top = level.max(axis=-1)
    factor = np.exp(level.astype("float64") - top[..., None])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(one.level), top)
    # float32 exp and product: a few units of round-off (2**-24 each).
    for actual, expected in (
        (one.key_values, key_values * factor[..., None]),
        (one.key_sum, key_sum * factor),
    ):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(actual),
            expected,
            rtol=4 * 2**-23,
            atol=0,
        )
    back = as_numpy(causal_state.per_feature(one))
    np.testing.assert_array_equal(back[0], as_numpy(one)[0])
    np.testing.assert_array_equal(
        back[2], np.broadcast_to(top[..., None], level.shape)
    )
