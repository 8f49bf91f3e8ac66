"""Long sequences run in groups of positions, recomputed in the backward pass.

Training memory of attention over `L` positions grows like `L F` for the
features of every position. Split into groups of at most `recompute_length`
positions, run one group after another and keep, for the backward pass, only
the groups' inputs and the small state carried between them: the backward
pass recomputes each group's activations in turn, so memory holds the
features of one group at a time, for one more evaluation of the features.
Both attention modes use this one mechanism (docs/numerics.md, section 7).

Graph scheduling is TensorFlow's job here: control dependencies keep the
executor from running the groups side by side, which would keep all of
their activations alive at once and save nothing.

On other backends (JAX) the groups run in the same order with the same
carried state, so outputs and gradients are the same; each recomputed group
is wrapped in `keras.remat` (`jax.checkpoint`), which keeps only its inputs
for the backward pass, and the scheduling of the recomputations is left to
the backend's compiler.
"""

import functools
import itertools

import keras
from keras import ops

from keras_favor import backend
from keras_favor.ops.fallback import recomputed_gradients
from keras_favor.validation import positive_int

# Attention over more positions than this runs in groups whose activations
# are recomputed in the backward pass.
RECOMPUTE_LENGTH = 32768


def position_groups(length, recompute_length, multiple=1):
    """Slices of at most `recompute_length` positions covering `length`.

    One slice over everything when `length` is unknown or short enough.
    Otherwise each slice holds a multiple of `multiple` positions (at least
    one multiple), so that it ends on a whole chunk; the last slice reaches
    past `length` to the next multiple.
    """
    positive_int(recompute_length, "recompute_length")
    if length is None or length <= recompute_length:
        return [slice(None)]
    step = max(1, recompute_length // multiple) * multiple
    return [slice(start, start + step) for start in range(0, length, step)]


def split_positions(x, groups):
    """`x` (or None) cut along axis 2 into the pieces of `groups`, slices
    of `position_groups`.

    One split, whose gradient is one concatenation: slices' gradients
    would each be a full-size tensor, added up after the last, which
    makes the training memory of `n` groups grow like `n L`.
    """
    if x is None:
        return [None] * len(groups)
    length = x.shape[2]
    if len(groups) == 1:
        whole = groups[0].start in (None, 0) and (
            groups[0].stop is None or groups[0].stop >= length
        )
        return [x if whole else x[:, :, groups[0]]]
    sizes = [min(s.stop, length) - s.start for s in groups]
    return ops.split(x, list(itertools.accumulate(sizes[:-1])), axis=2)


def run_in_groups(group_fn, group_inputs, shared=(), carry=(), keep_last=True):
    """Runs `group_fn` on each group in turn, carrying a state between them.

    Args:
        group_fn: `group_fn(index, inputs, shared, carry)` returns
            `(outputs, carry)`, two lists of tensors.
        group_inputs: a list with, for each group, the list of its own
            tensors (None for an absent optional input).
        shared: tensors that every group reads.
        carry: the initial carried state, a list of tensors.
        keep_last: whether the last group's activations are kept for the
            backward pass instead of recomputed. Worth it when its backward
            pass runs first (as when the groups chain through the carry):
            keeping them then costs no more memory than recomputing them.

    Returns:
        `(outputs, carry)`: the list of each group's outputs, and the state
        after the last group.
    """
    recomputed = group_inputs[:-1] if keep_last else group_inputs
    outputs, carry = [], list(carry)
    if len(recomputed) == 1 and not keep_last:
        recomputed = []
        keep_last = True
    if not backend.is_tensorflow():
        return _run_with_remat(
            group_fn, group_inputs, list(shared), carry, len(recomputed)
        )
    import tensorflow as tf

    if recomputed:
        outputs, carry = _recomputed(group_fn, recomputed, list(shared), carry)
    if keep_last:
        # After recomputed groups, the last one waits for them; alone, it
        # needs no ordering.
        previous = tf.nest.flatten(outputs) + carry if recomputed else []
        last_inputs, carry = _after(previous, [group_inputs[-1], carry])
        last_outputs, carry = group_fn(
            len(group_inputs) - 1, last_inputs, list(shared), carry
        )
        outputs.append(last_outputs)
    return outputs, carry


def _run_with_remat(group_fn, group_inputs, shared, carry, num_recomputed):
    """`run_in_groups` off TensorFlow: the first `num_recomputed` groups
    under `keras.remat`, the others with their activations kept."""
    outputs = []
    for index, inputs in enumerate(group_inputs):
        fn = functools.partial(group_fn, index)
        if index < num_recomputed:
            fn = keras.remat(_as_lists(fn))
        group_outputs, carry = fn(inputs, shared, carry)
        outputs.append(list(group_outputs))
        carry = list(carry)
    return outputs, carry


def _as_lists(fn):
    def run(inputs, shared, carry):
        outputs, carry = fn(list(inputs), list(shared), list(carry))
        return list(outputs), list(carry)

    return run


def _after(previous, structure):
    """`structure`'s tensors, available only once `previous` are computed."""
    if not previous:
        return structure
    import tensorflow as tf

    with tf.control_dependencies(previous):
        return tf.nest.map_structure(
            lambda x: None if x is None else tf.identity(x), structure
        )


def _add(a, b):
    return a if b is None else b if a is None else a + b


def _group_gradients(run_group, index, group, shared, state, upstream):
    """The gradients of group `index`'s outputs and final state given
    `upstream`, from `run_group` recomputed: those of the group's inputs,
    of the shared tensors and of the state it started from."""
    size, num_shared = len(group), len(shared)

    def recompute(*sources):
        outputs, state = run_group(
            index,
            list(sources[:size]),
            list(sources[size : size + num_shared]),
            list(sources[size + num_shared :]),
        )
        return outputs + state

    grads = recomputed_gradients(recompute, group + shared + state, upstream)
    return (
        grads[:size],
        grads[size : size + num_shared],
        grads[size + num_shared :],
    )


def _recomputed(group_fn, group_inputs, shared, carry):
    """`run_in_groups` of groups whose activations are all recomputed."""
    import tensorflow as tf

    present = [[x is not None for x in inputs] for inputs in group_inputs]
    flat = [x for inputs in group_inputs for x in inputs if x is not None]
    num_flat, num_shared = len(flat), len(shared)
    output_counts = []

    def unflatten(args):
        values = iter(args)
        return [[next(values) if p else None for p in g] for g in present]

    def run_group(index, group, shared, state):
        outputs, state = group_fn(index, group, shared, state)
        return list(outputs), list(state)

    @tf.custom_gradient
    def run(*args):
        groups = unflatten(args[:num_flat])
        shared_in = list(args[num_flat : num_flat + num_shared])
        state = list(args[num_flat + num_shared :])
        states, outputs = [], []
        for index, group in enumerate(groups):
            group, state = _after(
                tf.nest.flatten(outputs) + state, [group, state]
            )
            states.append(state)
            group_outputs, state = run_group(index, group, shared_in, state)
            outputs.append(group_outputs)
        output_counts.extend(len(o) for o in outputs)
        results = tf.nest.flatten(outputs) + state

        def gradient(*upstream):
            upstream = [
                tf.zeros_like(result) if grad is None else grad
                for result, grad in zip(results, upstream)
            ]
            ends = [sum(output_counts[: i + 1]) for i in range(len(groups))]
            state_grad = upstream[ends[-1] :]
            input_grads, shared_grads = [], [None] * num_shared
            # Each recomputation waits for the gradients it serves, so that
            # it cannot run early, beside the others.
            previous = upstream
            for index in reversed(range(len(groups))):
                group, shared_now, state_in = _after(
                    previous, [groups[index], shared_in, states[index]]
                )
                start = ends[index] - output_counts[index]
                grads, new_shared, state_grad = _group_gradients(
                    run_group,
                    index,
                    group,
                    shared_now,
                    state_in,
                    upstream[start : ends[index]] + state_grad,
                )
                input_grads[:0] = [
                    g for g, p in zip(grads, present[index]) if p
                ]
                shared_grads = list(map(_add, shared_grads, new_shared))
                previous = [
                    g for g in grads + new_shared + state_grad if g is not None
                ]
            return input_grads + shared_grads + state_grad

        return results, gradient

    results = run(*flat, *shared, *carry)
    outputs, start = [], 0
    for count in output_counts:
        outputs.append(list(results[start : start + count]))
        start += count
    return outputs, list(results[start:])
