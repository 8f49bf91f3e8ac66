"""Exact attention within a local window, random features beyond it, one
normalizer: against a quadratic reference that builds the mixed kernel."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_favor
from keras_favor.layers import favor_kernels
from keras_favor.ops import local_window_attention
from tests import reference

pytestmark = pytest.mark.backend_independent

MAPS = ["softmax", "softmax_hyperbolic", "softmax_trig"]
UNIT_ROUNDOFF = 2.0**-24


def setup(rng, feature_map, length, scale=1.0):
    layer = keras_favor.FavorAttention(
        2, 8, num_features=16, feature_map=feature_map, seed=1
    )
    x = rng.normal(scale=scale, size=(2, length, 16)).astype("float32")
    layer.build(x.shape, x.shape)
    heads = reference.heads(layer, x, x)
    mask = np.ones((2, length), bool)
    mask[1, length - 3 :] = False
    return layer, heads, mask


def mixed_kernel(layer, q, k, mask, window, causal):
    """The `(B, H, T, S)` kernel: exact inside the window, features outside,
    0 for masked and (causal) later keys; float64 (in `reference.float64_scope`),
    differentiable."""
    q, k = (ops.cast(ops.convert_to_tensor(x), "float64") for x in (q, k))
    phi = reference.feature_fn(layer, "float64")
    estimated = ops.einsum("bhtf,bhsf->bhts", phi(q), phi(k))
    exact = ops.exp(ops.einsum("bhtd,bhsd->bhts", q, k) / np.sqrt(8.0))
    length = q.shape[2]
    distance = np.arange(length)[:, None] - np.arange(length)[None, :]
    if causal:
        in_window = (distance >= 0) & (distance < window)
        allowed = distance >= 0
    else:
        in_window = np.abs(distance) < window
        allowed = np.ones_like(in_window)
    kernel = ops.where(in_window, exact, estimated)
    return ops.where(allowed & mask[:, None, None, :], kernel, 0.0)


def run(layer, heads, mask, window, causal):
    """The kernel's outputs as NumPy (`reference.evaluate`)."""
    feature_fn, _ = favor_kernels.feature_fns(layer)
    return reference.evaluate(
        lambda *heads: local_window_attention(
            *heads,
            feature_fn,
            layer.feature_map.feature_dim(16, 8),
            window,
            causal,
            mask=reference.key_mask(mask),
            chunk_size=4,
        ),
        *(h.astype("float32") for h in heads),
    )


@pytest.mark.backend_samples(6)
@pytest.mark.parametrize("feature_map", MAPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window, length", [(1, 7), (4, 19), (8, 8), (30, 20)])
def test_matches_the_mixed_quadratic_kernel(
    rng, feature_map, causal, window, length
):
    layer, (q, k, v), mask = setup(rng, feature_map, length)
    actual = ops.convert_to_numpy(run(layer, (q, k, v), mask, window, causal))
    with reference.float64_scope():
        kernel = mixed_kernel(layer, q, k, mask, window, causal)
        kernel = reference.numpy(kernel)
    expected = kernel @ v / kernel.sum(-1, keepdims=True)
    # Float32 sums of at most `length` keys and 32 features, each with a
    # relative rounding of a few u, times the condition of signed weights.
    condition = np.abs(kernel).sum(-1) / np.abs(kernel.sum(-1))
    bound = 8 * (length + 32) * UNIT_ROUNDOFF * np.max(np.abs(v))
    assert np.all(np.abs(actual - expected) <= bound * condition[..., None])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [4, 13])
def test_gradients_match_the_mixed_quadratic_kernel(rng, causal, window):
    layer, heads, mask = setup(rng, "softmax", 13)
    target = rng.normal(size=heads[2].shape)

    def gradients(fn, dtype):
        def loss(*heads):
            outputs = ops.cast(fn(*heads), "float64")
            return ops.sum(outputs * ops.cast(target, "float64"))

        return reference.gradients(loss, [h.astype(dtype) for h in heads])

    def expected_fn(q, k, v):
        kernel = mixed_kernel(layer, q, k, mask, window, causal)
        return ops.matmul(kernel, v) / ops.sum(kernel, -1, keepdims=True)

    feature_fn, _ = favor_kernels.feature_fns(layer)
    actual = gradients(
        lambda q, k, v: local_window_attention(
            q,
            k,
            v,
            feature_fn,
            16,
            window,
            causal,
            mask=reference.key_mask(mask),
            chunk_size=4,
        ),
        "float32",
    )
    with reference.float64_scope():
        expected = gradients(expected_fn, "float64")
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)


def softmax_reference(q, k, v, mask, causal):
    """Exact softmax attention in float64, and a bound on the float32
    error: each logit a sum of `d` products (rounded logits move each
    weight by a relative `2 * logit_error`), then sums of `L` weights and
    of `L` weighted values."""
    d, length = q.shape[-1], q.shape[2]
    logits = q @ np.swapaxes(k, -1, -2) / np.sqrt(d)
    seen = np.broadcast_to(mask[:, None, None, :], logits.shape)
    if causal:
        seen = seen & np.tri(length, dtype=bool)
    logits = np.where(seen, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    expected = weights @ v / weights.sum(-1, keepdims=True)
    products = np.abs(q) @ np.swapaxes(np.abs(k), -1, -2) / np.sqrt(d)
    logit_error = (d + 2) * UNIT_ROUNDOFF * products.max()
    relative = 4 * logit_error + 4 * (length + 4) * UNIT_ROUNDOFF
    return expected, relative * np.abs(v).max()


def no_random_features(x):
    raise AssertionError("a window over every key needs no random features")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [11, 12, 40000])
def test_a_window_over_every_key_is_softmax_attention(rng, causal, window):
    """`w >= L`: exact softmax attention, and no random feature computed
    (the cost of exact attention, whatever `w`)."""
    _, heads, mask = setup(rng, "softmax", 11)
    heads = [h.astype(np.float32) for h in heads]
    actual = local_window_attention(
        *heads,
        no_random_features,
        16,
        window,
        causal,
        mask=reference.key_mask(mask),
        chunk_size=4,
    )
    expected, bound = softmax_reference(
        *(h.astype(np.float64) for h in heads), mask, causal
    )
    assert np.all(np.abs(reference.numpy(actual) - expected) <= bound)


@pytest.mark.parametrize("causal", [False, True])
def test_a_window_far_longer_than_the_input_equals_one_as_long(rng, causal):
    """`FavorAttention(1, 8, local_window=40000)` on 8 positions: the exact
    attention of a window of 8, with no `(w, 2w)` blocks allocated."""
    x = rng.normal(size=(2, 8, 16)).astype("float32")
    mask = np.ones((2, 8), bool)
    mask[1, 5:] = False
    layers = [
        keras_favor.FavorAttention(1, 8, local_window=w, seed=1)
        for w in (40000, 8)
    ]
    for layer in layers:
        layer(x, x)
    layers[1].set_weights(layers[0].get_weights())
    long, short = (
        layer(x, query_mask=mask, use_causal_mask=causal) for layer in layers
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(long),
        ops.convert_to_numpy(short),
        rtol=1e-6,
        atol=1e-7,
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [0, 3])
def test_no_position_gives_no_output(causal, window):
    """Length 0, eager and traced, with and without a window, and with a
    cache (an empty prompt) that it leaves as it is."""
    layer = keras_favor.FavorAttention(
        2, 8, num_features=16, local_window=window, seed=1
    )
    layer(np.zeros((2, 4, 16), "float32"))
    x = np.zeros((2, 0, 16), "float32")

    def call(x):
        return layer(x, use_causal_mask=causal)

    for fn in (call, reference.compiled(call)):
        assert tuple(fn(x).shape) == (2, 0, 16)
    if not causal:
        return

    def cached(x, cache):
        return layer(x, use_causal_mask=True, cache=cache)

    cache = layer.empty_cache(2)
    for fn in (cached, reference.compiled(cached)):
        outputs, after = fn(x, cache)
        assert tuple(outputs.shape) == (2, 0, 16)
        for before, now in zip(cache, after, strict=True):
            np.testing.assert_array_equal(
                ops.convert_to_numpy(now), ops.convert_to_numpy(before)
            )


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [8, 40000])
def test_unknown_lengths_give_the_outputs_of_known_ones(rng, causal, window):
    """A graph traced for any length chooses the dense or the banded window
    at run time (lengths 0, 5 and 19 against windows of 8 and 40000)."""
    import tensorflow as tf

    layer = keras_favor.FavorAttention(
        2, 8, num_features=16, local_window=window, chunk_size=4, seed=1
    )
    layer(np.zeros((2, 4, 16), "float32"))

    def call(x, mask):
        return layer(x, query_mask=mask, use_causal_mask=causal)

    traced = tf.function(
        call,
        input_signature=[
            tf.TensorSpec((2, None, 16)),
            tf.TensorSpec((2, None), tf.bool),
        ],
    )
    for length in (0, 5, 19):
        x = rng.normal(size=(2, length, 16)).astype("float32")
        mask = np.ones((2, length), bool)
        mask[1, :2] = False
        np.testing.assert_allclose(
            traced(x, mask), call(x, mask), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("causal", [False, True])
def test_large_inputs_stay_finite_and_nonzero(rng, causal):
    layer = keras_favor.FavorAttention(
        2, 8, num_features=16, local_window=3, chunk_size=4
    )
    x = rng.normal(scale=100.0, size=(2, 12, 16)).astype("float32")
    layer.build(x.shape, x.shape)

    def loss(x):
        y = layer(x, x, use_causal_mask=causal)
        return ops.sum(y), y

    (_, *grads), y = reference.gradients_with_weights(
        layer, loss, [x], has_aux=True
    )
    assert len(grads) == len(layer.trainable_weights) > 0
    assert np.all(np.isfinite(y))
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert not np.any(np.all(np.asarray(y) == 0.0, axis=-1))


def test_bad_local_window_arguments_raise():
    with pytest.raises(ValueError, match="local_window"):
        keras_favor.FavorAttention(2, 8, local_window=-1)
    with pytest.raises(ValueError, match="local_window"):
        keras_favor.FavorAttention(2, 8, local_window=2.5)
    with pytest.raises(ValueError, match="softmax kernel"):
        keras_favor.FavorAttention(2, 8, feature_map="relu", local_window=2)
    layer = keras_favor.FavorAttention(2, 8, local_window=2)
    with pytest.raises(ValueError, match="same positions"):
        layer(np.zeros((1, 5, 16), "float32"), np.zeros((1, 6, 16), "float32"))
    with pytest.raises(ValueError, match="local_window"):
        keras_favor.models.build_performer(
            vocabulary_size=10, max_length=8, local_window=-2
        )


@pytest.mark.integration
def test_language_model_with_a_window_trains_and_round_trips(rng, tmp_path):
    model = keras_favor.models.build_performer(
        vocabulary_size=20,
        max_length=16,
        num_layers=1,
        hidden_dim=16,
        num_heads=2,
        num_features=16,
        local_window=4,
        seed=0,
        task="language_model",
    )
    tokens = rng.integers(1, 20, size=(8, 17))
    model.compile("adam", keras_favor.models.language_model_loss())
    before = model.evaluate(tokens[:, :-1], tokens[:, 1:], verbose=0)
    model.fit(tokens[:, :-1], tokens[:, 1:], epochs=5, verbose=0)
    assert model.evaluate(tokens[:, :-1], tokens[:, 1:], verbose=0) < before
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    block = loaded.get_layer("performer_block_0")
    assert block.attention_layer.local_window == 4
    np.testing.assert_allclose(
        loaded.predict(tokens[:, :-1], verbose=0),
        model.predict(tokens[:, :-1], verbose=0),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.backend_samples(1)
@pytest.mark.parametrize("cuts", [(1, 2, 3, 9), (5,), (12, 13)])
def test_causal_pieces_with_carried_state_equal_the_whole(rng, cuts):
    # Pieces shorter and longer than the window of 4 and the chunks of 4.
    layer, heads, mask = setup(rng, "softmax", 19)
    feature_fn, _ = favor_kernels.feature_fns(layer)
    heads = [ops.convert_to_tensor(h.astype("float32")) for h in heads]
    mask = reference.key_mask(mask)
    options = dict(
        feature_fn=feature_fn,
        num_features=16,
        window=4,
        causal=True,
        chunk_size=4,
    )

    def whole_and_pieces(*heads):
        whole = local_window_attention(*heads, mask=mask, **options)
        state, pieces = None, []
        for start, stop in zip((0, *cuts), (*cuts, 19)):
            outputs, state = local_window_attention(
                *(h[:, :, start:stop] for h in heads),
                mask=mask[:, :, start:stop],
                initial_state=state,
                return_state=True,
                **options,
            )
            pieces.append(outputs)
        return whole, ops.concatenate(pieces, axis=2), state

    whole, pieces, state = reference.evaluate(whole_and_pieces, *heads)
    np.testing.assert_allclose(pieces, whole, rtol=1e-5, atol=1e-6)
    # The state keeps the last 4 keys as they are, with their padding.
    np.testing.assert_array_equal(
        ops.convert_to_numpy(state[3]),
        ops.convert_to_numpy(heads[1])[:, :, -4:],
    )
    np.testing.assert_array_equal(
        ops.convert_to_numpy(state[5]), ops.convert_to_numpy(mask)[:, :, -4:]
    )


def test_bidirectional_state_raises(rng):
    layer, heads, mask = setup(rng, "softmax", 6)
    with pytest.raises(ValueError, match="causal attention only"):
        local_window_attention(
            *(ops.convert_to_tensor(h.astype("float32")) for h in heads),
            favor_kernels.feature_fns(layer)[0],
            16,
            2,
            False,
            return_state=True,
        )


@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_per_feature_path_matches_the_mixed_kernel(rng, monkeypatch, scale):
    """The far keys' per-feature algorithm (which a group takes when its
    one-level normalizers would be lost) gives parts that merge with the
    window's at the right scale, also for the first queries, which see no
    far key at all."""
    monkeypatch.setattr(
        keras_favor.ops.causal_attention,
        "_loses_a_normalizer",
        lambda levels, denominator: ops.convert_to_tensor(True),
    )
    layer, (q, k, v), mask = setup(rng, "softmax", 19, scale)
    actual = ops.convert_to_numpy(run(layer, (q, k, v), mask, 4, True))
    with reference.float64_scope():
        kernel = reference.numpy(mixed_kernel(layer, q, k, mask, 4, True))
    expected = kernel @ v / kernel.sum(-1, keepdims=True)
    bound = 8 * (19 + 32) * UNIT_ROUNDOFF * np.max(np.abs(v))
    assert np.all(np.abs(actual - expected) <= bound)
