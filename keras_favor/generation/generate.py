"""`generate`: text from a causal language model, one cached step a token."""

import random
import weakref

import keras
import numpy as np
from keras import ops

from keras_favor import backend
from keras_favor.generation import language_model_cache
from keras_favor.generation import sampling
from keras_favor.validation import is_int
from keras_favor.validation import stateless_seed

_COMPILED = weakref.WeakKeyDictionary()


def _check_prompt(prompt_ids, num_new_tokens, max_length, vocabulary_size):
    prompt_ids = np.asarray(prompt_ids)
    if prompt_ids.ndim != 2 or not np.issubdtype(prompt_ids.dtype, np.integer):
        raise ValueError(
            "`prompt_ids` must be a `(batch, length)` integer array. "
            f"Received: shape {prompt_ids.shape}, dtype {prompt_ids.dtype}"
        )
    if prompt_ids.shape[0] < 1 or prompt_ids.shape[1] < 1:
        raise ValueError(
            "`prompt_ids` needs at least one sequence of at least one "
            f"token. Received: shape {prompt_ids.shape}"
        )
    # A compiled gather clamps an id outside the table and JAX's fills its
    # row with NaN: either way a wrong answer without an error.
    low, high = prompt_ids.min(), prompt_ids.max()
    if low < 0 or high >= vocabulary_size:
        raise ValueError(
            "`prompt_ids` must be token ids in [0, "
            f"{vocabulary_size}), the model's vocabulary. Received: ids "
            f"from {low} to {high}"
        )
    total = prompt_ids.shape[1] + num_new_tokens
    if total > max_length:
        raise ValueError(
            f"The prompt ({prompt_ids.shape[1]} tokens) and `max_new_tokens` "
            f"({num_new_tokens}) make {total} positions, more than the "
            f"model's `max_length` ({max_length}, the positions its "
            "embedding knows). Shorten the prompt or generate fewer tokens."
        )
    return prompt_ids.astype("int32")


def decoding_options(
    model, sampler, temperature, top_k, top_p, end_token_id, padding_id
):
    """The options of `decode`, checked (see `generate`): a `ValueError`
    naming the argument for anything not allowed."""
    sampling.check_sampling(
        sampler, temperature, top_k, top_p, model.output_shape[-1]
    )
    if end_token_id is not None and not is_int(end_token_id):
        raise ValueError(
            "`end_token_id` must be an int or None. Received: "
            f"end_token_id={end_token_id!r}"
        )
    if not is_int(padding_id):
        raise ValueError(
            f"`padding_id` must be an int. Received: padding_id={padding_id!r}"
        )
    embedding, _ = language_model_cache.language_model_layers(model)
    if embedding.mask_zero and padding_id != 0:
        # The model's own mask says which positions are padding; another
        # padding id would mask every real token of that id.
        raise ValueError(
            "`padding_id` must be 0 for this model: its embedding masks id "
            "0 (`mask_zero=True`), and padding must be what the model "
            f"masks. Received: padding_id={padding_id!r}"
        )
    return dict(
        sampler=sampler,
        temperature=float(temperature),
        top_k=top_k,
        top_p=None if top_p is None else float(top_p),
        end_token_id=end_token_id,
        padding_id=int(padding_id),
    )


def decode(
    model,
    prompt_ids,
    max_new_tokens,
    seed,
    sampler="greedy",
    temperature=1.0,
    top_k=None,
    top_p=None,
    end_token_id=None,
    padding_id=0,
):
    """The decoding loop, in backend tensors (for `generate` and for graphs
    that generate, such as a SavedModel endpoint).

    Args:
        model: a language model (see `generate`).
        prompt_ids: `(B, P)` int32 tensor, left-padded with `padding_id`.
        max_new_tokens: int or scalar int tensor.
        seed: the backend's stateless seed (`backend.seed_pair`).
        sampler, temperature, top_k, top_p, end_token_id, padding_id: as
            for `generate`, already checked.

    Returns:
        `(B, P + max_new_tokens)` int32: the prompts and their new tokens.
    """
    prompt_ids = ops.cast(prompt_ids, "int32")
    batch, length = ops.shape(prompt_ids)
    embedding, _ = language_model_cache.language_model_layers(model)
    padding_mask = None
    if embedding.mask_zero:
        padding_mask = ops.not_equal(prompt_ids, padding_id)
    cache = language_model_cache.empty_cache(model, batch)
    # The prompt in one chunked pass; each step then appends the token the
    # latest logits give and runs the model on it for the next logits.
    logits, cache = language_model_cache.call_with_cache(
        model, prompt_ids, cache, 0, padding_mask
    )
    tokens = ops.concatenate(
        [prompt_ids, ops.full((batch, max_new_tokens), padding_id, "int32")],
        axis=1,
    )
    done = ops.zeros((batch,), "bool")

    def step(index, tokens, logits, cache, done):
        new = sampling.next_tokens(
            logits[:, -1],
            sampler,
            temperature,
            top_k,
            top_p,
            backend.fold_in(seed, index),
        )
        new = ops.where(done, padding_id, new)
        if end_token_id is not None:
            done = ops.logical_or(done, ops.equal(new, end_token_id))
        position = length + index
        tokens = ops.slice_update(tokens, (0, position), new[:, None])
        mask = None
        if padding_mask is not None:
            # As in a full pass: a padding id (also after a sequence's
            # end) is no key.
            mask = ops.not_equal(new, padding_id)[:, None]
        logits, cache = language_model_cache.call_with_cache(
            model, new[:, None], cache, position, mask
        )
        return index + 1, tokens, logits, cache, done

    def more(index, tokens, logits, cache, done):
        return ops.logical_and(
            index < max_new_tokens, ops.logical_not(ops.all(done))
        )

    start = ops.convert_to_tensor(0, "int32")
    _, tokens, _, _, _ = ops.while_loop(
        more, step, (start, tokens, logits[:, -1:], cache, done)
    )
    return tokens


def _variables_signature(model):
    """What a compiled loop depends on besides the variables' values: which
    variables the model has, of which shapes and dtypes. `quantize` and
    `enable_lora` change it (they replace or add variables); `set_weights`
    and training do not."""
    return tuple(
        (id(v), v.path, tuple(v.shape), str(v.dtype)) for v in model.variables
    )


def _compiled_decode(model, options, jit_compile):
    """`decode` for `model` and `options`, compiled by the backend: a
    `tf.function` (XLA with `jit_compile=True`) on TensorFlow, `jax.jit`
    over the model's variables on JAX. Kept per model and options while
    the model's variables stay the same ones (`_variables_signature`): a
    quantized or LoRA-enabled model gets a new trace."""
    signature = _variables_signature(model)
    kept_signature, compiled = _COMPILED.get(model, (None, {}))
    if kept_signature != signature:
        compiled = {}
        _COMPILED[model] = (signature, compiled)
    key = (tuple(sorted(options.items())), jit_compile)
    if key in compiled:
        return compiled[key]

    def run(prompt_ids, max_new_tokens, seed):
        return decode(model, prompt_ids, max_new_tokens, seed, **options)

    function = backend.compile_function(
        run, list(model.variables), jit_compile, static_argnums=(1,)
    )
    compiled[key] = function
    return function


def generate(
    model,
    prompt_ids,
    max_new_tokens,
    sampler="greedy",
    temperature=1.0,
    top_k=None,
    top_p=None,
    seed=None,
    end_token_id=None,
    padding_id=0,
    jit_compile=False,
):
    """Continues token sequences with a causal language model.

    The prompts run through the model once (prefill, in the causal
    algorithm's chunks), which returns every block's cache; then each new
    token costs one cached step over a single position. With FAVOR+
    attention the cache is the recurrent state, of the same size at every
    position, so each step costs the same however long the text; with
    `attention="exact"` it is a key/value cache of `max_length` positions.
    The loop runs compiled (`tf.function` on TensorFlow, `jax.jit` on JAX).

    Args:
        model: a causal language model from `build_performer(task=
            "language_model")`, functional or sequential, any attention.
        prompt_ids: `(batch, length)` integer token ids in `[0,
            vocabulary_size)` (others raise a `ValueError`). Prompts of
            different lengths are left-padded with `padding_id`, which
            needs a model built with `mask_zero=True` (padding is then no
            key of any position).
        max_new_tokens: int >= 1, tokens to add to each prompt. The prompt
            and the new tokens together may not exceed the model's
            `max_length`.
        sampler: `"greedy"` (default: the most likely token) or `"random"`
            (a draw from `softmax(logits / temperature)`).
        temperature: number > 0, for `sampler="random"`.
        top_k: None or int >= 1, for `sampler="random"`: draw only among
            the `top_k` most likely tokens.
        top_p: None or a number in (0, 1], for `sampler="random"`: draw
            only among the most likely tokens whose probabilities first add
            up to `top_p`.
        seed: None or an int, the random sampler's seed: the same seed
            gives the same tokens. None draws a new one.
        end_token_id: None or an int. A sequence that produces it stops:
            its later positions hold `padding_id`. Generation ends when all
            have stopped (the output keeps its full width).
        padding_id: int, the padding token id (default 0). A model built
            with `mask_zero=True` masks id 0, so it must be 0 there; for
            other models it only fills the positions after a sequence's
            end.
        jit_compile: bool, on TensorFlow whether the loop compiles with
            XLA (JAX always compiles it).

    Returns:
        A NumPy `(batch, length + max_new_tokens)` int32 array: each prompt
        followed by its new tokens.

    Example:

    ```python
    model = keras_favor.build_performer(
        vocabulary_size=257, max_length=256, task="language_model", seed=0
    )
    prompt = np.array([[0, 0, 72, 105], [80, 121, 116, 104]])  # left-padded
    tokens = keras_favor.generate(model, prompt, max_new_tokens=32)
    sampled = keras_favor.generate(
        model, prompt, 32, sampler="random", temperature=0.8, top_p=0.9, seed=1
    )
    ```
    """
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(
            "`max_new_tokens` must be an integer >= 1. Received: "
            f"max_new_tokens={max_new_tokens!r}"
        )
    embedding, _ = language_model_cache.language_model_layers(model)
    prompt_ids = _check_prompt(
        prompt_ids,
        max_new_tokens,
        embedding.sequence_length,
        embedding.vocabulary_size,
    )
    options = decoding_options(
        model, sampler, temperature, top_k, top_p, end_token_id, padding_id
    )
    if seed is None:
        seed = random.randrange(2**31 - 1)
    seed = backend.seed_pair(stateless_seed(seed))
    function = _compiled_decode(model, options, jit_compile)
    max_new_tokens = backend.loop_count(max_new_tokens)
    tokens = function(ops.convert_to_tensor(prompt_ids), max_new_tokens, seed)
    return np.asarray(keras.ops.convert_to_numpy(tokens))
