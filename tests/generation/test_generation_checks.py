"""Generation on every backend: the decoding state stays float32 under
mixed precision, a changed model gets a new compiled loop, and token ids
outside the vocabulary or a padding id the model does not mask raise."""

import keras
import numpy as np
import pytest

import keras_favor
from keras_favor import generation
from tests import reference
from tests.language_models import VOCABULARY
from tests.language_models import language_model
from tests.language_models import left_padded_prompts

pytestmark = pytest.mark.backend_independent

MIXED_POLICIES = ["mixed_float16", "mixed_bfloat16"]
UNIT_ROUNDOFF = {"mixed_float16": 2.0**-11, "mixed_bfloat16": 2.0**-8}


@pytest.fixture(scope="module")
def float32_models():
    """The float32 reference models of the mixed-precision cases, by their
    options: built once for both policies (on JAX, their compiled passes
    are kept too)."""
    return {}


@pytest.fixture(scope="module")
def one_layer_model():
    """A one-block language model, shared by the tests that only check
    that it refuses arguments."""
    return language_model(num_layers=1)


@pytest.mark.parametrize("policy", MIXED_POLICIES)
@pytest.mark.parametrize("kwargs", [{}, {"local_window": 4}])
def test_mixed_precision_greedy_generate_follows_the_full_pass(
    policy, kwargs, float32_models
):
    key = tuple(sorted(kwargs.items()))
    if key not in float32_models:
        float32_models[key] = language_model(num_layers=1, **kwargs)
    reference_model = float32_models[key]
    keras.config.set_dtype_policy(policy)
    # The same weights (`language_model` sets them), in the compute dtype.
    model = language_model(num_layers=1, **kwargs)
    prompt = left_padded_prompts()
    tokens = keras_favor.generate(model, prompt, 16)
    # Decoding visits many tokens: not only padding, not a fixed point.
    assert len(np.unique(tokens[:, 9:])) > 5
    np.testing.assert_array_equal(tokens[:, :9], prompt)
    # One causal forward pass over the generated tokens, in the compute
    # dtype and in float32: the logits of every prefix at once. The
    # compiled loop and this pass are two evaluations of the float32 model
    # in the compute dtype, each within `error` of its logits: the decoded
    # token's logit is within twice that of the pass's largest (and equal
    # to it unless the two round apart near a tie).
    logits, exact = (
        reference.evaluate(m, tokens[:, :-1])[:, 8:].astype("float32")
        for m in (model, reference_model)
    )
    error = np.max(np.abs(logits - exact), axis=-1)
    chosen = np.take_along_axis(logits, tokens[:, 9:, None], axis=-1)[..., 0]
    best = logits.max(axis=-1)
    assert np.all(chosen >= best - 2 * error)
    exact_steps = np.sum(chosen == best)
    assert exact_steps >= 0.9 * tokens[:, 9:].size


def unscaled(state):
    """The causal state's sums at one common level (the state stores them
    times `exp(-level)` at levels that depend on the summation order), and
    its other tensors as they are, all float32 or bool."""
    for x in state:
        assert keras.backend.standardize_dtype(x.dtype) in ("float32", "bool")
    key_values, key_sum, level = state[:3]
    factor = keras.ops.exp(level - keras.ops.max(level))
    return (key_values * factor[..., None], key_sum * factor, *state[3:])


def compiled(fn):
    """`fn` traced by `tf.function` on TensorFlow (eager steps cost more
    than their arithmetic here), `reference.jit_on_jax` elsewhere."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, autograph=False)
    return reference.jit_on_jax(fn)


def causal_layer(local_window=0):
    return keras_favor.FavorAttention(
        num_heads=4,
        key_dim=8,
        num_features=32,
        seed=1,
        chunk_size=16,
        local_window=local_window,
    )


@pytest.mark.parametrize("policy", MIXED_POLICIES)
@pytest.mark.parametrize("local_window", [0, 4])
def test_mixed_precision_state_stays_float32_over_many_steps(
    rng, policy, local_window
):
    length = 160
    # Inputs in {-1, 0, 1} and kernels in multiples of 1/8 make every
    # query, key and value exact in the compute dtype, whatever order a
    # backend sums the projections in: only the state's precision shows.
    x = rng.integers(-1, 2, size=(2, length, 32)).astype("float32")
    keras.config.set_dtype_policy(policy)
    layer = causal_layer(local_window)
    layer.build(x.shape)
    layer.set_weights(
        [
            rng.integers(-2, 3, size=w.shape) / 8.0
            if "kernel" in w.path
            else np.zeros(w.shape)
            if "bias" in w.path
            else w.numpy()
            if hasattr(w, "numpy")
            else np.asarray(w)
            for w in layer.weights
        ]
    )

    @compiled
    def attend(x, cache, index):
        return layer(
            x, use_causal_mask=True, cache=cache, cache_update_index=index
        )

    whole, state = attend(x, layer.empty_cache(2), 0)
    cache = layer.empty_cache(2)
    steps = []
    for t in range(length):
        outputs, cache = attend(
            x[:, t : t + 1], cache, keras.ops.convert_to_tensor(t)
        )
        steps.append(keras.ops.convert_to_numpy(outputs).astype("float32"))
    whole = keras.ops.convert_to_numpy(whole).astype("float32")
    assert np.all(np.isfinite(np.concatenate(steps, axis=1)))
    for got, want in zip(unscaled(cache), unscaled(state)):
        got, want = (keras.ops.convert_to_numpy(s) for s in (got, want))
        if want.dtype == bool:
            np.testing.assert_array_equal(got, want)
            continue
        # Both are float32 sums of the same terms in another order:
        # float32 round-off, where a compute-dtype state would be off by
        # the compute dtype's unit round-off (2**-8 or 2**-11) per step.
        scale = np.max(np.abs(want))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
    # Each step's output rounds the same float32 attention to the compute
    # dtype as the whole call, a unit in the last place at most, carried
    # through the output projection: a few units of the output's scale.
    unit = 8 * UNIT_ROUNDOFF[policy]
    scale = np.max(np.abs(whole))
    np.testing.assert_allclose(
        np.concatenate(steps, axis=1), whole, rtol=0, atol=unit * scale
    )


def test_autocast_true_is_refused():
    with pytest.raises(ValueError, match="`autocast` must be False"):
        keras_favor.FavorAttention(2, 8, autocast=True)
    with pytest.raises(ValueError, match="`autocast` must be False"):
        keras_favor.PerformerBlock(2, 16, autocast=True)


def tokens_of_one_pass(model, tokens, prompt_length):
    """The greedy tokens a cached loop must produce, from one causal pass
    over its output."""
    # A new function each call: a jitted function is kept per function
    # object, and one kept from before a change would run the old model.
    logits = reference.evaluate(lambda t: model(t), tokens[:, :-1])
    return logits[:, prompt_length - 1 :].argmax(axis=-1)


@pytest.mark.parametrize("change", ["quantize", "lora"])
def test_generate_after_the_model_changes_uses_the_changed_model(change):
    model = language_model(num_layers=1)
    prompt = left_padded_prompts()
    before = keras_favor.generate(model, prompt, 16)
    if change == "quantize":
        # int4 rounds coarsely enough to change some greedy tokens here.
        model.quantize("int4")
    else:
        rng = np.random.default_rng(3)
        for layer in model.layers:
            if isinstance(layer, keras_favor.PerformerBlock):
                attention = layer.attention_layer
                attention.enable_lora(2)
                # A nonzero update, so that the LoRA model differs.
                for dense in (attention.query_dense, attention.output_dense):
                    b = dense.lora_kernel_b
                    b.assign(rng.normal(size=b.shape).astype("float32"))
    after = keras_favor.generate(model, prompt, 16)
    assert np.any(after != before)
    np.testing.assert_array_equal(
        after[:, 9:], tokens_of_one_pass(model, after, 9)
    )


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("bad_id", [VOCABULARY, VOCABULARY + 7, -1])
def test_prompt_ids_outside_the_vocabulary_raise(
    jit_compile, bad_id, one_layer_model
):
    model = one_layer_model
    prompt = left_padded_prompts()
    prompt[0, -1] = bad_id
    with pytest.raises(ValueError, match=rf"`prompt_ids`.*\[0, {VOCABULARY}\)"):
        keras_favor.generate(model, prompt, 4, jit_compile=jit_compile)


def test_eager_token_ids_outside_the_vocabulary_raise(one_layer_model):
    model = one_layer_model
    prompt = left_padded_prompts()
    for bad_id in (VOCABULARY, -1):
        prompt[0, -1] = bad_id
        with pytest.raises(ValueError, match=rf"`inputs`.*\[0, {VOCABULARY}\)"):
            model(prompt)
    with pytest.raises(ValueError, match=rf"`inputs`.*\[0, {VOCABULARY}\)"):
        generation.call_with_cache(
            model, prompt, generation.empty_cache(model, 3), 0
        )


def test_padding_id_must_be_the_id_the_model_masks(one_layer_model):
    model = one_layer_model
    with pytest.raises(ValueError, match="`padding_id` must be 0"):
        keras_favor.generate(model, left_padded_prompts(), 4, padding_id=5)
    unmasked = language_model(num_layers=1, mask_zero=False)
    prompt = left_padded_prompts()[:1]
    tokens = keras_favor.generate(unmasked, prompt, 4, padding_id=5)
    np.testing.assert_array_equal(
        tokens[:, 9:], tokens_of_one_pass(unmasked, tokens, 9)
    )
