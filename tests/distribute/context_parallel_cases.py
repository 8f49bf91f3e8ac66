"""Shared cases of the context-parallel tests: small heads, one device's
kernels, the meshes of 8 emulated CPU devices (tests/conftest.py), and
comparisons to float32 round-off.

The length, 37, divides neither the device count nor the chunk (4): the
sequence is padded with masked keys to whole shards. The second row's keys
after position 20 are padding.
"""

import numpy as np
from keras import ops

import keras_favor
from keras_favor import ops as favor_ops
from keras_favor.layers import favor_kernels
from tests.reference import gradients

LENGTH = 37
FEATURE_MAPS = [
    "softmax",
    "softmax_hyperbolic",
    "softmax_trig",
    "relu",
    "elu",
    "favor++",
]
# Round-off of float32 sums of a few dozen terms, relative to the largest
# entry; orders of magnitude below any error of a missed or doubled key
# (a shard's state restarted at zero changes outputs by O(1)). Weight
# gradients sum over every position and batch row: 1e-5.
TOLERANCE = 2e-6
WEIGHTS_TOLERANCE = 1e-5


def setup(rng, feature_map="softmax"):
    """Heads `(2, 2, LENGTH, 8)` at scale 0.5, the key mask, target and
    the feature fns of a seeded layer."""
    layer = keras_favor.FavorAttention(
        num_heads=2, key_dim=8, num_features=16, feature_map=feature_map, seed=3
    )
    layer(np.zeros((1, 2, 16), "float32"))
    heads = [
        rng.normal(scale=0.5, size=(2, 2, LENGTH, 8)).astype("float32")
        for _ in range(4)
    ]
    valid = (
        np.arange(LENGTH)[None, None, :] < np.array([LENGTH, 20])[:, None, None]
    )
    return layer, heads[:3], ops.convert_to_tensor(valid), heads[3]


def one_device(layer, mask, causal, window=0, return_state=False):
    """The kernel of one device, as a function of the heads."""
    feature_fn, query_feature_fn = favor_kernels.feature_fns(layer)
    num_features = layer.feature_map.feature_dim(16, 8)
    options = dict(mask=mask, chunk_size=4)
    if window:
        return lambda q, k, v: favor_ops.local_window_attention(
            q, k, v, feature_fn, num_features, window, True, **options
        )
    if causal:
        return lambda q, k, v: favor_ops.causal_linear_attention(
            q,
            k,
            v,
            feature_fn,
            num_features,
            query_feature_fn=query_feature_fn,
            return_state=return_state,
            **options,
        )
    return lambda q, k, v: favor_ops.bidirectional_linear_attention(
        q, k, v, feature_fn, mask=mask, query_feature_fn=query_feature_fn
    )


def assert_round_off(actual, expected, tolerance=TOLERANCE):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance * scale)


def outputs_and_gradients(run, heads, target):
    """`run(*heads)` and the gradients of `sum(run(*heads) * target)`,
    in one compiled program on JAX."""

    def loss(*heads):
        outputs = run(*heads)
        return ops.sum(outputs * target), outputs

    grads, outputs = gradients(loss, heads, has_aux=True)
    return [outputs, *grads]


def mesh_sharding(num_shards):
    """A `SequenceSharding` of the 8 devices: `(8 / n) x n` batch by
    sequence."""
    import keras

    from keras_favor.distribute import sequence_parallel

    devices = keras.distribution.list_devices()
    assert len(devices) == 8, "tests/conftest.py sets 8 emulated devices"
    mesh = keras.distribution.DeviceMesh(
        (8 // num_shards, num_shards), ("batch", "sequence"), devices
    )
    return sequence_parallel.SequenceSharding(
        mesh.backend_mesh, "sequence", "batch"
    )


def distribution(num_shards=4):
    """A Keras `ModelParallel` distribution over a `(batch, sequence)`
    mesh, variables replicated, which `FavorAttention` shards along
    `sequence`."""
    import keras

    mesh = keras.distribution.DeviceMesh(
        (8 // num_shards, num_shards),
        ("batch", "sequence"),
        keras.distribution.list_devices(),
    )
    return keras.distribution.ModelParallel(
        layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="batch"
    )


def layer_outputs_and_gradients(layer, inputs, mask, target, causal):
    """`layer`'s outputs and the gradients of `sum(outputs * target)` with
    respect to the inputs and every trainable weight, and the non-trainable
    weights after a training call."""
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(x, *weights):
        outputs, updated = layer.stateless_call(
            list(weights),
            non_trainable,
            x,
            x,
            attention_mask=mask,
            use_causal_mask=causal,
            training=True,
        )
        return ops.sum(outputs * target), (outputs, updated)

    grads, (outputs, updated) = gradients(
        loss, [inputs, *trainable], has_aux=True
    )
    return [outputs, *updated, *grads]


def sharded(layer, mask, causal, num_shards, window=0, **options):
    """The kernel on `num_shards` devices of the sequence axis, as a
    function of the heads."""
    from keras_favor.distribute import sequence_parallel

    sharding = mesh_sharding(num_shards)

    def run(q, k, v):
        return sequence_parallel.sharded_linear_attention(
            sharding,
            q,
            k,
            v,
            layer.feature_map,
            ops.convert_to_tensor(layer.projection),
            16,
            causal,
            mask=mask,
            window=window,
            chunk_size=4,
            **options,
        )

    return run
