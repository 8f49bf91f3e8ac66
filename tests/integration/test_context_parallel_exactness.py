"""Sequence sharding on 8 emulated CPU devices: the slower cases.

Every feature map through `FavorAttention`, causal kernels on 4 and 8
devices with their final state, local windows whose halo spans several
devices, and a `fit` of a `build_performer` model with `FeatureRedraw`,
each against one device to float32 round-off
(tests/distribute/context_parallel_cases.py). JAX only: the module runs in
the JAX pass of `make test` (tests/conftest.py).
"""

import jax
import keras
import numpy as np
import pytest

import keras_favor
from keras_favor import ops as favor_ops
from keras_favor.distribute import sequence_parallel
from keras_favor.layers import favor_kernels
from tests.distribute import context_parallel_cases as cases

pytestmark = [pytest.mark.backend_independent, pytest.mark.jax_only]


@pytest.fixture(scope="module")
def causal_case():
    """`cases.setup` of a fresh `rng` and the one-device causal outputs and
    gradients, computed once for every device count."""
    layer, heads, mask, target = cases.setup(np.random.default_rng(0))
    expected = cases.outputs_and_gradients(
        cases.one_device(layer, mask, True), heads, target
    )
    return layer, heads, mask, target, expected


@pytest.mark.parametrize("num_shards", [4, 8])
def test_sharded_causal_kernel_equals_one_device(causal_case, num_shards):
    layer, heads, mask, target, expected = causal_case
    actual = cases.outputs_and_gradients(
        cases.sharded(layer, mask, True, num_shards), heads, target
    )
    for a, e in zip(actual, expected):
        cases.assert_round_off(a, e)


def test_sharded_final_causal_state_equals_one_device(rng):
    # From a state of earlier keys, as a prefill after a prompt.
    layer, heads, mask, _ = cases.setup(rng)
    feature_fn, query_feature_fn = favor_kernels.feature_fns(layer)

    def one_device(q, k, v):
        initial = favor_ops.causal_linear_attention(
            q, k, v, feature_fn, 16, return_state=True
        )[1]
        return initial, favor_ops.causal_linear_attention(
            q,
            k,
            v,
            feature_fn,
            16,
            mask=mask,
            chunk_size=4,
            query_feature_fn=query_feature_fn,
            initial_state=initial,
            return_state=True,
        )

    # One program, as the sharded run: eager, each op would compile one.
    initial, expected = jax.jit(one_device)(*heads)
    run = cases.sharded(
        layer, mask, True, 4, initial_state=initial, return_state=True
    )
    actual = jax.jit(run)(*heads)
    for a, e in zip([actual[0], *actual[1]], [expected[0], *expected[1]]):
        cases.assert_round_off(a, e)


@pytest.mark.parametrize("window", [3, 12])
def test_sharded_local_window_equals_one_device(rng, window):
    # 37 positions on 8 devices: 5 each, so a window of 12 reaches back
    # over three devices.
    layer, heads, mask, target = cases.setup(rng)
    expected = cases.outputs_and_gradients(
        cases.one_device(layer, mask, True, window), heads, target
    )
    actual = cases.outputs_and_gradients(
        cases.sharded(layer, mask, True, 8, window), heads, target
    )
    for a, e in zip(actual, expected):
        cases.assert_round_off(a, e)


def counted_sharding(calls):
    """`sharded_linear_attention` that records each call's device count."""
    original = sequence_parallel.sharded_linear_attention

    def counted(*args, **kwargs):
        calls.append(args[0].num_shards)
        return original(*args, **kwargs)

    return counted


@pytest.mark.parametrize("feature_map", cases.FEATURE_MAPS)
@pytest.mark.parametrize(
    "causal", [False, True], ids=["bidirectional", "causal"]
)
def test_layer_under_a_sequence_mesh_equals_one_device(
    rng, monkeypatch, feature_map, causal
):
    # Outputs, gradients for inputs and weights, and the weights a training
    # call updates (FAVOR++'s moving statistic, causal), with FAVOR++'s
    # statistic taken over the whole sequence across the devices.
    layer = keras_favor.FavorAttention(
        num_heads=2,
        key_dim=8,
        num_features=16,
        feature_map=feature_map,
        seed=3,
        chunk_size=4,
    )
    inputs, mask, target = layer_inputs(rng, layer)
    expected = cases.layer_outputs_and_gradients(
        layer, inputs, mask, target, causal
    )
    calls = []
    monkeypatch.setattr(
        sequence_parallel, "sharded_linear_attention", counted_sharding(calls)
    )
    with cases.distribution(4).scope():
        actual = cases.layer_outputs_and_gradients(
            layer, inputs, mask, target, causal
        )
    assert calls == [4]
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        cases.assert_round_off(a, e, cases.WEIGHTS_TOLERANCE)


def layer_inputs(rng, layer):
    """Inputs `(2, LENGTH, 16)` (the layer built on them), the key mask
    `(2, LENGTH)` and a target."""
    inputs = rng.normal(scale=0.5, size=(2, cases.LENGTH, 16))
    layer.build(inputs.shape, inputs.shape)
    mask = np.arange(cases.LENGTH)[None, :] < np.array([[cases.LENGTH], [20]])
    target = rng.normal(size=(2, cases.LENGTH, 16))
    return inputs.astype("float32"), mask, target.astype("float32")


def test_layer_local_window_under_a_sequence_mesh_equals_one_device(rng):
    layer = keras_favor.FavorAttention(
        num_heads=2, key_dim=8, num_features=16, seed=3, local_window=6
    )
    inputs, mask, target = layer_inputs(rng, layer)
    expected = cases.layer_outputs_and_gradients(
        layer, inputs, mask, target, True
    )
    with cases.distribution(8).scope():
        actual = cases.layer_outputs_and_gradients(
            layer, inputs, mask, target, True
        )
    for a, e in zip(actual, expected):
        cases.assert_round_off(a, e, cases.WEIGHTS_TOLERANCE)


def language_model(tokens):
    model = keras_favor.models.build_performer(
        vocabulary_size=32,
        max_length=tokens.shape[1],
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        task="language_model",
        seed=5,
        num_features=16,
        chunk_size=4,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras_favor.models.language_model_loss(),
        jit_compile=True,
    )
    return model


def fit_losses(model, tokens):
    """The loss of each of 4 steps of `fit`, with a redraw every step."""
    losses = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: losses.append(logs["loss"])
    )
    redraw = keras_favor.callbacks.FeatureRedraw(interval=1, seed=7)
    model.fit(
        tokens[:, :-1],
        tokens[:, 1:],
        batch_size=4,
        epochs=4,
        shuffle=False,
        verbose=0,
        callbacks=[record, redraw],
    )
    return losses


def test_fit_sharded_along_the_sequence_follows_one_device(rng, monkeypatch):
    # 4 sequences of 38 tokens on a (2 batch x 4 sequence) mesh: each device
    # holds 2 sequences' 10 positions (37 padded to 40). The loss after
    # every step, and so every update, matches one device; FeatureRedraw
    # gives every device the same projections.
    tokens = rng.integers(1, 32, size=(4, cases.LENGTH + 1))
    single = language_model(tokens)
    weights = single.get_weights()
    expected = fit_losses(single, tokens)
    calls = []
    monkeypatch.setattr(
        sequence_parallel, "sharded_linear_attention", counted_sharding(calls)
    )
    with cases.distribution(4).scope():
        sharded = language_model(tokens)
        sharded.set_weights(weights)
        actual = fit_losses(sharded, tokens)
    assert calls and set(calls) == {4}
    np.testing.assert_allclose(actual, expected, rtol=1e-5)
    assert expected[-1] < expected[0]
    for a, e in zip(sharded.weights, single.weights):
        np.testing.assert_allclose(a.numpy(), e.numpy(), atol=1e-5)
    projections = [w for w in sharded.weights if w.path.endswith("projection")]
    assert len(projections) == 2
    for projection in projections:
        shards = [
            np.asarray(s.data) for s in projection.value.addressable_shards
        ]
        assert len(shards) == 8
        for shard in shards[1:]:
            np.testing.assert_array_equal(shard, shards[0])


def test_example_trains_on_sequences_split_across_devices(capsys):
    from examples import context_parallel

    losses, gap = context_parallel.main(
        ["--length", "60", "--steps", "3", "--hidden-dim", "16"]
        + ["--num-features", "16", "--compare-steps", "2"]
    )
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert gap < 1e-4
    assert "8 ways: 8 positions per device" in capsys.readouterr().out


def test_benchmark_reads_the_state_exchange_from_the_compiled_step():
    # The compiled step's all-gathers carry each layer's 8 states (2
    # layers), its reduce-scatters the gradients of the sums: the bytes
    # that the state shapes give, at a length of 512.
    from benchmarks import context_parallel

    args = context_parallel.common.parse_args(
        "x", [], hidden_dim=16, heads=2, features=8, vocabulary=16
    )
    compiled = context_parallel.compiled_step(512, 8, args)
    exchanged = context_parallel.collective_bytes(compiled)
    _, per_state = context_parallel.state_bytes(args, 8)
    assert exchanged["all-gather"] == 2 * 8 * per_state
    sums = per_state - 2 * 8 * 4
    assert exchanged["reduce-scatter"] == 2 * sums
    assert context_parallel.peak_bytes(compiled) > 0
