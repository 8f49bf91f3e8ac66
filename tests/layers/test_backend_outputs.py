"""The layer gives TensorFlow's outputs and gradients on every backend.

`tests/data/backend_outputs.npz` holds, for one layer of each code path the
weights pass through, its weights and inputs and the outputs and gradients
that the TensorFlow backend computed from them (written by
`python -m tests.data.make_backend_outputs` with `KERAS_BACKEND=tensorflow`).
Each backend loads the weights and must give the same numbers to float32
round-off: a model trained on one backend computes the same function on the
other. (Each feature map against its float64 reference runs on every
backend in tests/ops and tests/feature_maps.)
"""

import os

import numpy as np
import pytest
from keras import ops

import keras_favor
from tests import reference

pytestmark = pytest.mark.backend_independent

FILE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "data",
    "backend_outputs.npz",
)
BATCH, LENGTH, DIM = 2, 20, 8
CAUSAL = dict(use_causal_mask=True)
# `(layer kwargs, call kwargs, input scale, gradients too)` by name.
CONFIGURATIONS = {
    "softmax_bidirectional": (dict(chunk_size=8), {}, 1.0, True),
    "softmax_causal": (dict(chunk_size=8), CAUSAL, 1.0, True),
    "relu_causal": (dict(feature_map="relu", chunk_size=8), CAUSAL, 1.0, True),
    # Grouped recomputation (several groups), and a local window.
    "softmax_causal_groups": (
        dict(chunk_size=4, recompute_length=8),
        CAUSAL,
        1.0,
        True,
    ),
    "softmax_causal_local_window": (
        dict(chunk_size=4, local_window=3),
        CAUSAL,
        1.0,
        True,
    ),
    # Large inputs: attention logits in the hundreds, where the causal
    # kernel falls back to per-feature levels (docs/numerics.md, 5).
    "softmax_causal_large": (
        dict(chunk_size=4, recompute_length=8),
        CAUSAL,
        100.0,
        False,
    ),
    # Causal cross-attention with fewer queries than keys.
    "softmax_causal_shorter_query": (dict(chunk_size=4), CAUSAL, 1.0, False),
}


def inputs(name):
    """The query, value and key mask of a configuration (13 queries for
    `softmax_causal_shorter_query`)."""
    scale = CONFIGURATIONS[name][2]
    rng = np.random.default_rng(0)
    query, value = (
        (scale * rng.normal(size=(BATCH, LENGTH, DIM))).astype("float32")
        for _ in range(2)
    )
    mask = np.ones((BATCH, LENGTH), bool)
    mask[1, 13:] = False
    if name.endswith("shorter_query"):
        query = query[:, :13]
    return query, value, mask


def built_layer(name):
    layer_kwargs = CONFIGURATIONS[name][0]
    layer = keras_favor.FavorAttention(
        num_heads=2, key_dim=4, num_features=12, seed=7, **layer_kwargs
    )
    query, value, _ = inputs(name)
    layer.build(query.shape, value.shape)
    return layer


def outputs_and_gradients(name, layer):
    """The layer's outputs and, where the configuration asks, the gradients
    of `sum(cotangent * outputs)` with respect to the query, the value and
    each trainable weight, as NumPy arrays."""
    _, call_kwargs, _, with_gradients = CONFIGURATIONS[name]
    query, value, mask = inputs(name)

    def attend(query, value):
        return layer(query, value, attention_mask=mask, **call_kwargs)

    if not with_gradients:
        return reference.evaluate(attend, query, value), []
    target = np.random.default_rng(1).normal(size=query.shape)
    target = target.astype("float32")

    def loss(query, value):
        outputs = attend(query, value)
        return ops.sum(outputs * target), outputs

    gradients, outputs = reference.gradients_with_weights(
        layer, loss, [query, value], has_aux=True
    )
    return outputs, gradients


@pytest.fixture(scope="module")
def recorded():
    with np.load(FILE) as data:
        return dict(data)


@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_outputs_and_gradients_equal_the_recorded_ones(name, recorded):
    layer = built_layer(name)
    count = int(recorded[f"{name}/count"])
    assert count == len(layer.weights)
    layer.set_weights([recorded[f"{name}/weight{i}"] for i in range(count)])
    outputs, gradients = outputs_and_gradients(name, layer)
    expected = recorded[f"{name}/outputs"]
    assert outputs.shape == expected.shape
    # At input scale 100 the logits are very large, so the dense
    # projections' round-off (each backend orders its sums its own way)
    # moves the exponents (measured 8e-5): a looser bound there.
    rtol = 5e-4 if name.endswith("_large") else 1e-5
    scale = np.abs(expected).max()
    np.testing.assert_allclose(outputs, expected, rtol=rtol, atol=rtol * scale)
    recorded_gradients = sorted(
        k for k in recorded if k.startswith(name + "/g")
    )
    assert len(gradients) == len(recorded_gradients)
    assert len(gradients) == (
        2 + len(layer.trainable_weights) if CONFIGURATIONS[name][3] else 0
    )
    for i, gradient in enumerate(gradients):
        expected = recorded[f"{name}/gradient{i}"]
        scale = np.abs(expected).max()
        assert scale > 0, (name, i)
        np.testing.assert_allclose(
            gradient, expected, rtol=1e-5, atol=1e-5 * scale, err_msg=str(i)
        )
