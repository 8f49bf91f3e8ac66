"""Llama- and Gemma-family models of keras-hub converted to FAVOR+: the
rotary, grouped-query attention equals the original's where FAVOR+ is
exact (a local window as long as the sequence), stays causal, and the
converted CausalLMs generate through keras-hub's `generate()` on the
recurrent state."""

import keras
import keras_hub
import numpy as np
import pytest

from keras_favor.convert import performerize
from keras_favor.convert.attention_paths import all_layers
from keras_favor.keras_hub import FavorCausalLM
from keras_favor.keras_hub.favor_rotary_attention import FavorRotaryAttention
from tests.keras_hub.test_keras_hub_generate import greedy_by_full_passes

LENGTH = 8
# With a local window as long as the sequence, FAVOR+ is exact softmax
# attention: outputs equal the original's up to float32 rounding.
EXACT = dict(local_window=LENGTH, seed=0)
TOLERANCE = 1e-5
SIZES = dict(
    vocabulary_size=50,
    num_layers=2,
    num_query_heads=4,
    num_key_value_heads=2,
    hidden_dim=16,
    intermediate_dim=32,
)
FAMILIES = {
    "Llama": SIZES,
    # Llama's structure with biases on the query, key and value.
    "Qwen": SIZES,
    # Gemma's heads need not split the hidden size; its queries are scaled
    # by the hidden size per head without `query_head_dim_normalize`.
    "Gemma": dict(SIZES, head_dim=8, query_head_dim_normalize=False),
}
GENERATION_LENGTH = 10
PROMPT_LENGTHS = (3, 5, 1, 7)


def backbone(family, **overrides):
    keras.utils.set_random_seed(0)
    model = getattr(keras_hub.models, family + "Backbone")(
        **{**FAMILIES[family], **overrides}
    )
    # Biases start at zero: random ones show whether they are kept.
    rng = np.random.RandomState(1)
    for weight in model.weights:
        if weight.name == "bias":
            weight.assign(rng.normal(size=weight.shape).astype("float32"))
    return model


def token_inputs(seed=0):
    rng = np.random.RandomState(seed)
    padding_mask = np.ones((2, LENGTH), bool)
    padding_mask[1, LENGTH - 3 :] = False
    return {
        "token_ids": rng.randint(1, 50, (2, LENGTH)).astype("int32"),
        "padding_mask": padding_mask,
    }


def attention_layers(model, names=("Attention",)):
    return [
        layer
        for _, layer in all_layers(model)
        if type(layer).__name__.endswith(names)
    ]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rotary_backbone_converts_and_equals_the_original(family):
    original = backbone(family)
    converted = performerize(original, **EXACT)
    assert type(converted).__name__ == f"Favor{family}Backbone"
    attention = attention_layers(converted)
    assert len(attention) == 2
    assert all(isinstance(layer, FavorRotaryAttention) for layer in attention)
    # The projections are the original attention's, every other weight
    # is the original's.
    for layer, source in zip(attention, attention_layers(original)):
        for name in ("query", "key", "value", "output"):
            dense = getattr(layer, name + "_dense")
            source_dense = getattr(source, name + "_dense", None) or getattr(
                source, "_" + name + "_dense"
            )
            for weight, expected in zip(
                dense.get_weights(), source_dense.get_weights(), strict=True
            ):
                np.testing.assert_array_equal(weight, expected)
    inside = {
        id(w)
        for layers in (attention, attention_layers(original))
        for layer in layers
        for w in layer.weights
    }
    rest = {w.path: w for w in original.weights if id(w) not in inside}
    converted_rest = {
        w.path: w for w in converted.weights if id(w) not in inside
    }
    assert rest.keys() == converted_rest.keys()
    for path, weight in rest.items():
        np.testing.assert_array_equal(
            np.asarray(converted_rest[path]), np.asarray(weight)
        )
    inputs = token_inputs()
    real = inputs["padding_mask"]
    np.testing.assert_allclose(
        np.asarray(converted(inputs))[real],
        np.asarray(original(inputs))[real],
        atol=TOLERANCE,
    )
    # The original is left as it was.
    assert not any(
        isinstance(layer, FavorRotaryAttention)
        for _, layer in all_layers(original)
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_converted_rotary_backbone_stays_causal(family):
    converted = performerize(backbone(family), seed=0)  # plain FAVOR+
    inputs = token_inputs()
    changed = {key: value.copy() for key, value in inputs.items()}
    changed["token_ids"][:, 5] = changed["token_ids"][:, 5] % 49 + 1
    before, after = converted(inputs), converted(changed)
    np.testing.assert_array_equal(
        np.asarray(before)[:, :5], np.asarray(after)[:, :5]
    )
    assert not np.allclose(np.asarray(before)[0, 5:], np.asarray(after)[0, 5:])


def prompts(seed=0):
    rng = np.random.RandomState(seed)
    token_ids = np.zeros((len(PROMPT_LENGTHS), GENERATION_LENGTH), "int32")
    padding_mask = np.zeros(token_ids.shape, bool)
    for row, length in enumerate(PROMPT_LENGTHS):
        token_ids[row, :length] = rng.randint(1, 50, length)
        padding_mask[row, :length] = True
    return {"token_ids": token_ids, "padding_mask": padding_mask}


@pytest.fixture(scope="module")
def greedy_runs():
    """`run(family, **favor_options)`: the converted CausalLM, compiled with
    the greedy sampler, and its greedy tokens of `prompts()`, made once per
    module."""
    runs = {}

    def run(family, **favor_options):
        key = (family, tuple(sorted(favor_options.items())))
        if key not in runs:
            task = getattr(keras_hub.models, family + "CausalLM")(
                backbone=backbone(family), preprocessor=None
            )
            model = performerize(task, seed=0, **favor_options)
            model.compile(sampler="greedy")
            tokens = model.generate(prompts(), stop_token_ids=None)
            runs[key] = task, model, np.asarray(tokens["token_ids"])
        return runs[key]

    return run


@pytest.mark.parametrize(
    "family, favor_options",
    [
        ("Llama", {}),
        ("Llama", {"local_window": 3}),
        ("Qwen", {}),
        ("Gemma", {}),
    ],
)
def test_rotary_greedy_generate_equals_argmax_of_repeated_full_passes(
    family, favor_options, greedy_runs
):
    task, model, tokens = greedy_runs(family, **favor_options)
    assert isinstance(model, type(task)) and isinstance(model, FavorCausalLM)
    np.testing.assert_array_equal(
        tokens, greedy_by_full_passes(model, prompts())
    )


def test_custom_decoder_attention_mask_raises():
    converted = performerize(backbone("Llama"), seed=0)
    decoder = converted.transformer_layers[0]
    x = keras.random.normal((2, LENGTH, 16))
    mask = np.tril(np.ones((LENGTH, LENGTH), bool))[None].repeat(2, 0)
    with pytest.raises(ValueError, match="decoder_attention_mask"):
        decoder(x, decoder_attention_mask=mask)


@pytest.mark.parametrize(
    "family, option, value",
    [
        ("Gemma", "attention_logit_soft_cap", 50.0),
        ("Gemma", "use_sliding_window_attention", True),
        ("Qwen", "use_sliding_window_attention", True),
    ],
)
def test_option_without_a_linear_time_form_raises_naming_it(
    family, option, value
):
    with pytest.raises(ValueError, match=option.replace("attention_", "")):
        performerize(backbone(family, **{option: value}))


def test_mistral_attention_raises_naming_its_class():
    keras.utils.set_random_seed(8)
    mistral = keras_hub.models.MistralBackbone(**SIZES)
    with pytest.raises(ValueError, match="CachedMistralAttention"):
        performerize(mistral)


def test_rotary_attention_config_round_trip():
    converted = performerize(backbone("Gemma"), **EXACT)
    layer = attention_layers(converted)[0]
    clone = FavorRotaryAttention.from_config(layer.get_config())
    x = keras.random.normal((2, LENGTH, 16), seed=1)
    clone.build(x.shape)
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(np.asarray(clone(x)), np.asarray(layer(x)))
    assert clone.get_config() == layer.get_config()


@pytest.mark.integration
def test_loaded_llama_causal_lm_generates_as_before(tmp_path, greedy_runs):
    _, model, expected = greedy_runs("Llama", local_window=3)
    inputs = prompts()
    model.save(tmp_path / "llama.keras")
    loaded = keras.saving.load_model(tmp_path / "llama.keras")
    assert type(loaded) is type(model)
    loaded.compile(sampler="greedy")
    np.testing.assert_array_equal(
        np.asarray(loaded.generate(inputs, stop_token_ids=None)["token_ids"]),
        expected,
    )
