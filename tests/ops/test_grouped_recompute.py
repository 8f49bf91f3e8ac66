"""Groups of positions recomputed in the backward pass
(`keras_favor.ops.grouped_recompute`): the slices cover the positions on
whole chunks, and running in groups changes neither the outputs, nor the
carried state, nor any gradient (inputs, shared tensors, initial carry)."""

import itertools

import numpy as np
import pytest
from keras import ops

from keras_favor.ops.grouped_recompute import position_groups
from keras_favor.ops.grouped_recompute import run_in_groups
from tests import reference

pytestmark = pytest.mark.backend_independent


@pytest.mark.parametrize(
    "length, recompute_length, multiple, starts, step",
    [
        (None, 8, 4, [None], None),  # unknown length: one slice
        (8, 8, 4, [None], None),  # short enough: one slice
        (19, 8, 4, [0, 8, 16], 8),  # the last slice reaches past 19
        (19, 10, 4, [0, 8, 16], 8),  # rounded down to whole chunks
        (9, 3, 4, [0, 4, 8], 4),  # at least one chunk per slice
        (7, 3, 1, [0, 3, 6], 3),
    ],
)
def test_position_groups_cover_the_length_on_whole_chunks(
    length, recompute_length, multiple, starts, step
):
    groups = position_groups(length, recompute_length, multiple)
    assert [g.start for g in groups] == starts
    if step is not None:
        assert all(g.stop - g.start == step for g in groups)
        assert groups[-1].stop >= length


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8"])
def test_position_groups_name_a_bad_recompute_length(bad):
    with pytest.raises(ValueError, match="recompute_length"):
        position_groups(19, bad)


def group_fn(index, inputs, shared, carry):
    """A chained recurrence: each position's output reads the carry, which
    every position updates; a group's outputs also read the shared weight
    and its index. An absent input (None) stands for no bias."""
    x, bias = inputs
    (weight,) = shared
    (state,) = carry
    outputs = []
    for t in range(x.shape[1]):
        state = ops.tanh(state * weight + x[:, t])
        outputs.append(state * (index + 1.0))
    outputs = ops.stack(outputs, axis=1)
    if bias is not None:
        outputs = outputs + bias
    return [ops.sin(outputs)], [state]


@pytest.mark.parametrize("keep_last", [True, False])
@pytest.mark.parametrize("num_groups", [1, 3])
def test_groups_give_the_outputs_state_and_gradients_of_one_pass(
    rng, keep_last, num_groups
):
    x = rng.normal(size=(2, 9, 3)).astype("float32")
    weight = rng.normal(size=(3,)).astype("float32")
    carry = rng.normal(size=(2, 3)).astype("float32")
    bias = rng.normal(size=(2, 1, 3)).astype("float32")
    target = rng.normal(size=(2, 9, 3)).astype("float32")
    state_target = rng.normal(size=(2, 3)).astype("float32")
    cuts = np.linspace(0, 9, num_groups + 1).astype(int)

    def loss(x, weight, carry, bias):
        slices = [slice(a, b) for a, b in itertools.pairwise(cuts)]
        # The middle group has no bias: an absent input.
        inputs = [
            [x[:, s], None if i == 1 else bias] for i, s in enumerate(slices)
        ]
        outputs, (state,) = run_in_groups(
            group_fn,
            inputs,
            shared=[weight],
            carry=[carry],
            keep_last=keep_last,
        )
        outputs = ops.concatenate([o[0] for o in outputs], axis=1)
        total = ops.sum(outputs * target) + ops.sum(state * state_target)
        return total, (outputs, state)

    def plain_loss(x, weight, carry, bias):
        # The same groups' computation, one after the other, no recompute.
        state, outputs = carry, []
        for i, (a, b) in enumerate(itertools.pairwise(cuts)):
            (out,), (state,) = group_fn(
                i, [x[:, a:b], None if i == 1 else bias], [weight], [state]
            )
            outputs.append(out)
        outputs = ops.concatenate(outputs, axis=1)
        total = ops.sum(outputs * target) + ops.sum(state * state_target)
        return total, (outputs, state)

    args = [x, weight, carry, bias]
    grads, values = reference.gradients(loss, args, has_aux=True)
    expected_grads, expected = reference.gradients(
        plain_loss, args, has_aux=True
    )
    for name, got, want in zip(["outputs", "state"], values, expected):
        np.testing.assert_allclose(
            got, want, rtol=1e-6, atol=1e-6, err_msg=name
        )
    for name, got, want in zip(
        ["x", "shared", "carry", "bias"], grads, expected_grads
    ):
        assert np.abs(want).max() > 0, name
        np.testing.assert_allclose(
            got, want, rtol=1e-5, atol=1e-6, err_msg=f"gradient of {name}"
        )
