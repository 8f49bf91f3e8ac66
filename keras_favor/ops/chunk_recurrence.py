"""Causal chunks' inherited sums as a recurrence over the chunks.

Chunk `c` of a causal attention sees the keys of the chunks before it
through their sums `S_c = sum_{c' < c} K'_c'^T V_c'` (docs/numerics.md,
section 5), each taken to the stabilizer level before chunk `c`. Formed for
every chunk at once (`chunk_scan.inherited_states`), those `n` states of
`F x D` floats are written and read several times, forward and backward:
at 8192 positions, 8 heads and 256 features, 68 MiB a time, and the
products that write them run at a third of the rate of the same products
over the whole sequence on a CPU. Here one state per batch and head is
carried from chunk to chunk instead, and the backward pass is written out:
a reverse recurrence carries the state's gradient, and the queries'
gradients come from the states that the forward pass kept, one batched
product. `inherited_outputs_reference` computes the same, chunk after
chunk, with automatic gradients.
"""

from keras import ops

from keras_favor import backend
from keras_favor.ops.products import matmul_transposed_a
from keras_favor.ops.products import matmul_transposed_b


def _chunk_major(x):
    """`(B, H, n, ...)` to `(n, B, H, ...)`."""
    rank = len(x.shape)
    return ops.transpose(x, (2, 0, 1) + tuple(range(3, rank)))


def _batch_major(x):
    """`(n, B, H, ...)` to `(B, H, n, ...)`."""
    rank = len(x.shape)
    return ops.transpose(x, (1, 2, 0) + tuple(range(3, rank)))


def _scan(step, carry, inputs, num_chunks, reverse=False):
    """`step(carry, inputs_c) -> (carry, outputs_c)` over the chunks, axis
    2 of each input and output, first to last (or last to first).

    On TensorFlow a `tf.while_loop` that reads each chunk where it lies and
    sets its iteration count, which XLA needs (`keras.ops.scan` leaves it
    out there, and wants outputs of the carry's shape); elsewhere
    `keras.ops.scan` over the chunk-major inputs.
    """
    if not backend.is_tensorflow():
        carry, outputs = ops.scan(
            step, carry, [_chunk_major(x) for x in inputs], reverse=reverse
        )
        return carry, [_batch_major(x) for x in outputs]
    import tensorflow as tf

    count = tf.shape(inputs[0])[2] if num_chunks is None else num_chunks
    arrays = None

    def body(i, carry, *arrays):
        index = count - 1 - i if reverse else i
        carry, outputs = step(carry, [x[:, :, index] for x in inputs])
        arrays = [a.write(index, x) for a, x in zip(arrays, outputs)]
        return (i + 1, carry, *arrays)

    # The outputs' shapes, from one step traced aside.
    shapes = [x.shape for x in step(carry, [x[:, :, 0] for x in inputs])[1]]
    arrays = [
        tf.TensorArray(carry.dtype, size=count, element_shape=shape)
        for shape in shapes
    ]
    _, carry, *arrays = tf.while_loop(
        lambda i, *_: i < count,
        body,
        (0, carry, *arrays),
        maximum_iterations=count,
    )
    return carry, [_batch_major(a.stack()) for a in arrays]


def _next_state(state, key, value, step):
    """`S_{c+1} = S_c r_c + K'_c^T V_c`."""
    return state * step[..., None, None] + matmul_transposed_a(key, value)


def inherited_outputs(query, key, value, row_factor, step_factor, state):
    """`(Q'_c S_c) * row_factor_c` for every chunk `c`, and `S_n`.

    With `S_0 = state` (zeros for None) and `S_{c+1} = S_c r_c + K'_c^T
    V_c`, `r_c = step_factor_c`.

    Args:
        query, key: `(B, H, n, C, F)` features of the chunks.
        value: `(B, H, n, C, D)`, each row already at its chunk's level.
        row_factor: `(B, H, n, C)`, each query's factor on the inherited
            sums; no gradient flows to it.
        step_factor: `(B, H, n)`, the factor `r_c` that takes the sums
            from the level before chunk `c` to the level after it; no
            gradient flows to it.
        state: `(B, H, F, D)`, the sums before chunk 0, or None for none.

    Returns:
        `(outputs, final_state)`: `(B, H, n, C, D)` and `(B, H, F, D)`.
    """
    if state is None:
        state = _no_state(key, value)
    # A static count where known, which XLA needs for the loops.
    num_chunks = query.shape[2]

    # The factors are arguments, not captures, so that every backend's
    # custom gradient sees them; they get zero gradients.
    @ops.custom_gradient
    def recurrence(query, key, value, state, row_factor, step_factor):
        row_factor, step_factor = (
            ops.stop_gradient(x) for x in (row_factor, step_factor)
        )

        def forward(carried, chunk):
            query_c, key_c, value_c, row_c, step = chunk
            output = ops.matmul(query_c, carried) * row_c[..., None]
            next_state = _next_state(carried, key_c, value_c, step)
            return next_state, (output, carried)

        # `states[:, :, c]` is `S_c`, the sums before chunk `c`.
        final_state, (outputs, states) = _scan(
            forward,
            state,
            (query, key, value, row_factor, step_factor),
            num_chunks,
        )

        def gradient(*args, upstream=None):
            if upstream is None:
                upstream = args[0] if len(args) == 1 else args
            outputs_grad, state_grad = upstream
            if state_grad is None:
                state_grad = ops.zeros_like(final_state)
            scaled = outputs_grad * row_factor[..., None]

            def backward(later_grad, chunk):
                # `later_grad` is the gradient of `S_{c+1}`, which chunk
                # `c`'s keys and values enter.
                query_c, key_c, value_c, scaled_c, state_c, step = chunk
                grads = (
                    matmul_transposed_b(scaled_c, state_c),
                    matmul_transposed_b(value_c, later_grad),
                    ops.matmul(key_c, later_grad),
                )
                earlier_grad = later_grad * step[
                    ..., None, None
                ] + matmul_transposed_a(query_c, scaled_c)
                return earlier_grad, grads

            state_grad, grads = _scan(
                backward,
                state_grad,
                (query, key, value, scaled, states, step_factor),
                num_chunks,
                reverse=True,
            )
            return (
                *grads,
                state_grad,
                ops.zeros_like(row_factor),
                ops.zeros_like(step_factor),
            )

        return (outputs, final_state), gradient

    outputs, final_state = recurrence(
        query, key, value, state, row_factor, step_factor
    )
    return outputs, final_state


def _no_state(key, value):
    """The zero sums `(B, H, F, D)` of no key."""
    return ops.zeros(
        ops.shape(key)[:2] + ops.shape(key)[-1:] + ops.shape(value)[-1:],
        value.dtype,
    )


def inherited_outputs_reference(
    query, key, value, row_factor, step_factor, state
):
    """`inherited_outputs`, chunk after chunk in Python, with automatic
    gradients: the naive reference of the recurrence."""
    if state is None:
        state = _no_state(key, value)
    outputs = []
    for c in range(query.shape[2]):
        outputs.append(
            ops.matmul(query[:, :, c], state) * row_factor[:, :, c, :, None]
        )
        state = _next_state(
            state, key[:, :, c], value[:, :, c], step_factor[:, :, c]
        )
    return ops.stack(outputs, axis=2), state
