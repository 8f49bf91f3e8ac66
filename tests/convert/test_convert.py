"""Converting softmax-attention models: `from_multi_head_attention` copies
a layer's configuration and weights; `performerize` swaps every
MultiHeadAttention of a model, wherever it is held, and leaves the rest and
the original alone."""

import keras
import numpy as np
import pytest

import keras_favor
from keras_favor import convert
from tests import reference

pytestmark = pytest.mark.backend_independent

DIM = 16
# One feature count (enough for the softmax comparison) and, mostly, one
# input shape (`data`) for the whole module: JAX compiles each operation
# once per shape.
FEATURES = 256


def data(rng, batch=2, length=7):
    return rng.normal(size=(batch, length, DIM)).astype("float32")


def built_mha(rng, **kwargs):
    mha = keras.layers.MultiHeadAttention(
        **{"num_heads": 2, "key_dim": 8, **kwargs}
    )
    mha.build((2, 7, DIM), (2, 7, DIM))
    for weight in mha.weights:
        weight.assign(rng.normal(size=weight.shape).astype("float32") * 0.3)
    return mha


def test_layer_gets_the_configuration_and_the_weights(rng):
    mha = built_mha(
        rng,
        value_dim=4,
        use_bias=False,
        output_shape=(5,),
        dropout=0.1,
        kernel_regularizer="l2",
        name="attention",
    )
    favor = convert.from_multi_head_attention(mha, num_features=32, seed=1)
    config = favor.get_config()
    for name in ("num_heads", "key_dim", "value_dim", "use_bias", "dropout"):
        assert config[name] == mha.get_config()[name], name
    assert favor.output_shape_ == (5,) and favor.name == "attention"
    assert favor.num_features == 32 and favor.seed == 1
    assert isinstance(favor.kernel_regularizer, keras.regularizers.L2)
    for mine, theirs in zip(
        favor.get_weights()[2:], mha.get_weights(), strict=True
    ):
        np.testing.assert_array_equal(mine, theirs)


def test_converted_layer_computes_favor_attention_on_the_copied_heads(rng):
    """The converted layer is FAVOR+ over MultiHeadAttention's own query,
    key and value projections: equal to the quadratic form with the same
    features on those heads, and close to softmax attention at small
    logits."""
    mha = built_mha(rng)
    favor = convert.from_multi_head_attention(
        mha, num_features=FEATURES, seed=0
    )
    x = data(rng) * 0.3
    # The heads of MultiHeadAttention's own sub-layers, in float64.
    attended = reference.quadratic_feature_attention(
        favor, *reference.heads(mha, x, x)
    )
    want = mha.output_dense(
        np.transpose(attended, (0, 2, 1, 3)).astype("float32")
    )
    got = np.asarray(favor(x, x))
    np.testing.assert_allclose(got, want, atol=1e-5)
    exact = np.asarray(mha(x, x))
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.1


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"use_gate": True}, "use_gate"),
        ({"attention_axes": (2,)}, "attention_axes"),
    ],
)
def test_options_without_a_linear_time_form_raise(rng, kwargs, option):
    if option == "attention_axes":
        mha = keras.layers.MultiHeadAttention(2, 8, **kwargs)
        mha.build((2, 3, 4, DIM), (2, 3, 4, DIM))
    else:
        mha = built_mha(rng, **kwargs)
    with pytest.raises(ValueError, match=f"`{option}="):
        convert.from_multi_head_attention(mha)


def test_sliding_window_raises(rng):
    mha = keras.layers.MultiHeadAttention(2, 8, sliding_window=3)
    with pytest.raises(ValueError, match="`sliding_window=3`"):
        convert.from_multi_head_attention(mha)
    with pytest.raises(ValueError, match="MultiHeadAttention"):
        convert.from_multi_head_attention(keras.layers.Dense(3))


@keras.saving.register_keras_serializable(package="test_convert")
class HoldsAttention(keras.layers.Layer):
    """A custom pre-norm block that holds its attention as an attribute
    and creates it in `build`, as keras-hub's Transformer layers do."""

    def __init__(self, causal=False, **kwargs):
        super().__init__(**kwargs)
        self.causal = causal

    def build(self, input_shape):
        self.norm = keras.layers.LayerNormalization()
        self.norm.build(input_shape)
        self._self_attention_layer = keras.layers.MultiHeadAttention(2, 8)
        self._self_attention_layer.build(input_shape, input_shape)
        self.gain = self.add_weight(shape=(input_shape[-1],), name="gain")

    def call(self, x):
        y = self.norm(x)
        return x + self.gain * self._self_attention_layer(
            y, y, use_causal_mask=self.causal
        )

    def get_config(self):
        return {**super().get_config(), "causal": self.causal}


def model_with_attention_everywhere(rng):
    """A functional model with a direct causal MultiHeadAttention, one held
    by a custom layer, and one inside a nested sequential model."""
    inputs = keras.Input((None, DIM))
    x = keras.layers.Dense(DIM, name="input_dense")(inputs)
    x = x + keras.layers.MultiHeadAttention(2, 8, name="direct")(
        x, x, use_causal_mask=True
    )
    x = HoldsAttention(causal=True, name="held")(x)
    nested = keras.Sequential(
        [keras.Input((None, DIM)), HoldsAttention(name="held_in_nested")],
        name="nested",
    )
    outputs = keras.layers.Dense(3, name="head")(nested(x))
    model = keras.Model(inputs, outputs)
    for weight in model.weights:
        weight.assign(rng.normal(size=weight.shape).astype("float32") * 0.3)
    return model


def layers_of(model, cls):
    """Every layer of class `cls` in `model`, its nested models and the
    layers' attributes (also in lists, tuples and dicts), once each."""
    found, seen, stack = [], set(), list(model.layers)
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, (list, tuple)):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, keras.layers.Layer):
            if isinstance(value, cls):
                found.append(value)
            stack.extend(vars(value).values())
            if isinstance(value, keras.Model):
                stack.extend(value.layers)
    return found


def count(model, cls):
    return len(layers_of(model, cls))


def test_performerize_swaps_every_attention_and_keeps_every_other_weight(rng):
    model = model_with_attention_everywhere(rng)
    before = [w.copy() for w in model.get_weights()]
    x = data(rng)
    original_outputs = np.asarray(model(x))
    performer = convert.performerize(model, num_features=FEATURES, seed=0)
    assert count(model, keras.layers.MultiHeadAttention) == 3
    assert count(performer, keras.layers.MultiHeadAttention) == 0
    assert count(performer, keras_favor.FavorAttention) == 3
    # The original is untouched.
    for old, now in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, now)
    np.testing.assert_array_equal(np.asarray(model(x)), original_outputs)
    # Every weight but the projections and redraw counts equals the
    # original's: the performer's weights, those two left out, are the
    # original's in the same order.
    favor_only = {
        id(v)
        for layer in layers_of(performer, keras_favor.FavorAttention)
        for v in (layer.projection, layer.redraw_count)
    }
    kept = [w for w in performer.weights if id(w) not in favor_only]
    assert len(kept) == len(model.weights)
    for mine, theirs in zip(
        sorted(np.asarray(w).tobytes() for w in kept),
        sorted(np.asarray(w).tobytes() for w in model.weights),
    ):
        assert mine == theirs
    assert np.all(np.isfinite(np.asarray(performer(x))))


def test_performerize_keeps_causal_attention_causal(rng):
    model = model_with_attention_everywhere(rng)
    performer = convert.performerize(model, num_features=FEATURES, seed=0)
    x = data(rng, batch=1)
    changed = x.copy()
    changed[:, 5:] += 10.0
    # "nested" is bidirectional: compare the causal part before it.
    causal_part = keras.Model(
        performer.inputs, performer.get_layer("held").output
    )
    # Both sequences in one batch: one call.
    outputs = np.asarray(causal_part(np.concatenate([x, changed])))
    np.testing.assert_allclose(outputs[1, :5], outputs[0, :5], atol=1e-5)


def test_predicate_chooses_the_layers(rng):
    model = model_with_attention_everywhere(rng)
    performer = convert.performerize(
        model, predicate=lambda mha: mha.name == "direct"
    )
    assert count(performer, keras_favor.FavorAttention) == 1
    assert count(performer, keras.layers.MultiHeadAttention) == 2


@pytest.mark.integration
def test_performerized_model_saves_loads_and_trains(rng, tmp_path):
    model = model_with_attention_everywhere(rng)
    performer = convert.performerize(model, num_features=FEATURES, seed=0)
    x = data(rng)
    path = str(tmp_path / "performer.keras")
    performer.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded(x), performer(x), atol=1e-6)
    loaded.compile("adam", "mse")
    targets = rng.normal(size=(2, 7, 3)).astype("float32")
    # Each loss is the one before that step's update.
    losses = [loaded.train_on_batch(x, targets) for _ in range(10)]
    assert losses[-1] < losses[0]


def test_performerize_needs_a_built_keras_model():
    with pytest.raises(ValueError, match="keras.Model"):
        convert.performerize(keras.layers.Dense(2))
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="built"):
        convert.performerize(unbuilt)


@keras.saving.register_keras_serializable(package="test_convert")
class MaskedAttention(keras.layers.Layer):
    """Self-attention that takes the Keras padding mask of its input."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True
        self.attention = keras.layers.MultiHeadAttention(2, 8)

    def build(self, input_shape):
        self.attention.build(input_shape, input_shape)

    def call(self, x, mask=None):
        return self.attention(x, x, query_mask=mask, value_mask=mask)


def test_keras_masks_still_reach_a_wrapped_layer(rng):
    inputs = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(20, DIM, mask_zero=True)(inputs)
    outputs = MaskedAttention()(x)
    model = keras.Model(inputs, outputs)
    performer = convert.performerize(model, num_features=FEATURES, seed=0)
    padded = np.array([[3, 4, 5, 0, 0, 0, 0], [6, 7, 8, 0, 0, 0, 0]])
    # Padding invariance holds only if the mask reaches the attention: the
    # padding's embeddings would otherwise be keys of the real positions.
    np.testing.assert_allclose(
        np.asarray(performer(padded))[:, :3],
        np.asarray(performer(padded[:, :3])),
        atol=1e-6,
    )


def test_exact_performer_language_model_converts_to_favor_blocks_that_decode(
    rng,
):
    teacher = keras_favor.build_performer(
        vocabulary_size=40,
        max_length=24,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=16,
        task="language_model",
        attention="exact",
        seed=0,
    )
    performer = convert.performerize(teacher, num_features=FEATURES, seed=3)
    old_blocks = layers_of(teacher, keras_favor.layers.PerformerBlock)
    new_blocks = layers_of(performer, keras_favor.layers.PerformerBlock)
    assert len(new_blocks) == len(old_blocks) == 2
    for old, new in zip(old_blocks, new_blocks):
        # The block's own FavorAttention, converted as one layer would be.
        assert new.attention == "favor"
        assert new.attention_layer.num_features == FEATURES
        expected = convert.from_multi_head_attention(
            old.attention_layer, num_features=FEATURES, seed=3
        )
        for mine, theirs in zip(
            new.attention_layer.get_weights(),
            expected.get_weights(),
            strict=True,
        ):
            np.testing.assert_array_equal(mine, theirs)
        for name in (
            "attention_norm",
            "intermediate_dense",
            "output_dense",
            "feedforward_norm",
        ):
            for mine, theirs in zip(
                getattr(new, name).get_weights(),
                getattr(old, name).get_weights(),
                strict=True,
            ):
                np.testing.assert_array_equal(mine, theirs)
    # Cached greedy decoding gives the tokens of full passes: each new
    # token is the most likely one after the tokens before it. The model is
    # causal, so one full pass over the tokens gives at each position what
    # a pass over the tokens up to it would (and a leak of later tokens
    # into the full pass would not match the cache, which cannot leak).
    prompts = rng.integers(1, 40, (2, 3))
    tokens = np.asarray(keras_favor.generate(performer, prompts, 5))
    np.testing.assert_array_equal(tokens[:, :3], prompts)
    logits = np.asarray(performer(tokens[:, :-1]))
    np.testing.assert_array_equal(tokens[:, 3:], logits[:, 2:].argmax(-1))


@keras.saving.register_keras_serializable(package="test_convert")
class AttendsAndPools(keras.layers.Layer):
    """Holds an attention narrower than its input and returns the attended
    sequence and its mean over the positions: outputs of other shapes than
    its input."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(
            2, 8, output_shape=(5,)
        )

    def build(self, input_shape):
        self.attention.build(input_shape, input_shape)

    def call(self, x):
        attended = self.attention(x, x)
        return attended, keras.ops.mean(attended, axis=1)


def test_wrapped_layer_builds_on_an_unknown_length_with_the_original_specs():
    """A wrapped layer in a functional model on `keras.Input((None, dim))`
    has the outputs of the layer it replaces: the unknown axes stay
    unknown, the others and the dtype are the traced ones."""
    keras.config.set_dtype_policy("mixed_bfloat16")
    inputs = keras.Input((None, DIM))
    model = keras.Model(inputs, AttendsAndPools(name="pools")(inputs))
    performer = convert.performerize(model, num_features=FEATURES, seed=0)
    assert isinstance(performer.get_layer("pools"), convert.PerformerizedLayer)

    def specs(model):
        return [(tuple(t.shape), t.dtype) for t in model.outputs]

    assert specs(performer) == specs(model)
    assert specs(performer) == [
        ((None, None, 5), "bfloat16"),
        ((None, 5), "bfloat16"),
    ]


# --- attention held in other ways; errors that name what failed ------------


def randomized(model, rng):
    for weight in model.weights:
        weight.assign(rng.normal(size=weight.shape).astype("float32") * 0.3)
    return model


def functional(layer):
    inputs = keras.Input((None, DIM))
    return keras.Model(inputs, layer(inputs))


def assert_exact_conversion_round_trips(model, rng, tmp_path):
    """`performerize(model)` with a local window over every key, which
    makes FAVOR+ exact softmax attention, gives the original's outputs,
    keeps no MultiHeadAttention, and saves and loads."""
    length = 7
    performer = convert.performerize(
        model, num_features=FEATURES, seed=0, local_window=length
    )
    assert count(performer, keras.layers.MultiHeadAttention) == 0
    assert count(performer, keras_favor.FavorAttention) == count(
        model, keras.layers.MultiHeadAttention
    )
    x = data(rng, length=length)
    np.testing.assert_allclose(performer(x), model(x), atol=1e-5)
    path = str(tmp_path / "performer.keras")
    performer.save(path)
    loaded = keras.saving.load_model(path)
    assert count(loaded, keras.layers.MultiHeadAttention) == 0
    np.testing.assert_allclose(loaded(x), performer(x), atol=1e-6)


@keras.saving.register_keras_serializable(package="test_convert")
class SubclassedAttention(keras.Model):
    """A subclassed model, built by running its `call`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(2, 8)
        self.dense = keras.layers.Dense(DIM)

    def call(self, x):
        return self.dense(x) + self.attention(x, x)


def test_subclassed_model_nested_in_a_functional_model_converts(rng, tmp_path):
    model = randomized(functional(SubclassedAttention(name="sub")), rng)
    assert_exact_conversion_round_trips(model, rng, tmp_path)


@keras.saving.register_keras_serializable(package="test_convert")
class AttentionInCollection(keras.layers.Layer):
    """Two attention layers in a list, tuple or dict attribute, the second
    one of them inside a nested list."""

    def __init__(self, kind="list", **kwargs):
        super().__init__(**kwargs)
        self.kind = kind
        first = keras.layers.MultiHeadAttention(2, 8)
        second = [keras.layers.MultiHeadAttention(1, 4)]
        self.heads = {
            "list": [first, second],
            "tuple": (first, second),
            "dict": {"first": first, "second": second},
        }[kind]

    def _attentions(self):
        heads = self.heads.values() if self.kind == "dict" else self.heads
        first, (second,) = heads
        return first, second

    def build(self, input_shape):
        for attention in self._attentions():
            attention.build(input_shape, input_shape)

    def call(self, x):
        first, second = self._attentions()
        return first(x, x) + second(x, x, use_causal_mask=True)

    def get_config(self):
        return {**super().get_config(), "kind": self.kind}


@pytest.mark.parametrize("kind", ["list", "tuple", "dict"])
def test_attention_in_list_tuple_and_dict_attributes_converts(
    rng, tmp_path, kind
):
    model = randomized(functional(AttentionInCollection(kind)), rng)
    assert count(model, keras.layers.MultiHeadAttention) == 2
    assert_exact_conversion_round_trips(model, rng, tmp_path)


def test_a_model_without_multi_head_attention_raises_naming_its_layers(rng):
    inputs = keras.Input((None, DIM))
    dot = keras.layers.Attention(name="dot_product")([inputs, inputs])
    with pytest.raises(ValueError, match="Attention 'dot_product'"):
        convert.performerize(keras.Model(inputs, dot))
    plain = functional(keras.layers.Dense(3))
    with pytest.raises(ValueError, match="no attention layer"):
        convert.performerize(plain)
    model = model_with_attention_everywhere(rng)
    with pytest.raises(ValueError, match="`predicate` accepts none.*direct"):
        convert.performerize(model, predicate=lambda mha: False)


@keras.saving.register_keras_serializable(package="test_convert")
class HoldsAFunctionalModel(keras.layers.Layer):
    """Holds its attention inside a functional model, whose graph fixes
    its layers."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        inputs = keras.Input((None, DIM))
        attention = keras.layers.MultiHeadAttention(2, 8, name="deep")
        self.inner = keras.Model(inputs, attention(inputs, inputs))

    def call(self, x):
        return self.inner(x)


def test_attention_that_cannot_be_swapped_raises_naming_its_path():
    model = functional(HoldsAFunctionalModel(name="holder"))
    with pytest.raises(ValueError, match=r"`holder\.inner\.deep`"):
        convert.performerize(model)


class BadConfig(keras.layers.Layer):
    """A layer whose config does not rebuild it."""

    def __init__(self, scale, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(scale, int):
            raise ValueError(f"`scale` must be an int. Received: {scale!r}")
        self.scale = scale

    def call(self, x):
        return x * self.scale

    def get_config(self):
        return {**super().get_config(), "scale": str(self.scale)}


def test_errors_name_the_layer_that_failed_not_the_model_kind(rng):
    inputs = keras.Input((None, DIM))
    gated = keras.layers.MultiHeadAttention(2, 8, use_gate=True, name="gated")
    model = keras.Model(inputs, gated(inputs, inputs))
    with pytest.raises(ValueError, match="'gated'.*`use_gate=True`") as error:
        convert.performerize(model)
    assert "functional and sequential" not in str(error.value)
    x = keras.layers.MultiHeadAttention(2, 8)(inputs, inputs)
    model = keras.Model(inputs, BadConfig(2, name="bad_config")(x))
    with pytest.raises(ValueError, match="(?s)'bad_config'.*`scale`") as error:
        convert.performerize(model)
    assert "functional and sequential" not in str(error.value)
    subclassed = SubclassedAttention()
    subclassed(data(rng))
    with pytest.raises(ValueError, match="subclassed model.*Attention"):
        convert.performerize(subclassed)


@pytest.mark.parametrize("change", ["lora", "int8"])
def test_lora_or_int8_after_conversion_saves_and_loads(rng, tmp_path, change):
    model = randomized(functional(HoldsAttention(name="held")), rng)
    performer = convert.performerize(model, num_features=FEATURES, seed=0)
    (favor,) = layers_of(performer, keras_favor.FavorAttention)
    if change == "lora":
        favor.enable_lora(2, lora_alpha=4)
        randomized(favor.query_dense, rng)  # a LoRA update that counts
    else:
        performer.quantize("int8")
    x = data(rng)
    path = str(tmp_path / "performer.keras")
    performer.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded(x), performer(x), atol=1e-6)
    (favor,) = layers_of(loaded, keras_favor.FavorAttention)
    if change == "lora":
        assert (favor.lora_rank, favor.lora_alpha) == (2, 4)
        assert favor.query_dense.lora_enabled
        assert all(
            "lora" in w.path or "gain" in w.path or "norm" in w.path
            for w in loaded.trainable_weights
        )
    else:
        for name in ("query_dense", "key_dense", "value_dense", "output_dense"):
            assert getattr(favor, name).quantization_mode == "int8", name
