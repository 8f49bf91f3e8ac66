"""The causal state carried across pieces of a sequence equals the whole."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_favor
from keras_favor import backend
from keras_favor import ops as favor_ops
from keras_favor.layers import favor_kernels
from tests import reference

pytestmark = pytest.mark.backend_independent

FEATURE_MAPS = ["softmax", "softmax_hyperbolic", "softmax_trig", "relu", "elu"]
LENGTH = 19


def attention_setup(rng, feature_map):
    """Float32 heads `(2, 2, LENGTH, 8)`, a padding mask and feature fns."""
    layer = keras_favor.FavorAttention(
        num_heads=2, key_dim=8, num_features=16, feature_map=feature_map, seed=3
    )
    layer(np.zeros((1, 2, 16), "float32"))
    # Scale 0.5 keeps the signed trigonometric features' normalizers away
    # from 0, where any two summation orders differ by more than round-off.
    heads = [
        rng.normal(scale=0.5, size=(2, 2, LENGTH, 8)).astype("float32")
        for _ in range(3)
    ]
    valid = np.arange(LENGTH)[None, :] < np.array([[LENGTH], [12]])
    mask = ops.convert_to_tensor(valid[:, None, :])
    num_features = layer.feature_map.feature_dim(16, 8)
    return heads, mask, favor_kernels.feature_fns(layer), num_features


def in_pieces(heads, mask, fns, num_features, cuts, chunk_size=4):
    """Causal attention over `[0, cuts[0]), [cuts[0], cuts[1]), ...`, each
    piece starting from the state the previous one returned."""
    feature_fn, query_feature_fn = fns
    bounds = [0, *cuts, LENGTH]
    state, outputs = None, []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        piece_outputs, state = favor_ops.causal_linear_attention(
            *(h[:, :, start:stop] for h in heads),
            feature_fn,
            num_features,
            mask=mask[:, :, start:stop],
            chunk_size=chunk_size,
            query_feature_fn=query_feature_fn,
            initial_state=state,
            return_state=True,
        )
        outputs.append(piece_outputs)
    return ops.concatenate(outputs, axis=2), state


def outputs_state_and_gradients(run, heads, target, mode):
    """`run`'s outputs and state and the gradients of `sum(outputs *
    target)` as NumPy arrays. On TensorFlow `mode` "eager" runs them
    eagerly, "graph" in a `tf.function` and "xla" compiled by XLA; on JAX
    every mode runs them under `jax.jit`."""

    def loss(*heads):
        outputs, state = run(list(heads))
        return ops.sum(outputs * target), (outputs, state)

    if mode == "eager" or not backend.is_tensorflow():
        gradients, (outputs, state) = reference.gradients(
            loss, heads, has_aux=True
        )
        return outputs, state, gradients
    import tensorflow as tf

    def compute(*heads):
        with tf.GradientTape() as tape:
            tape.watch(heads)
            value, (outputs, state) = loss(*heads)
        return outputs, state, tape.gradient(value, list(heads))

    compute = tf.function(compute, jit_compile=mode == "xla", autograph=False)
    heads = [ops.convert_to_tensor(h) for h in heads]
    return keras.tree.map_structure(ops.convert_to_numpy, compute(*heads))


@pytest.mark.backend_samples(2)
@pytest.mark.parametrize(
    "feature_map, mode",
    # Every feature map eagerly (compiled on JAX); the carried state in a
    # TensorFlow graph and under XLA once: tracing them costs seconds.
    [(name, "eager") for name in FEATURE_MAPS]
    + [
        pytest.param(mode_map, mode, marks=pytest.mark.tensorflow_only)
        for mode_map, mode in [("softmax", "graph"), ("softmax", "xla")]
    ],
)
def test_pieces_with_carried_state_equal_the_whole(rng, feature_map, mode):
    # Two pieces, then uneven pieces (of 1 to 6 positions) that cross the
    # chunks of 4 anywhere; the second row's keys after position 12 are
    # padding. The whole is computed once for both. A graph traces every
    # piece, so the compiled modes cut once: a one-position piece, then
    # pieces of 6 that cross chunks, the last into the padding.
    heads, mask, fns, num_features = attention_setup(rng, feature_map)
    target = rng.normal(size=(2, 2, LENGTH, 8)).astype("float32")
    whole = outputs_state_and_gradients(
        lambda h: in_pieces(h, mask, fns, num_features, ()), heads, target, mode
    )
    cut_sets = [(9,), (1, 2, 7, 8, 13, 18)] if mode == "eager" else [(1, 7, 13)]
    for cuts in cut_sets:
        pieces = outputs_state_and_gradients(
            lambda h, cuts=cuts: in_pieces(h, mask, fns, num_features, cuts),
            heads,
            target,
            mode,
        )
        for actual, expected in zip(
            keras.tree.flatten(pieces), keras.tree.flatten(whole), strict=True
        ):
            assert_close_to_round_off(actual, expected, 2e-6)


def assert_close_to_round_off(actual, expected, tolerance):
    """Equal up to `tolerance` times the largest entry of `expected`: the
    pieces sum the same terms in another order."""
    actual, expected = reference.numpy(actual), reference.numpy(expected)
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance * scale)


def test_state_of_one_position_steps_equals_the_whole_state(rng):
    heads, mask, fns, num_features = attention_setup(rng, "softmax")
    _, whole = in_pieces(heads, mask, fns, num_features, ())
    _, stepped = in_pieces(
        heads, mask, fns, num_features, tuple(range(1, LENGTH))
    )
    key_values, key_sum, level = whole
    assert key_values.shape == (2, 2, num_features, 8)
    assert key_sum.shape == (2, 2, num_features)
    assert level.shape == (2, 2, num_features)
    # The sums are stored times exp(-level), with levels that the
    # one-position step keeps per feature: compared at one common level.
    for actual, expected in zip(at_top_level(stepped), at_top_level(whole)):
        assert_close_to_round_off(actual, expected, 1e-6)


def at_top_level(state):
    """The state's sums times `exp(level - top)`, `top` the largest level
    of each batch row and head: one representation of the same sums."""
    key_values, key_sum, level = reference.numpy(tuple(state))
    to_top = np.exp(level - level.max(axis=-1, keepdims=True))
    return key_values * to_top[..., None], key_sum * to_top


def outputs_state_and_input_gradients(setup, from_empty_state=False, **options):
    """Outputs, final state and the heads' gradients of `sum(sin(outputs))
    + sum(kv * key_sum)` for one `causal_linear_attention` call with
    `return_state=True` and `options`, on `attention_setup`'s heads; with
    `from_empty_state`, given the empty state as its initial state."""
    heads, mask, (feature_fn, query_feature_fn), num_features = setup
    if from_empty_state:
        options["initial_state"] = favor_ops.empty_causal_state(
            2, 2, num_features, 8
        )

    def loss(*heads):
        outputs, state = favor_ops.causal_linear_attention(
            *heads,
            feature_fn,
            num_features,
            mask=mask,
            query_feature_fn=query_feature_fn,
            return_state=True,
            **options,
        )
        value = ops.sum(ops.sin(outputs)) + ops.sum(
            state[0] * state[1][..., None]
        )
        return value, (outputs, state)

    gradients, (outputs, state) = reference.gradients(loss, heads, has_aux=True)
    return [outputs, *state, *gradients]


def test_state_carries_across_recomputed_groups(rng):
    # Groups of 8 positions recomputed in the backward pass, inside one
    # piece and across pieces: the same numbers as one group.
    setup = attention_setup(rng, "softmax")

    def run(recompute_length):
        return outputs_state_and_input_gradients(
            setup, chunk_size=4, recompute_length=recompute_length
        )

    for actual, expected in zip(run(8), run(LENGTH)):
        assert_close_to_round_off(actual, expected, 1e-6)


@pytest.mark.parametrize("dropout_rate", [0.0, 0.25])
def test_one_chunk_without_a_state_equals_the_general_path(rng, dropout_rate):
    # One chunk and no initial state skips the scan over earlier chunks;
    # given the empty state, the general path runs: the same outputs,
    # final state and gradients (the skipped terms are exact zeros).
    setup = attention_setup(rng, "softmax")

    def run(from_empty_state):
        return outputs_state_and_input_gradients(
            setup,
            from_empty_state,
            chunk_size=LENGTH,
            dropout_rate=dropout_rate,
            dropout_seed=np.array([3, 4], "int32"),
        )

    for actual, expected in zip(run(False), run(True)):
        assert_close_to_round_off(actual, expected, 1e-6)


def test_empty_causal_state_is_no_key(rng):
    heads, mask, (feature_fn, query_feature_fn), num_features = attention_setup(
        rng, "softmax"
    )
    options = dict(mask=mask, chunk_size=4, query_feature_fn=query_feature_fn)
    expected = favor_ops.causal_linear_attention(
        *heads, feature_fn, num_features, **options
    )
    actual = favor_ops.causal_linear_attention(
        *heads,
        feature_fn,
        num_features,
        **options,
        initial_state=favor_ops.empty_causal_state(2, 2, num_features, 8),
    )
    np.testing.assert_array_equal(
        ops.convert_to_numpy(actual), ops.convert_to_numpy(expected)
    )


def test_initial_state_of_the_wrong_shape_raises(rng):
    heads, mask, (feature_fn, _), num_features = attention_setup(rng, "softmax")
    state = favor_ops.empty_causal_state(2, 2, num_features + 1, 8)
    with pytest.raises(ValueError, match="key_values"):
        favor_ops.causal_linear_attention(
            *heads, feature_fn, num_features, initial_state=state
        )


def per_feature_setup(rng, monkeypatch):
    """Heads `(2, 2, 40, 8)` with padding after key 29 of the second row,
    feature fns, a cotangent, and the blocks' sizes as they are run."""
    from keras_favor.ops import log_domain_causal

    layer = keras_favor.FavorAttention(
        num_heads=2, key_dim=8, num_features=16, seed=3
    )
    layer(np.zeros((1, 2, 16), "float32"))
    heads = [
        rng.normal(scale=s, size=(2, 2, 40, 8)).astype("float32")
        for s in (3.0, 3.0, 1.0)
    ]
    mask = np.arange(40)[None, :] < np.array([[40], [29]])
    target = rng.normal(size=(2, 2, 40, 8)).astype("float32")
    # Blocks run where a compiled step reserves memory for the untaken
    # branch (under `jax.jit`); on TensorFlow as well, forced here.
    monkeypatch.setattr(
        keras_favor.backend, "reserves_every_branch", lambda: True
    )
    used = []
    blocked = log_domain_causal._attention_in_blocks
    monkeypatch.setattr(
        log_domain_causal,
        "_attention_in_blocks",
        lambda *args: used.append(args[3:]) or blocked(*args),
    )
    return layer, heads, ops.convert_to_tensor(mask[:, None]), target, used


def assert_blocks_equal_one_block(blocks, whole):
    """The same levels, and sums of the same terms in another order."""
    state, whole_state = blocks[1], whole[1]
    # The levels are per feature, and equal.
    assert np.ptp(reference.numpy(whole_state[2]), axis=-1).min() > 0
    np.testing.assert_array_equal(
        reference.numpy(state[2]), reference.numpy(whole_state[2])
    )
    for actual, expected in zip(
        keras.tree.flatten(blocks), keras.tree.flatten(whole), strict=True
    ):
        assert_close_to_round_off(actual, expected, 2e-6)


def test_per_feature_blocks_equal_one_block(rng, monkeypatch):
    # The per-feature path, forced here, in blocks of 16 positions (three,
    # the last one padded), each from the state the one before left.
    from keras_favor.ops import log_domain_causal

    layer, heads, mask, target, used = per_feature_setup(rng, monkeypatch)
    feature_fn, query_feature_fn = favor_kernels.feature_fns(layer)
    monkeypatch.setattr(
        keras_favor.ops.causal_attention,
        "_loses_a_normalizer",
        lambda levels, denominator: ops.convert_to_tensor(True),
    )

    def run(block):
        monkeypatch.setattr(log_domain_causal, "EXACT_BLOCK", block)
        return outputs_state_and_gradients(
            lambda h: favor_ops.causal_linear_attention(
                *h,
                feature_fn,
                layer.num_features,
                mask=mask,
                chunk_size=8,
                query_feature_fn=query_feature_fn,
                prefix_block=2,
                return_state=True,
            ),
            heads,
            target,
            "eager",
        )

    whole = run(64)
    assert not used
    blocks = run(16)
    # Once forward, once more where the backward pass recomputes it
    # (keras_favor.ops.fallback).
    assert used == [(3, 16)] * 2
    assert_blocks_equal_one_block(blocks, whole)


@pytest.mark.tensorflow_only
def test_per_feature_blocks_in_a_tf_function(rng, monkeypatch):
    # The blocks' loop and their recomputation in a graph, against one
    # block run eagerly (the kernel alone, which traces quickly).
    from keras_favor.ops import log_domain_causal

    layer, heads, mask, target, used = per_feature_setup(rng, monkeypatch)
    feature_fn, query_feature_fn = favor_kernels.feature_fns(layer)
    state = favor_ops.empty_causal_state(2, 2, layer.num_features, 8)

    def run(block, mode):
        monkeypatch.setattr(log_domain_causal, "EXACT_BLOCK", block)

        def attend(heads):
            parts, state_after = log_domain_causal.log_domain_causal_attention(
                query_feature_fn(heads[0]),
                feature_fn(heads[1]),
                heads[2],
                mask,
                state,
                prefix_block=2,
            )
            return parts[0] / parts[1][..., None], state_after

        return outputs_state_and_gradients(attend, heads, target, mode)

    whole = run(64, "eager")
    blocks = run(16, "graph")
    assert used == [(3, 16)]
    assert_blocks_equal_one_block(blocks, whole)
