"""`generate` and the cached forward pass of a language model: greedy
decoding gives the tokens of repeated full forward passes; sampling repeats
under a seed; saved and distributed models generate the same tokens; bad
arguments name themselves."""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_favor
from keras_favor import generation
from tests.language_models import MAX_LENGTH
from tests.language_models import VOCABULARY
from tests.language_models import greedy_by_full_passes
from tests.language_models import language_model
from tests.language_models import left_padded_prompts

NEW_TOKENS = 64
SAMPLED = {"sampler": "random", "temperature": 0.8, "top_k": 20, "top_p": 0.9}


@pytest.fixture(scope="module")
def one_layer_model():
    """A one-block language model, shared by the tests that do not change
    it, so that they share its compiled loops (`generate` keeps them per
    model and options)."""
    return language_model(num_layers=1)


@pytest.fixture(scope="module")
def two_layer_model():
    """A two-block language model, shared by the tests that do not change
    it."""
    return language_model()


def greedy_by_traced_full_passes(model, prompt, num_tokens):
    """`greedy_by_full_passes`, each full pass a call of one traced
    `model` (eager passes of every length take several times longer)."""
    import tensorflow as tf

    return greedy_by_full_passes(
        tf.function(model, reduce_retracing=True), prompt, num_tokens
    )


@pytest.mark.parametrize(
    "attention, api, kwargs, repeated_passes",
    [
        # Repeated eager passes of every length take minutes on JAX; the
        # other cases' one causal pass is the same criterion.
        pytest.param(
            "favor", "functional", {}, True, marks=pytest.mark.tensorflow_only
        ),
        ("favor", "sequential", {"feature_map": "relu"}, False),
        ("favor", "functional", {"local_window": 4}, False),
        ("favor", "functional", {"feature_map": "favor++"}, False),
        ("exact", "functional", {}, False),
    ],
)
def test_greedy_generate_equals_repeated_full_passes(
    attention, api, kwargs, repeated_passes
):
    model = language_model(attention, api, **kwargs)
    prompt = left_padded_prompts()
    tokens = keras_favor.generate(model, prompt, NEW_TOKENS)
    assert tokens.shape == (3, 9 + NEW_TOKENS)
    np.testing.assert_array_equal(tokens[:, :9], prompt)
    # Decoding visits many tokens, not a fixed point.
    assert len(np.unique(tokens[:, 9:])) > 10
    if repeated_passes:
        want = greedy_by_traced_full_passes(model, prompt, NEW_TOKENS)
    else:
        # One causal pass over the result gives every step's logits at once.
        logits = np.asarray(model(tokens[:, :-1]))[:, 8:]
        want = np.concatenate(
            [prompt, logits.argmax(axis=-1).astype("int32")], axis=1
        )
    np.testing.assert_array_equal(tokens, want)


def test_cached_logits_equal_the_full_pass_at_every_position(two_layer_model):
    model = two_layer_model
    prompt = left_padded_prompts()
    want = np.asarray(model(prompt))
    cache = generation.empty_cache(model, 3)
    logits, cache = generation.call_with_cache(model, prompt[:, :5], cache, 0)
    pieces = [np.asarray(logits)]
    for t in range(5, 9):
        logits, cache = generation.call_with_cache(
            model, prompt[:, t : t + 1], cache, t
        )
        pieces.append(np.asarray(logits))
    got = np.concatenate(pieces, axis=1)
    real = prompt != 0
    scale = np.max(np.abs(want[real]))
    np.testing.assert_allclose(got[real], want[real], atol=1e-5 * scale)


def test_sampling_repeats_with_a_seed_and_differs_with_another(one_layer_model):
    model = one_layer_model
    prompt = left_padded_prompts()
    first = keras_favor.generate(model, prompt, 24, seed=3, **SAMPLED)
    again = keras_favor.generate(model, prompt, 24, seed=3, **SAMPLED)
    other = keras_favor.generate(model, prompt, 24, seed=4, **SAMPLED)
    np.testing.assert_array_equal(first, again)
    assert np.mean(first[:, 9:] != other[:, 9:]) > 0.5


def test_end_token_stops_a_sequence_and_pads_it(one_layer_model):
    model = one_layer_model
    prompt = left_padded_prompts()
    greedy = keras_favor.generate(model, prompt, 16)
    end = int(greedy[0, 9 + 5])
    tokens = keras_favor.generate(model, prompt, 16, end_token_id=end)
    for row in range(3):
        new = greedy[row, 9:]
        stops = np.flatnonzero(new == end)
        cut = stops[0] + 1 if stops.size else new.size
        np.testing.assert_array_equal(tokens[row, 9 : 9 + cut], new[:cut])
        assert np.all(tokens[row, 9 + cut :] == 0)
    assert tokens.shape == greedy.shape


def test_keras_file_round_trip_generates_the_same_tokens(
    tmp_path, one_layer_model
):
    model = one_layer_model
    prompt = left_padded_prompts()
    path = str(tmp_path / "lm.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        keras_favor.generate(loaded, prompt, 32),
        keras_favor.generate(model, prompt, 32),
    )


@pytest.mark.tensorflow_only
def test_model_built_under_mirrored_strategy_generates_the_same_tokens(
    one_layer_model,
):
    import tensorflow as tf

    model = one_layer_model
    with tf.distribute.MirroredStrategy().scope():
        mirrored = language_model(num_layers=1)
    mirrored.set_weights(model.get_weights())
    prompt = left_padded_prompts()
    np.testing.assert_array_equal(
        keras_favor.generate(mirrored, prompt, 32),
        keras_favor.generate(model, prompt, 32),
    )


def test_xla_compiled_loop_gives_the_same_tokens(one_layer_model):
    model = one_layer_model
    prompt = left_padded_prompts()
    np.testing.assert_array_equal(
        keras_favor.generate(model, prompt, 16, jit_compile=True),
        keras_favor.generate(model, prompt, 16),
    )


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": MAX_LENGTH}, "max_length"),
        ({"sampler": "beam"}, "sampler"),
        ({"sampler": "random", "temperature": 0}, "temperature"),
        ({"sampler": "random", "top_k": 0}, "top_k"),
        ({"sampler": "random", "top_k": VOCABULARY + 1}, "top_k"),
        ({"sampler": "random", "top_p": 0}, "top_p"),
        ({"sampler": "random", "top_p": 1.5}, "top_p"),
        ({"temperature": 0.5}, "sampler='random'"),
        ({"end_token_id": 1.5}, "end_token_id"),
    ],
)
def test_bad_generate_arguments_name_themselves(
    kwargs, pattern, two_layer_model
):
    model = two_layer_model
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        keras_favor.generate(model, left_padded_prompts(), **kwargs)


def test_bad_prompts_and_cache_positions_raise(two_layer_model):
    model = two_layer_model
    with pytest.raises(ValueError, match="max_length"):
        keras_favor.generate(model, np.ones((1, MAX_LENGTH + 1), "int32"), 1)
    with pytest.raises(ValueError, match="prompt_ids"):
        keras_favor.generate(model, np.ones((4,), "int32"), 1)
    cache = generation.empty_cache(model, 1)
    with pytest.raises(ValueError, match="max_length"):
        generation.call_with_cache(
            model, np.ones((1, 2), "int32"), cache, MAX_LENGTH - 1
        )
    with pytest.raises(ValueError, match="one cache per PerformerBlock"):
        generation.call_with_cache(
            model, np.ones((1, 2), "int32"), cache[:1], 0
        )
    with pytest.raises(ValueError, match=r"cache\[0\]"):
        generation.call_with_cache(model, np.ones((2, 2), "int32"), cache, 0)
    classifier = keras_favor.build_performer(VOCABULARY, MAX_LENGTH)
    with pytest.raises(ValueError, match="causal language model"):
        keras_favor.generate(classifier, left_padded_prompts(), 4)


SERVED_CLIENT = """
import json, sys
import tensorflow as tf
served, results = {}, []
for path, prompt, count, seed in json.loads(sys.argv[1]):
    if path not in served:
        served[path] = tf.saved_model.load(path)
    try:
        tokens = served[path].generate(
            tf.constant(prompt, tf.int32), tf.constant(count, tf.int32),
            tf.constant(seed, tf.int64),
        )
        results.append({"tokens": tokens.numpy().tolist()})
    except tf.errors.OpError as error:
        results.append({"error": type(error).__name__, "message": str(error)})
print(json.dumps({
    "results": results,
    "keras_favor_imported": any(m.startswith("keras_favor") for m in sys.modules),
}))
"""


def served_generate(requests):
    """The exported `generate` endpoints, run by one TensorFlow-only client
    process that does not import keras_favor: for each `(path, prompt,
    max_new_tokens, seed)` request, `{"tokens": ...}` or, where the endpoint
    raised a TensorFlow error, `{"error": class name, "message": ...}`."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    env.pop("PYTHONPATH", None)
    requests = [
        [path, np.asarray(prompt).tolist(), count, seed]
        for path, prompt, count, seed in requests
    ]
    result = subprocess.run(
        [sys.executable, "-c", SERVED_CLIENT, json.dumps(requests)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(requests[0][0]),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert not output["keras_favor_imported"]
    return output["results"]


@pytest.mark.tensorflow_only
def test_exported_generate_endpoints_when_served(
    tmp_path, capsys, one_layer_model
):
    """Two exported models, served by one client process (each export and
    client start costs seconds): a sampled endpoint gives `generate`'s
    tokens for its seed, also for a one-token prompt (the prefill is that
    token alone), and its `serve` gives the model's logits; a
    mixed_float16 model's greedy endpoint keeps a float32 state, giving
    the tokens of repeated full passes, for both prompts too; and the
    endpoint checks the lengths, which only a run knows."""
    import tensorflow as tf

    model = one_layer_model
    prompt = left_padded_prompts()
    one_token = prompt[:1, -1:]
    sampled = str(tmp_path / "sampled")
    generation.export_language_model(model, sampled, **SAMPLED, verbose=True)
    requests, expected = [], []
    for tokens, count in ((prompt, 20), (one_token, 5)):
        requests.append((sampled, tokens, count, [7, 0]))
        expected.append(
            keras_favor.generate(model, tokens, count, seed=7, **SAMPLED)
        )
    # The export printed its endpoints; its `serve` gives the model's
    # logits.
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2:] == [
        "* serve(args_0: int32 (None, None))",
        "* generate(prompt_ids: int32 (None, None), max_new_tokens: int32 (), "
        "seed: int64 (2,))",
    ]
    served = tf.saved_model.load(sampled)
    np.testing.assert_allclose(
        served.serve(tf.constant(prompt, tf.int32)).numpy(),
        keras.ops.convert_to_numpy(model(prompt)),
        rtol=1e-5,
        atol=1e-5,
    )
    keras.config.set_dtype_policy("mixed_float16")
    mixed = language_model(num_layers=1)
    path = str(tmp_path / "mixed")
    generation.export_language_model(mixed, path)
    for tokens, count in ((prompt, 12), (one_token, 5)):
        requests.append((path, tokens, count, [0, 0]))
        expected.append(greedy_by_full_passes(mixed, tokens, count))
    keras.config.set_dtype_policy("float32")
    # The prompt and the new tokens past `max_length`; no new token.
    failing = [((1, 90), 10, "max_length"), ((1, 9), 0, "max_new_tokens")]
    for shape, count, _ in failing:
        requests.append((sampled, np.ones(shape, "int32"), count, [0, 0]))

    results = served_generate(requests)
    for result, want in zip(results, expected):
        assert "tokens" in result, result
        np.testing.assert_array_equal(np.array(result["tokens"]), want)
    for result, (_, _, pattern) in zip(
        results[len(expected) :], failing, strict=True
    ):
        assert result.get("error") == "InvalidArgumentError", result
        assert re.search(pattern, result["message"]), result["message"]
