"""keras-hub's own `generate()` on converted CausalLMs, with the FAVOR+
recurrent state as the cache: greedy tokens against repeated full
forward passes of the converted model, keras-hub's samplers, a
preprocessor's strings."""

import string

import keras
import keras_hub
import numpy as np
import pytest

from keras_favor.convert import performerize
from keras_favor.keras_hub import FavorCausalLM
from keras_favor.keras_hub.favor_causal_lm import sampler_next

LENGTH = 10
# Prompts of different lengths, right-padded as keras-hub's preprocessors
# pad them: the generation starts at the shortest prompt's end and feeds
# the longer prompts' remaining tokens one by one.
PROMPT_LENGTHS = (3, 5, 1, 7)


def converted_causal_lm(family="GPT2", vocabulary_size=50, **favor_options):
    keras.utils.set_random_seed(0)
    backbone = getattr(keras_hub.models, family + "Backbone")(
        vocabulary_size=vocabulary_size,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=16,
    )
    task = getattr(keras_hub.models, family + "CausalLM")(
        backbone=backbone, preprocessor=None
    )
    return performerize(task, **{"seed": 0, **favor_options})


def converted_gpt2(vocabulary_size=50):
    return converted_causal_lm("GPT2", vocabulary_size)


def prompts(seed=0):
    rng = np.random.RandomState(seed)
    token_ids = np.zeros((len(PROMPT_LENGTHS), LENGTH), "int32")
    padding_mask = np.zeros(token_ids.shape, bool)
    for row, length in enumerate(PROMPT_LENGTHS):
        token_ids[row, :length] = rng.randint(1, 50, length)
        padding_mask[row, :length] = True
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def greedy_by_full_passes(model, inputs):
    """Each sequence continued one token at a time, each token the argmax
    of a full forward pass of `model` over the sequence so far (one pass
    per position, over every sequence at once, each with its own mask)."""
    token_ids = inputs["token_ids"].copy()
    lengths = inputs["padding_mask"].sum(axis=1)
    length = token_ids.shape[1]
    for position in range(max(lengths.min(), 1), length):
        mask = np.arange(length)[None] < position
        logits = model(
            {
                "token_ids": token_ids,
                "padding_mask": mask.repeat(len(token_ids), 0),
            }
        )
        rows = lengths <= position
        token_ids[rows, position] = np.argmax(
            np.asarray(logits)[rows, position - 1], axis=-1
        )
    return token_ids


def generate(model, inputs, sampler):
    """`model.generate`'s tokens with `sampler`. A model already compiled
    with the greedy sampler is not compiled again, so that it keeps its
    traced generation."""
    if sampler != "greedy" or not isinstance(
        getattr(model, "sampler", None), keras_hub.samplers.GreedySampler
    ):
        model.compile(sampler=sampler)
    return np.asarray(model.generate(inputs, stop_token_ids=None)["token_ids"])


@pytest.fixture(scope="module")
def greedy_runs():
    """`run(family, **favor_options)`: a converted CausalLM and its greedy
    tokens of `prompts()`, built and generated once per module. The tests
    may compile the model with other samplers; none changes its weights."""
    runs = {}

    def run(family="GPT2", **favor_options):
        key = (family, tuple(sorted(favor_options.items())))
        if key not in runs:
            model = converted_causal_lm(family, **favor_options)
            runs[key] = model, generate(model, prompts(), "greedy")
        return runs[key]

    return run


@pytest.mark.parametrize(
    "family, favor_options",
    [("GPT2", {}), ("GPT2", {"local_window": 3}), ("OPT", {})],
)
def test_greedy_generate_equals_argmax_of_repeated_full_passes(
    family, favor_options, greedy_runs
):
    model, tokens = greedy_runs(family, **favor_options)
    assert isinstance(model, getattr(keras_hub.models, family + "CausalLM"))
    assert isinstance(model, FavorCausalLM)
    np.testing.assert_array_equal(
        tokens, greedy_by_full_passes(model, prompts())
    )


def left_padded_prompts(seed=0, lengths=(3, 5, 4, 7)):
    """Prompts of `lengths`, each ending at position 7: keras-hub's
    generate fills every masked position from the shortest prompt's end on
    (here position 3), and leaves the masked ones before it as padding."""
    rng = np.random.RandomState(seed)
    token_ids = np.zeros((len(lengths), LENGTH), "int32")
    padding_mask = np.zeros(token_ids.shape, bool)
    for row, length in enumerate(lengths):
        token_ids[row, 7 - length : 7] = rng.randint(1, 50, length)
        padding_mask[row, 7 - length : 7] = True
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def filling_mask(prompt_mask, row, position):
    """The keys a full pass reads to predict `position` in keras-hub's
    generate: the prompt's tokens, those generated so far (from the
    shortest prompt's end on), and the token before it (which generate
    feeds to predict it, even where the prompt marks it as padding)."""
    first_free = prompt_mask.sum(axis=1).min()
    positions = np.arange(LENGTH)
    mask = (positions < position) & (
        prompt_mask[row] | (positions >= first_free)
    )
    mask[position - 1] = True
    return mask


def test_greedy_generate_of_left_padded_prompts_equals_full_passes(greedy_runs):
    """Padding before the prompts: the padding before the shortest
    prompt's end never enters the state; the later masked positions are
    generated, as keras-hub's generate treats them. The tokens, and the
    logits of every step of the sampler's `next` along them, are those of
    full passes: every position that is not generated keeps the input's
    token, and each generated one is the argmax of a full pass over
    `filling_mask` of the tokens before it, so that, position by position,
    the tokens are greedy decoding by full passes."""
    model, _ = greedy_runs()
    inputs = left_padded_prompts()
    prompt_mask = inputs["padding_mask"]
    tokens = generate(model, inputs, "greedy")
    first_free = int(prompt_mask.sum(axis=1).min())
    generated = ~prompt_mask & (np.arange(LENGTH) >= first_free)
    np.testing.assert_array_equal(
        tokens[~generated], inputs["token_ids"][~generated]
    )
    _, cache = model._prefill(tokens, prompt_mask, first_free)
    step = sampler_next(model._feed, prompt_mask, first_free)
    for position in range(first_free, LENGTH):
        logits, _, cache = step(tokens, cache, position)
        masks = np.stack(
            [
                filling_mask(prompt_mask, row, position)
                for row in range(len(tokens))
            ]
        )
        full = np.asarray(model({"token_ids": tokens, "padding_mask": masks}))[
            :, position - 1
        ]
        np.testing.assert_allclose(
            np.asarray(logits), full, atol=1e-5, err_msg=f"position {position}"
        )
        rows = generated[:, position]
        np.testing.assert_array_equal(
            tokens[rows, position],
            np.argmax(full[rows], axis=-1),
            err_msg=f"position {position}",
        )


def test_prefilled_state_holds_each_real_prompt_position_once(greedy_runs):
    """After the prefill (positions 0 and 1, padding masked per sequence)
    and the token at position 2, the logits are a full forward pass's with
    the same padding mask: each real position entered the state once, and
    padding never."""
    model, _ = greedy_runs()
    inputs = prompts()
    padding_mask = inputs["padding_mask"].copy()
    padding_mask[1, 0] = False  # padding inside the prefix (left padding)
    _, state = model._prefill(inputs["token_ids"], padding_mask, 3)
    logits, _, _ = model._feed(
        inputs["token_ids"], state, 2, np.ones(len(PROMPT_LENGTHS), bool)
    )
    fed = padding_mask.copy()
    fed[:, 2] = True  # position 2 was fed as a real token in every row
    full = model({"token_ids": inputs["token_ids"], "padding_mask": fed})
    np.testing.assert_allclose(
        np.asarray(logits)[:, 0], np.asarray(full)[:, 2], atol=1e-5
    )


@pytest.mark.integration
def test_sampling_samplers_keep_prompts_and_agree_with_greedy_at_the_limit(
    greedy_runs,
):
    model, greedy = greedy_runs()
    inputs = prompts()
    # One candidate (top-k with k=1, top-p with a tiny p) is greedy.
    for sampler in (
        keras_hub.samplers.TopKSampler(k=1, seed=0),
        keras_hub.samplers.TopPSampler(p=1e-6, seed=0),
        keras_hub.samplers.BeamSampler(num_beams=1),
    ):
        np.testing.assert_array_equal(generate(model, inputs, sampler), greedy)
    # A sampler that draws: the samplers differ only in how they pick a
    # token from the logits, which the converted model serves from the
    # same cache for each of them.
    tokens = generate(
        model, inputs, keras_hub.samplers.TopKSampler(k=5, seed=0)
    )
    mask = inputs["padding_mask"]
    np.testing.assert_array_equal(tokens[mask], inputs["token_ids"][mask])
    assert tokens.min() >= 0 and tokens.max() < 50


def test_generate_from_strings_through_a_preprocessor():
    letters = list(string.ascii_lowercase)
    vocabulary = {"<|endoftext|>": 0}
    for token in letters + ["\u0120" + letter for letter in letters]:
        vocabulary[token] = len(vocabulary)
    vocabulary["ab"] = len(vocabulary)
    tokenizer = keras_hub.models.GPT2Tokenizer(
        vocabulary=vocabulary, merges=["a b"]
    )
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=LENGTH
    )
    model = converted_gpt2(vocabulary_size=len(vocabulary))
    model.preprocessor = preprocessor
    model.compile(sampler="greedy")
    outputs = model.generate(["ab c", "d"], stop_token_ids=None)
    # The strings of greedy decoding by full passes over the preprocessed
    # ids, through the same postprocessing.
    ids = preprocessor.generate_preprocess(["ab c", "d"])
    ids = {key: np.asarray(value) for key, value in ids.items()}
    expected = preprocessor.generate_postprocess(
        {
            "token_ids": greedy_by_full_passes(model, ids),
            "padding_mask": np.ones_like(ids["padding_mask"]),
        }
    )
    assert list(outputs) == [
        text.decode() if isinstance(text, bytes) else text
        for text in np.asarray(expected).tolist()
    ]


@pytest.mark.integration
def test_loaded_causal_lm_generates_as_before(tmp_path, greedy_runs):
    model, expected = greedy_runs("OPT")
    inputs = prompts()
    model.save(tmp_path / "opt.keras")
    loaded = keras.saving.load_model(tmp_path / "opt.keras")
    assert type(loaded) is type(model)
    np.testing.assert_array_equal(generate(loaded, inputs, "greedy"), expected)


def test_bart_greedy_generate_equals_argmax_of_repeated_full_passes():
    """The encoder runs once and is reduced once to the cross-attentions'
    static caches; each decoder position enters the state once."""
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BartBackbone(
        vocabulary_size=50,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=16,
    )
    task = performerize(
        keras_hub.models.BartSeq2SeqLM(backbone=backbone, preprocessor=None),
        seed=0,
    )
    assert isinstance(task, keras_hub.models.BartSeq2SeqLM)
    decoder, encoder = prompts(), prompts(seed=1)
    inputs = {
        "encoder_token_ids": encoder["token_ids"],
        "encoder_padding_mask": encoder["padding_mask"],
        "decoder_token_ids": decoder["token_ids"],
        "decoder_padding_mask": decoder["padding_mask"],
    }
    # The steps' cache holds the key sums and no encoder position.
    encoded = task.call_encoder(encoder["token_ids"], encoder["padding_mask"])
    held, sums = task._cross_attention_caches(encoded, encoder["padding_mask"])
    assert held.shape[1] == 0 and tuple(sums.shape[:2]) == (
        len(PROMPT_LENGTHS),
        1,
    )
    task.compile(sampler="greedy")
    tokens = task.generate(inputs, stop_token_ids=None)["decoder_token_ids"]
    # Greedy decoding by full passes of the task, one per position over
    # every sequence at once.
    expected = decoder["token_ids"].copy()
    lengths = decoder["padding_mask"].sum(axis=1)
    for position in range(lengths.min(), LENGTH):
        logits = task(
            {
                "encoder_token_ids": encoder["token_ids"],
                "encoder_padding_mask": encoder["padding_mask"],
                "decoder_token_ids": expected,
                "decoder_padding_mask": (
                    np.arange(LENGTH)[None] < position
                ).repeat(len(expected), 0),
            }
        )
        rows = lengths <= position
        expected[rows, position] = np.argmax(
            np.asarray(logits)[rows, position - 1], axis=-1
        )
    np.testing.assert_array_equal(np.asarray(tokens), expected)


@pytest.fixture(scope="module")
def full_window_pair():
    """A GPT-2 CausalLM and its conversion with a window as long as the
    buffer, built once per module (the tests compile them)."""
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=16,
    )
    task = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    return task, performerize(task, local_window=LENGTH, seed=0)


@pytest.mark.parametrize(
    "sampler", ["greedy", keras_hub.samplers.BeamSampler(num_beams=3)]
)
def test_with_a_full_window_generate_equals_the_original_tasks(
    sampler, full_window_pair
):
    """With a local window as long as the buffer, FAVOR+ is exact softmax
    attention: the converted task's generation on its recurrent state
    equals keras-hub's on the original task's key/value cache (beam search
    reorders the state with its sequences)."""
    task, converted = full_window_pair
    inputs = prompts()
    np.testing.assert_array_equal(
        generate(converted, inputs, sampler), generate(task, inputs, sampler)
    )


@pytest.mark.integration
def test_mixed_precision_generate_under_xla_equals_graph_generate():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=16,
        dtype="mixed_bfloat16",
    )
    task = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    model = performerize(task, seed=0)
    inputs = prompts()
    expected = generate(model, inputs, "greedy")
    model.compile(sampler="greedy", jit_compile=True)
    tokens = model.generate(inputs, stop_token_ids=None)["token_ids"]
    np.testing.assert_array_equal(np.asarray(tokens), expected)
