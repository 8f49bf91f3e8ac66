"""Choosing the next token from a language model's logits.

Greedy decoding takes the most likely token. Random sampling draws from
`softmax(logits / temperature)`, restricted to the `top_k` most likely
tokens and to the smallest set of most likely tokens whose probability
reaches `top_p` (nucleus sampling, Holtzman et al., 2020), by the Gumbel-max
trick: `argmax(logits + g)` with standard Gumbel noise `g` is a draw from
`softmax(logits)`. The noise comes from a stateless seed, so the same seed
gives the same tokens.
"""

from keras import ops

from keras_favor import backend
from keras_favor.validation import is_int

SAMPLERS = ("greedy", "random")


def check_sampling(sampler, temperature, top_k, top_p, vocabulary_size):
    """A `ValueError` naming the argument unless the options are valid."""
    if sampler not in SAMPLERS:
        raise ValueError(
            f"`sampler` must be one of {list(SAMPLERS)}. Received: "
            f"sampler={sampler!r}"
        )
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not temperature > 0
    ):
        raise ValueError(
            "`temperature` must be a number > 0. Received: "
            f"temperature={temperature!r}"
        )
    if top_k is not None and (
        not is_int(top_k) or not 1 <= top_k <= vocabulary_size
    ):
        raise ValueError(
            "`top_k` must be None or an integer from 1 to the vocabulary "
            f"size ({vocabulary_size}). Received: top_k={top_k!r}"
        )
    if top_p is not None and (
        isinstance(top_p, bool)
        or not isinstance(top_p, (int, float))
        or not 0 < top_p <= 1
    ):
        raise ValueError(
            f"`top_p` must be None or a number in (0, 1]. Received: "
            f"top_p={top_p!r}"
        )
    if sampler == "greedy" and (
        temperature != 1.0 or top_k is not None or top_p is not None
    ):
        raise ValueError(
            "`temperature`, `top_k` and `top_p` shape random sampling: "
            "pass `sampler='random'` with them (greedy decoding takes the "
            "most likely token whatever they are)."
        )


def _keep_top_k(logits, top_k):
    """`logits` with all but the `top_k` largest of each row at -inf (ties
    with the `top_k`-th kept)."""
    kth = ops.top_k(logits, top_k, sorted=True)[0][:, -1:]
    return ops.where(logits >= kth, logits, -float("inf"))


def _keep_top_p(logits, top_p):
    """`logits` with all tokens outside the nucleus at -inf: the most
    likely tokens whose probabilities, added in order, first reach `top_p`
    (the most likely token is always kept)."""
    ordered = ops.sort(logits, axis=-1)[:, ::-1]
    probabilities = ops.softmax(ordered, axis=-1)
    before = ops.cumsum(probabilities, axis=-1) - probabilities
    kept = ops.where(before < top_p, ordered, float("inf"))
    threshold = ops.min(kept, axis=-1, keepdims=True)
    return ops.where(logits >= threshold, logits, -float("inf"))


def next_tokens(logits, sampler, temperature, top_k, top_p, seed):
    """The next token of each row of `(batch, vocabulary)` logits.

    Args:
        logits: `(batch, vocabulary_size)` float.
        sampler, temperature, top_k, top_p: see the module docstring (as
            checked by `check_sampling`).
        seed: the backend's stateless seed (`backend.seed_pair`) for
            `sampler="random"`; unused by greedy decoding.

    Returns:
        `(batch,)` int32 token ids.
    """
    logits = ops.cast(logits, "float32")
    if sampler == "greedy":
        return ops.cast(ops.argmax(logits, axis=-1), "int32")
    logits = logits / temperature
    if top_k is not None:
        logits = _keep_top_k(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = _keep_top_p(logits, top_p)
    uniform = backend.stateless_uniform(ops.shape(logits), seed)
    # Gumbel noise -log(-log(u)); u = 0 gives -inf, a token never drawn.
    gumbel = -ops.log(-ops.log(uniform))
    return ops.cast(ops.argmax(logits + gumbel, axis=-1), "int32")
