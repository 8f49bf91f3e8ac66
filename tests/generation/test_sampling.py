"""The samplers of `generate`: draws follow `softmax(logits / temperature)`
restricted to the top-k tokens and the top-p nucleus; greedy is argmax."""

import numpy as np
import pytest
from keras import ops

from keras_favor import backend
from keras_favor.generation import sampling

pytestmark = pytest.mark.backend_independent

LOGITS = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
DRAWS = 20000


def draw(temperature=1.0, top_k=None, top_p=None, seed=0):
    """`DRAWS` independent draws from the same logits (one per row)."""
    logits = ops.convert_to_tensor(
        np.tile(LOGITS, (DRAWS, 1)).astype("float32")
    )
    tokens = sampling.next_tokens(
        logits, "random", temperature, top_k, top_p, backend.seed_pair(seed)
    )
    return np.asarray(ops.convert_to_numpy(tokens))


def assert_frequencies(tokens, probabilities):
    """Each token's frequency within 5 standard deviations of a binomial
    proportion over `DRAWS` draws (a false alarm below 1e-6 per token)."""
    frequencies = np.bincount(tokens, minlength=len(LOGITS)) / DRAWS
    bound = 5 * np.sqrt(probabilities * (1 - probabilities) / DRAWS)
    assert np.all(np.abs(frequencies - probabilities) <= bound + 1e-12), (
        frequencies,
        probabilities,
    )


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_draws_follow_the_tempered_softmax(temperature):
    assert_frequencies(draw(temperature), softmax(LOGITS / temperature))


def test_top_k_draws_among_the_k_most_likely_in_proportion():
    probabilities = softmax(LOGITS)
    kept = np.where(np.arange(len(LOGITS)) < 3, probabilities, 0)
    assert_frequencies(draw(top_k=3), kept / kept.sum())


def test_top_p_draws_from_the_smallest_nucleus_reaching_p():
    # 0.4 + 0.25 = 0.65 < 0.7 <= 0.8: the nucleus is the first three.
    probabilities = softmax(LOGITS)
    kept = np.where(np.arange(len(LOGITS)) < 3, probabilities, 0)
    assert_frequencies(draw(top_p=0.7), kept / kept.sum())
    # p below the top probability keeps the most likely token alone.
    assert np.all(draw(top_p=0.1) == 0)
    # p = 1 is no restriction.
    assert_frequencies(draw(top_p=1.0), probabilities)


def test_the_same_seed_draws_the_same_tokens():
    np.testing.assert_array_equal(draw(seed=5), draw(seed=5))
    assert np.mean(draw(seed=5) != draw(seed=6)) > 0.5


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).normal(size=(7, 11)).astype("float32")
    tokens = sampling.next_tokens(
        ops.convert_to_tensor(logits), "greedy", 1.0, None, None, None
    )
    np.testing.assert_array_equal(
        ops.convert_to_numpy(tokens), logits.argmax(axis=-1)
    )
