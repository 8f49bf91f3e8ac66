"""The chunks' recurrence (`keras_favor.ops.chunk_recurrence`) against its
naive reference, chunk after chunk with automatic gradients: the outputs,
the final state, and the gradients of both with respect to the queries,
keys, values and the initial state, traced and eager."""

import numpy as np
import pytest
from keras import ops

from keras_favor.ops import chunk_recurrence
from tests import reference

pytestmark = pytest.mark.backend_independent

BATCH, HEADS, CHUNK, FEATURES, DIM = 2, 3, 4, 5, 3


def recurrence_inputs(rng, num_chunks):
    """Nonnegative features, values, factors in (0, 1] and a state."""
    shape = (BATCH, HEADS, num_chunks, CHUNK)
    return [
        rng.uniform(size=shape + (FEATURES,)).astype("float32"),
        rng.uniform(size=shape + (FEATURES,)).astype("float32"),
        rng.normal(size=shape + (DIM,)).astype("float32"),
        rng.uniform(0.1, 1.0, size=(BATCH, HEADS, FEATURES, DIM)).astype(
            "float32"
        ),
    ], [
        rng.uniform(0.1, 1.0, size=shape).astype("float32"),
        rng.uniform(0.1, 1.0, size=shape[:3]).astype("float32"),
    ]


@pytest.mark.parametrize("traced", [True, False])
@pytest.mark.parametrize("carried", [True, False])
@pytest.mark.parametrize("num_chunks", [1, 5])
def test_recurrence_equals_the_chunk_by_chunk_reference(
    rng, num_chunks, carried, traced
):
    inputs, (row_factor, step_factor) = recurrence_inputs(rng, num_chunks)
    targets = [
        rng.normal(size=(BATCH, HEADS, num_chunks, CHUNK, DIM)),
        rng.normal(size=(BATCH, HEADS, FEATURES, DIM)),
    ]
    targets = [t.astype("float32") for t in targets]

    def loss_of(fn):
        def loss(query, key, value, state):
            outputs, final = fn(
                query,
                key,
                value,
                row_factor,
                step_factor,
                state if carried else None,
            )
            total = ops.sum(outputs * targets[0]) + ops.sum(final * targets[1])
            return total, [outputs, final]

        return reference.compiled(loss) if traced else loss

    grads, values = reference.gradients(
        loss_of(chunk_recurrence.inherited_outputs), inputs, has_aux=True
    )
    expected_grads, expected = reference.gradients(
        loss_of(chunk_recurrence.inherited_outputs_reference),
        inputs,
        has_aux=True,
    )
    # Sums of a few float32 products of terms below about 5 in magnitude.
    for name, got, want in zip(["outputs", "final state"], values, expected):
        np.testing.assert_allclose(
            got, want, rtol=1e-5, atol=1e-5, err_msg=name
        )
    names = ["query", "key", "value", "initial state"]
    for name, got, want in zip(names, grads, expected_grads):
        np.testing.assert_allclose(
            got, want, rtol=1e-5, atol=1e-5, err_msg=name
        )
    if not carried:
        assert not grads[3].any()


def test_first_chunk_sees_only_the_initial_state(rng):
    inputs, (row_factor, step_factor) = recurrence_inputs(rng, 3)
    query, key, value, state = inputs
    outputs, _ = chunk_recurrence.inherited_outputs(
        query, key, value, row_factor, step_factor, None
    )
    assert not ops.convert_to_numpy(outputs)[:, :, 0].any()
    outputs, _ = chunk_recurrence.inherited_outputs(
        query, key, value, row_factor, step_factor, state
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(outputs)[:, :, 0],
        np.matmul(query[:, :, 0], state) * row_factor[:, :, 0, :, None],
        rtol=1e-5,
        atol=1e-6,
    )
