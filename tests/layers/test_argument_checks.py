"""FavorAttention's argument checks: every bad input raises an error that
names the argument and what is allowed, and redraws without a seed are new
each time, also inside a `tf.function`."""

import keras
import numpy as np
import pytest

import keras_favor
from keras_favor import backend

pytestmark = pytest.mark.backend_independent

TRACED_SHAPES = (
    "tf.function traces shapes known only at run time; JAX traces static "
    "shapes, checked in Python when the layer is called"
)


def data(rng, *shape):
    return rng.normal(size=shape).astype("float32")


# --- call arguments ---------------------------------------------------------


def test_key_without_value_raises_eagerly_and_symbolically(rng):
    layer = keras_favor.FavorAttention(2, 4)
    query, key = data(rng, 2, 5, 8), data(rng, 2, 6, 8)
    with pytest.raises(ValueError, match="`key` was given without `value`"):
        layer(query, key=key)
    symbolic = keras.Input((5, 8)), keras.Input((6, 8))
    with pytest.raises(ValueError, match="`key` was given without `value`"):
        keras_favor.FavorAttention(2, 4)(symbolic[0], key=symbolic[1])


def test_a_single_input_is_self_attention_in_sequential(rng):
    x = data(rng, 2, 5, 8)
    model = keras.Sequential(
        [keras.Input((5, 8)), keras_favor.FavorAttention(2, 4, name="a")]
    )
    layer = model.get_layer("a")
    np.testing.assert_allclose(
        model.predict(x, verbose=0), layer(x, x), rtol=1e-5, atol=1e-6
    )


MASK_NAMES = ("value_mask", "key_mask", "attention_mask")


@pytest.mark.parametrize("name", MASK_NAMES)
@pytest.mark.parametrize(
    "mask_shape", [(2, 1), (1, 6), (2, 5), (2, 7), (3, 6), (2, 1, 5)]
)
def test_masks_of_the_wrong_shape_name_themselves_and_both_shapes(
    rng, name, mask_shape
):
    if len(mask_shape) == 3 and name != "attention_mask":
        mask_shape = mask_shape[:1] + mask_shape[2:]
    layer = keras_favor.FavorAttention(2, 4)
    query, value = data(rng, 2, 4, 8), data(rng, 2, 6, 8)
    mask = np.ones(mask_shape, bool)
    pattern = rf"`{name}`.*\(2, 6\).*\(2, 6, 8\).*{name}\.shape="
    with pytest.raises(ValueError, match=pattern):
        layer(query, value, **{name: mask})
    # The same check runs when a functional model is built.
    inputs = keras.Input((4, 8)), keras.Input((6, 8), batch_size=2)
    mask_input = keras.Input(mask_shape[1:], batch_size=mask_shape[0])
    with pytest.raises(ValueError, match=rf"`{name}`"):
        keras_favor.FavorAttention(2, 4)(
            inputs[0], inputs[1], **{name: mask_input}
        )


@pytest.mark.parametrize("name", MASK_NAMES)
def test_masks_of_the_right_shape_pass(rng, name):
    layer = keras_favor.FavorAttention(2, 4)
    query, value = data(rng, 2, 4, 8), data(rng, 2, 6, 8)
    layer(query, value, **{name: np.ones((2, 6), bool)})
    layer(query, value, **{name: np.ones((2, 6), "int32")})


@pytest.mark.tensorflow_only(reason=TRACED_SHAPES)
@pytest.mark.parametrize("mask_shape", [(2, 1), (1, 6), (2, 5)])
def test_masks_of_unknown_static_shape_are_checked_when_run(rng, mask_shape):
    import tensorflow as tf

    layer = keras_favor.FavorAttention(2, 4)
    query, value = data(rng, 2, 4, 8), data(rng, 2, 6, 8)
    layer(query, value)
    spec = tf.TensorSpec((None, None, 8))

    @tf.function(
        input_signature=[spec, spec, tf.TensorSpec((None, None), tf.bool)]
    )
    def attend(query, value, mask):
        return layer(query, value, value_mask=mask)

    attend(query, value, np.ones((2, 6), bool))
    with pytest.raises(tf.errors.InvalidArgumentError, match="value_mask"):
        attend(query, value, np.ones(mask_shape, bool))


def test_general_attention_mask_is_rejected(rng):
    layer = keras_favor.FavorAttention(2, 4)
    x = data(rng, 2, 5, 8)
    with pytest.raises(ValueError, match="key padding.*use_causal_mask"):
        layer(x, x, attention_mask=np.ones((2, 5, 5), bool))


@pytest.mark.parametrize("other", ["value", "key"])
def test_batch_sizes_that_differ_raise(rng, other):
    layer = keras_favor.FavorAttention(2, 4)
    inputs = {"query": data(rng, 2, 5, 8), "value": data(rng, 2, 6, 8)}
    inputs[other] = data(rng, 3, 6, 8)
    with pytest.raises(ValueError, match=f"`query` and `{other}`.*batch"):
        layer(**inputs)
    layer = keras_favor.FavorAttention(2, 4)
    layer(data(rng, 2, 5, 8), data(rng, 2, 6, 8))
    with pytest.raises(ValueError, match="batch"):
        layer(**inputs)


@pytest.mark.tensorflow_only(reason=TRACED_SHAPES)
def test_batch_sizes_that_differ_at_run_time_raise(rng):
    import tensorflow as tf

    layer = keras_favor.FavorAttention(2, 4)
    spec = tf.TensorSpec((None, None, 8))
    attend = tf.function(layer.__call__, input_signature=[spec, spec])
    attend(data(rng, 2, 5, 8), data(rng, 2, 6, 8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="batch"):
        attend(data(rng, 2, 5, 8), data(rng, 3, 6, 8))


# (query, value, key) shapes whose value and key differ in a dimension
# other than the last, which MultiHeadAttention rejects with "must be equal".
VALUE_KEY_MISMATCHES = [
    ((2, 5, 8), (2, 3, 6), (2, 6)),
    ((2, 5, 8), (2, 3, 8), (2, 4, 8)),
    ((2, 3, 4, 8), (2, 2, 6, 8), (2, 6, 2, 8)),
]


@pytest.mark.parametrize("shapes", VALUE_KEY_MISMATCHES)
def test_value_and_key_that_differ_raise_as_in_multi_head_attention(
    rng, shapes
):
    """`compute_output_shape` (with tuples or lists), the eager call and the
    symbolic call all reject them, with `MultiHeadAttention`'s phrase."""
    query_shape, value_shape, key_shape = shapes
    layer = keras_favor.FavorAttention(2, 4)
    pattern = r"`value` and `key` must be equal.*but the last"
    for convert in (tuple, list):
        with pytest.raises(ValueError, match=pattern):
            layer.compute_output_shape(*(convert(shape) for shape in shapes))
    with pytest.raises(ValueError, match=pattern):
        layer(*(data(rng, *shape) for shape in shapes))
    symbolic = [keras.Input(shape[1:], batch_size=2) for shape in shapes]
    with pytest.raises(ValueError, match=pattern):
        keras_favor.FavorAttention(2, 4)(*symbolic)
    # With the key made to fit, the same shapes give the call's output.
    key_shape = value_shape[:-1] + (5,)
    output = layer(
        data(rng, *query_shape), data(rng, *value_shape), data(rng, *key_shape)
    )
    for convert in (tuple, list):
        assert (
            layer.compute_output_shape(
                convert(query_shape), convert(value_shape), convert(key_shape)
            )
            == output.shape
        )


@pytest.mark.tensorflow_only(reason=TRACED_SHAPES)
def test_value_and_key_that_differ_at_run_time_raise(rng):
    import tensorflow as tf

    layer = keras_favor.FavorAttention(2, 4)
    spec = tf.TensorSpec((None, None, 8))
    attend = tf.function(layer.__call__, input_signature=[spec] * 3)
    attend(data(rng, 2, 5, 8), data(rng, 2, 6, 8), data(rng, 2, 6, 8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be equal"):
        attend(data(rng, 2, 5, 8), data(rng, 2, 6, 8), data(rng, 2, 4, 8))


def test_return_attention_scores_false_is_accepted(rng):
    layer = keras_favor.FavorAttention(2, 4)
    x = data(rng, 2, 5, 8)
    np.testing.assert_array_equal(
        layer(x, x, return_attention_scores=False), layer(x, x)
    )
    symbolic = keras.Input((5, 8))
    output = layer(symbolic, symbolic, return_attention_scores=False)
    assert tuple(output.shape) == (None, 5, 8)


def test_return_attention_scores_true_says_why_not(rng):
    layer = keras_favor.FavorAttention(2, 4)
    x = data(rng, 2, 5, 8)
    pattern = "`return_attention_scores=True`.*linear attention.*never forms"
    with pytest.raises(ValueError, match=pattern):
        layer(x, x, return_attention_scores=True)
    symbolic = keras.Input((5, 8))
    with pytest.raises(ValueError, match=pattern):
        layer(symbolic, symbolic, return_attention_scores=True)


# --- constructor arguments --------------------------------------------------


@pytest.mark.parametrize(
    "output_shape, expected",
    [
        (12, (12,)),
        (np.int64(12), (12,)),
        ((4, 3), (4, 3)),
        ([np.int32(4), 3], (4, 3)),
        (None, None),
    ],
)
def test_output_shape_takes_ints_and_tuples_of_ints(output_shape, expected):
    layer = keras_favor.FavorAttention(2, 4, output_shape=output_shape)
    assert layer.get_config()["output_shape"] == expected
    if expected is not None:
        assert all(type(d) is int for d in layer.get_config()["output_shape"])


@pytest.mark.parametrize(
    "output_shape",
    [
        "12",
        b"12",
        True,
        np.bool_(True),
        (True, 2),
        2.5,
        12.0,
        (4, 2.5),
        0,
        -3,
        (),
        (4, 0),
        (4, None),
        {"a": 1},
    ],
)
def test_output_shape_rejects_what_is_not_a_positive_int(output_shape):
    # MultiHeadAttention's phrase first, then what is allowed.
    pattern = "^Invalid `output_shape`: `output_shape` must be"
    with pytest.raises(ValueError, match=pattern):
        keras_favor.FavorAttention(2, 4, output_shape=output_shape)


@pytest.mark.parametrize("name", ["num_heads", "key_dim", "value_dim"])
@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_head_sizes_raise_as_in_multi_head_attention(name, bad):
    """`MultiHeadAttention`'s phrase, "argument `name`", then what is
    allowed."""
    kwargs = {"num_heads": 2, "key_dim": 4, name: bad}
    pattern = rf"^Invalid value for argument `{name}`: `{name}` must be a "
    pattern += "positive integer"
    with pytest.raises(ValueError, match=pattern):
        keras_favor.FavorAttention(**kwargs)


@pytest.mark.parametrize("seed", [-(2**63), -1, 0, 2**31, 2**63 - 1])
def test_seeds_at_both_ends_of_the_int64_range_work(rng, seed):
    x = data(rng, 2, 5, 8)
    layer = keras_favor.FavorAttention(2, 4, dropout=0.1, seed=seed)
    output = layer(x, x, training=True)
    assert np.all(np.isfinite(output))
    layer.redraw_features()
    twin = keras_favor.FavorAttention(2, 4, dropout=0.1, seed=seed)
    twin(x, x)
    twin.redraw_features()
    np.testing.assert_array_equal(twin.projection, layer.projection)


@pytest.mark.parametrize(
    "seed", [2**63, -(2**63) - 1, 2**64, "1", 1.0, True, np.bool_(False)]
)
def test_seeds_outside_the_range_raise_at_construction(seed):
    with pytest.raises(ValueError, match=r"`seed` must be None or an int in"):
        keras_favor.FavorAttention(2, 4, seed=seed)


@pytest.mark.parametrize(
    "seed",
    [
        5,
        np.int64(5),
        [5, 0],
        keras.ops.convert_to_tensor([5, 0]),
        keras.ops.convert_to_tensor([5, 0], "int64"),
        np.array([5, 0], np.int32),
    ],
)
def test_redraw_takes_an_int_or_a_pair_of_ints(seed):
    layer = keras_favor.FavorAttention(2, 4, num_features=8)
    layer.build((None, 4, 8), (None, 4, 8))
    layer.redraw_features(seed)
    reference = keras_favor.projections.get("orthogonal")((8, 4), 5)
    np.testing.assert_array_equal(layer.projection, reference)


def test_a_pair_of_ints_draws_as_a_tensor_of_it_does():
    """A stateless seed `[a, b]` as Python ints, a NumPy array, an int32
    tensor and a traced int32 tensor: one projection."""
    orthogonal = keras_favor.projections.get("orthogonal")
    traced = backend.compile_function(lambda s: orthogonal((8, 4), s), [])
    for pair in ([0, 0], [5, 0], [-3, 7], [7, -3], [2**31 - 1, -(2**31)]):
        expected = keras.ops.convert_to_numpy(orthogonal((8, 4), pair))
        tensor = keras.ops.convert_to_tensor(pair, "int32")
        for projection in (
            orthogonal((8, 4), np.array(pair, np.int32)),
            orthogonal((8, 4), tensor),
            traced(tensor),
        ):
            np.testing.assert_array_equal(projection, expected, str(pair))


@pytest.mark.parametrize(
    "seed",
    [
        "5",
        1.5,
        True,
        keras.ops.convert_to_tensor([1.0, 2.0]),
        keras.ops.convert_to_tensor([1, 2, 3]),
        np.array([[1, 2]]),
        [1.5, 2.0],
        2**63,
        object(),
    ],
)
def test_redraw_rejects_other_seeds_naming_seed(seed):
    layer = keras_favor.FavorAttention(2, 4, num_features=8)
    layer.build((None, 4, 8), (None, 4, 8))
    with pytest.raises(ValueError, match="`seed` must be"):
        layer.redraw_features(seed)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"use_gate": True}, "`use_gate=True` is not supported"),
        ({"sliding_window": 4}, "`sliding_window` is not supported"),
        ({"attention_axes": "x"}, "`attention_axes` must be None, an int"),
        ({"attention_axes": (1.0,)}, "`attention_axes` must be None, an int"),
        ({"lora_rank": 0}, "`lora_rank` must be"),
        ({"lora_alpha": -1}, "`lora_alpha` must be None or a positive"),
        ({"lora_alpha": "2"}, "`lora_alpha` must be None or a positive"),
    ],
)
def test_options_without_a_linear_time_form_raise(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        keras_favor.FavorAttention(2, 4, **kwargs)


@pytest.mark.parametrize(
    "axes, shape, ok",
    [
        (1, (2, 5, 8), True),
        ((-2,), (2, 5, 8), True),
        ((1, 2), (2, 3, 4, 8), True),
        ((-3, -2), (2, 3, 4, 8), True),
        (2, (2, 5, 8), False),
        ((2,), (2, 3, 4, 8), False),
        ((1,), (2, 3, 4, 8), False),
    ],
)
def test_attention_axes_pass_only_when_they_name_all_position_axes(
    rng, axes, shape, ok
):
    layer = keras_favor.FavorAttention(2, 4, attention_axes=axes)
    x = data(rng, *shape)
    if ok:
        assert layer(x, x).shape == shape
    else:
        with pytest.raises(ValueError, match="`attention_axes` must be None"):
            layer(x, x)


def test_inputs_of_rank_two_raise(rng):
    with pytest.raises(ValueError, match="`query` of rank 3 or more"):
        keras_favor.FavorAttention(2, 4)(data(rng, 2, 8), data(rng, 2, 8))


# --- redraws without a seed -------------------------------------------------

TRACED_REDRAWS = (
    "redraws inside one tf.function trace; under jax.jit a variable's "
    "assignment is the traced function's output (keras.StatelessScope)"
)


def projection_of(layer):
    return np.array(keras.ops.convert_to_numpy(layer.projection))


def distinct(arrays):
    return len({a.tobytes() for a in arrays}) == len(arrays)


@pytest.mark.tensorflow_only(reason=TRACED_REDRAWS)
def test_unseeded_redraws_are_new_at_each_call_of_one_trace():
    import tensorflow as tf

    layer = keras_favor.FavorAttention(2, 4, num_features=8)
    layer.build((None, 4, 8), (None, 4, 8))
    traces = []

    @tf.function
    def redraw():
        traces.append(1)
        layer.redraw_features()

    drawn = [projection_of(layer)]
    for _ in range(3):
        redraw()
        drawn.append(projection_of(layer))
    assert len(traces) == 1
    assert distinct(drawn)
    assert int(layer.redraw_count) == 3


@pytest.mark.tensorflow_only(reason=TRACED_REDRAWS)
def test_unseeded_redraws_are_new_within_one_trace():
    import tensorflow as tf

    layer = keras_favor.FavorAttention(2, 4, num_features=8)
    layer.build((None, 4, 8), (None, 4, 8))

    @tf.function
    def redraw_twice():
        first = tf.identity(layer.redraw_features())
        second = tf.identity(layer.redraw_features())
        return first, second

    drawn = [projection_of(layer)]
    for _ in range(2):
        drawn.extend(np.asarray(p) for p in redraw_twice())
    assert distinct(drawn)
    np.testing.assert_array_equal(drawn[-1], projection_of(layer))


def test_unseeded_layers_start_and_redraw_differently():
    layers = [keras_favor.FavorAttention(2, 4, num_features=8) for _ in "ab"]
    for layer in layers:
        layer.build((None, 4, 8), (None, 4, 8))
    assert distinct([projection_of(layer) for layer in layers])
    for layer in layers:
        layer.redraw_features()
    assert distinct([projection_of(layer) for layer in layers])


def folded_seed(count):
    """The seed of a layer seeded 5 at its redraw `count`: `[5, 0]` folded
    with the count (on TensorFlow as an int64; an int32 folds
    differently)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.random.experimental.stateless_fold_in(
            tf.constant([5, 0], tf.int64), tf.constant(count, tf.int64)
        )
    return backend.fold_in(backend.int_pair_seed(5, 0), count)


@pytest.mark.parametrize(
    "in_function",
    [
        False,
        pytest.param(
            True, marks=pytest.mark.tensorflow_only(reason=TRACED_REDRAWS)
        ),
    ],
)
def test_seeded_redraws_fold_the_redraw_count_into_the_seed(in_function):
    layer = keras_favor.FavorAttention(2, 4, num_features=8, seed=5)
    layer.build((None, 4, 8), (None, 4, 8))
    redraw = layer.redraw_features
    if in_function:
        import tensorflow as tf

        redraw = tf.function(lambda: layer.redraw_features() * 1.0)
    orthogonal = keras_favor.projections.get("orthogonal")
    np.testing.assert_array_equal(layer.projection, orthogonal((8, 4), 5))
    for k in (1, 2, 3):
        redraw()
        np.testing.assert_array_equal(
            layer.projection, orthogonal((8, 4), folded_seed(k))
        )


@pytest.mark.parametrize("causal", [False, True])
def test_a_call_of_length_zero_gives_an_empty_output(causal):
    layer = keras_favor.FavorAttention(2, 8, num_features=8)
    empty = np.zeros((2, 0, 16), "float32")
    assert layer(empty, empty, use_causal_mask=causal).shape == (2, 0, 16)


def test_queries_without_keys_get_zero_attention():
    layer = keras_favor.FavorAttention(2, 8, num_features=8, use_bias=False)
    query = np.ones((2, 3, 16), "float32")
    outputs = layer(query, np.zeros((2, 0, 16), "float32"))
    np.testing.assert_array_equal(outputs, np.zeros((2, 3, 16)))
