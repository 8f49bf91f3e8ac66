"""The causal chunks' prefix scan (`keras_favor.ops.chunk_scan`) against
its sequential definition: running maxima, the sums each chunk inherits,
the state after the last chunk, and their gradients."""

import numpy as np
import pytest
from keras import ops

from keras_favor.ops import chunk_scan
from keras_favor.ops.stabilizers import NO_KEY_LEVEL
from tests import reference

pytestmark = pytest.mark.backend_independent

BATCH, HEADS, FEATURES, DIM = 2, 3, 5, 3


@pytest.mark.parametrize("length, chunk_size", [(12, 4), (12, 3), (8, 1)])
def test_running_max_is_the_maximum_so_far(rng, length, chunk_size):
    levels = rng.normal(size=(BATCH, HEADS, length)).astype("float32")
    # Masked positions (NO_KEY_LEVEL) enter no maximum, the first one too.
    levels[0, 0, :5] = NO_KEY_LEVEL
    initial = rng.normal(size=(BATCH, HEADS)).astype("float32")
    initial[1, 2] = NO_KEY_LEVEL
    got = ops.convert_to_numpy(
        chunk_scan.running_max(levels, chunk_size, initial)
    )
    expected = np.maximum(
        np.maximum.accumulate(levels, axis=-1), initial[..., None]
    )
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("size", [1, 5])
def test_position_orders_for_a_known_and_a_run_time_size(size):
    # A run-time size is a tensor, as `ops.shape` gives it in a graph
    # traced for any length.
    for run_time in (False, True):
        n = ops.convert_to_tensor(size) if run_time else size
        same = ops.convert_to_numpy(chunk_scan.earlier_or_same(n))
        strict = ops.convert_to_numpy(chunk_scan.strictly_earlier(n))
        np.testing.assert_array_equal(same, np.tri(size, dtype=bool))
        np.testing.assert_array_equal(strict, np.tri(size, k=-1, dtype=bool))


def test_chunks_split_merge_and_pad_positions(rng):
    x = rng.normal(size=(2, 3, 12, 5)).astype("float32")
    split = chunk_scan.split_chunks(x, 4)
    assert tuple(split.shape) == (2, 3, 3, 4, 5)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(split)[:, :, 1], x[:, :, 4:8]
    )
    np.testing.assert_array_equal(
        ops.convert_to_numpy(chunk_scan.merge_chunks(split)), x
    )
    padded = ops.convert_to_numpy(chunk_scan.pad_positions(x, 3))
    assert padded.shape == (2, 3, 15, 5)
    np.testing.assert_array_equal(padded[:, :, :12], x)
    assert not padded[:, :, 12:].any()


def test_flat_matmul_is_the_einsum(rng):
    weights = rng.normal(size=(2, 3, 4, 6)).astype("float32")
    x = rng.normal(size=(2, 3, 6, 5, 2)).astype("float32")
    np.testing.assert_allclose(
        ops.convert_to_numpy(chunk_scan.flat_matmul(weights, x)),
        np.einsum("bhcn,bhnfd->bhcfd", weights, x),
        rtol=1e-5,
        atol=1e-5,
    )


def sequential_scan(chunk_kv, chunk_sum, chunk_level, state):
    """The definition, one chunk after another: each chunk sees the sums
    so far, taken to the level after the previous chunk."""
    kv, key_sum, level = state
    inherited = ([], [], [])
    for c in range(chunk_level.shape[-1]):
        for kept, x in zip(inherited, (kv, key_sum, level)):
            kept.append(x)
        new_level = chunk_level[..., c]
        decay = ops.exp(level - new_level)
        kv = kv * decay[..., None, None] + chunk_kv[:, :, c]
        key_sum = key_sum * decay[..., None] + chunk_sum[:, :, c]
        level = new_level
    stacked = [ops.stack(x, axis=2) for x in inherited]
    return (*stacked, (kv, key_sum, level))


def scan_inputs(rng, num_chunks, carried):
    """Chunk sums and nondecreasing levels (running maxima); a carried
    state below the first level, or none (`NO_KEY_LEVEL`)."""
    chunk_kv = rng.normal(size=(BATCH, HEADS, num_chunks, FEATURES, DIM))
    chunk_sum = rng.uniform(size=(BATCH, HEADS, num_chunks, FEATURES))
    steps = rng.exponential(size=(BATCH, HEADS, num_chunks))
    chunk_level = np.cumsum(steps, axis=-1)
    carried_kv = rng.normal(size=(BATCH, HEADS, FEATURES, DIM))
    carried_sum = rng.uniform(size=(BATCH, HEADS, FEATURES))
    carried_level = chunk_level[..., 0] - rng.exponential(size=(BATCH, HEADS))
    if not carried:
        carried_kv, carried_sum = 0 * carried_kv, 0 * carried_sum
        carried_level = np.full_like(carried_level, NO_KEY_LEVEL)
    return [
        x.astype("float32")
        for x in (
            chunk_kv,
            chunk_sum,
            chunk_level,
            carried_kv,
            carried_sum,
            carried_level,
        )
    ]


@pytest.mark.parametrize(
    "num_chunks, prefix_block",
    # One dense product; blocks of 4 (8 chunks); blocks of blocks (8
    # chunks in blocks of 2, recursively); a count no block divides.
    [(5, 8), (8, 4), (8, 2), (12, 8)],
)
@pytest.mark.parametrize("carried", [True, False])
def test_inherited_states_equal_the_sequential_scan(
    rng, num_chunks, prefix_block, carried
):
    inputs = scan_inputs(rng, num_chunks, carried)
    targets = [
        rng.normal(size=shape).astype("float32")
        for shape in (
            (BATCH, HEADS, num_chunks, FEATURES, DIM),
            (BATCH, HEADS, num_chunks, FEATURES),
            (BATCH, HEADS, FEATURES, DIM),
            (BATCH, HEADS, FEATURES),
        )
    ]

    def loss_of(scan):
        def loss(chunk_kv, chunk_sum, chunk_level, kv, key_sum, level):
            got_kv, got_sum, got_level, final = scan(
                chunk_kv, chunk_sum, chunk_level, (kv, key_sum, level)
            )
            values = [got_kv, got_sum, got_level, *final]
            total = sum(
                ops.sum(x * t)
                for x, t in zip([got_kv, got_sum, *final[:2]], targets)
            )
            return total, values

        return loss

    grads, values = reference.gradients(
        loss_of(lambda *a: chunk_scan.inherited_states(*a, prefix_block)),
        inputs,
        has_aux=True,
    )
    expected_grads, expected = reference.gradients(
        loss_of(sequential_scan), inputs, has_aux=True
    )
    names = [
        "key_values",
        "key_sum",
        "level",
        "final key_values",
        "final key_sum",
        "final level",
    ]
    for name, got, want in zip(names, values, expected):
        # Every factor is at most 1: round-off of a few float32 products,
        # relative to the largest sum.
        np.testing.assert_allclose(
            got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=name
        )
    names = [
        "chunk key_values",
        "chunk key_sum",
        "chunk level",
        "carried key_values",
        "carried key_sum",
        "carried level",
    ]
    for name, got, want in zip(names, grads, expected_grads):
        np.testing.assert_allclose(
            got,
            want,
            rtol=0,
            atol=1e-5 * max(np.abs(want).max(), 1e-30),
            err_msg=f"gradient of the {name}",
        )
    if not carried:
        # No carried keys: nothing flows back to the empty state's level.
        assert not grads[5].any()
