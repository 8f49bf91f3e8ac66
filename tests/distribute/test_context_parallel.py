"""One sequence split across devices gives the numbers of one device.

`keras_favor.ops.emulated_shards` (the shards' math, the exchange a Python
loop) runs on every backend; the JAX tests shard along the `sequence` axis
of a mesh of 8 emulated CPU devices (tests/conftest.py) and compare
outputs and gradients with one device, to float32 round-off: the shards
sum the same terms in another order. The slower cases (every feature map,
the layer, local windows, the final state, a `fit`) are in
tests/integration/test_context_parallel_exactness.py.
"""

import pytest
from keras import ops

import keras_favor
from keras_favor.layers import favor_kernels
from keras_favor.ops.emulated_shards import emulated_shards
from tests.distribute import context_parallel_cases as cases

pytestmark = pytest.mark.backend_independent


@pytest.mark.parametrize(
    "causal, num_shards",
    [(False, 8), (True, 3)],
    ids=["bidirectional-8", "causal-3"],
)
def test_emulated_shards_equal_one_device(rng, causal, num_shards):
    layer, heads, mask, target = cases.setup(rng)
    feature_fn, query_feature_fn = favor_kernels.feature_fns(layer)

    def sharded(q, k, v):
        return emulated_shards(
            q,
            k,
            v,
            feature_fn,
            16,
            causal,
            num_shards,
            mask=mask,
            query_feature_fn=query_feature_fn,
            chunk_size=4,
        )

    expected = cases.outputs_and_gradients(
        cases.one_device(layer, mask, causal), heads, target
    )
    actual = cases.outputs_and_gradients(sharded, heads, target)
    for a, e in zip(actual, expected):
        cases.assert_round_off(a, e)


@pytest.mark.jax_only
@pytest.mark.parametrize(
    "causal, num_shards",
    [(False, 2), (False, 4), (False, 8), (True, 2)],
    ids=["bidirectional-2", "bidirectional-4", "bidirectional-8", "causal-2"],
)
def test_sharded_kernel_equals_one_device(rng, causal, num_shards):
    layer, heads, mask, target = cases.setup(rng)
    expected = cases.outputs_and_gradients(
        cases.one_device(layer, mask, causal), heads, target
    )
    actual = cases.outputs_and_gradients(
        cases.sharded(layer, mask, causal, num_shards), heads, target
    )
    for a, e in zip(actual, expected):
        cases.assert_round_off(a, e)


@pytest.mark.jax_only
@pytest.mark.parametrize(
    "options, call, message",
    [
        ({"dropout": 0.1}, {"training": True}, "dropout"),
        ({"local_window": 4}, {}, "local_window"),
    ],
    ids=["dropout", "bidirectional-window"],
)
def test_what_has_no_sharded_form_raises(rng, options, call, message):
    layer = keras_favor.FavorAttention(
        num_heads=2, key_dim=8, num_features=16, seed=3, **options
    )
    layer.build((2, 8, 16), (2, 8, 16))
    inputs = ops.ones((2, 8, 16))
    with cases.distribution(4).scope():
        with pytest.raises(ValueError, match=message):
            layer(inputs, inputs, **call)


@pytest.mark.jax_only
def test_cross_attention_of_other_lengths_under_a_sequence_mesh(rng):
    # 37 queries and 22 keys, each padded to whole shards on its own.
    import jax

    layer = keras_favor.FavorAttention(
        num_heads=2, key_dim=8, num_features=16, seed=3
    )
    query = rng.normal(size=(2, 37, 16)).astype("float32")
    value = rng.normal(size=(2, 22, 16)).astype("float32")
    layer.build(query.shape, value.shape)
    expected = jax.jit(lambda q, v: layer(q, v))(query, value)
    with cases.distribution(4).scope():
        actual = jax.jit(lambda q, v: layer(q, v))(query, value)
    cases.assert_round_off(actual, expected)


@pytest.mark.jax_only
def test_replica_sequence_sharding_names_the_jax_way():
    with pytest.raises(ValueError, match="`sequence` axis"):
        with keras_favor.distribute.sequence_replicas():
            pass
