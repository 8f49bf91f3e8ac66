"""The public attention ops against their naive references on every
backend: outputs, the causal state after the last key, and gradients with
respect to the heads and to the state the causal op starts from, on lengths
and head sizes that no chunk divides."""

import numpy as np
import pytest
from keras import ops

import keras_favor
from keras_favor import ops as favor_ops
from tests import reference

pytestmark = pytest.mark.backend_independent

FEATURE_MAPS = ["softmax", "softmax_hyperbolic", "relu", "elu"]
BATCH, HEADS, KEY_DIM, VALUE_DIM, NUM_PROJECTIONS = 2, 2, 5, 3, 6


def setup(feature_map, length, seed=0):
    """Heads `(2, 2, length, 5)`, values of size 3, a padding mask, the
    feature map with a fixed projection, and a starting state: the sums
    of 7 earlier keys."""
    rng = np.random.default_rng(seed)
    feature_map = keras_favor.feature_maps.get(feature_map)
    projection = rng.normal(size=(NUM_PROJECTIONS, KEY_DIM)).astype("float32")

    def normal(*shape):
        return rng.normal(scale=0.5, size=shape).astype("float32")

    query, key = (normal(BATCH, HEADS, length, KEY_DIM) for _ in range(2))
    value = normal(BATCH, HEADS, length, VALUE_DIM)
    mask = np.ones((BATCH, length), bool)
    mask[1, length - 4 :] = False
    earlier_keys = normal(BATCH, HEADS, 7, KEY_DIM)
    earlier_values = normal(BATCH, HEADS, 7, VALUE_DIM)
    earlier = reference.numpy(feature_map(earlier_keys, projection))
    initial_sums = (
        np.einsum("bhsf,bhsd->bhfd", earlier, earlier_values),
        earlier.sum(axis=2),
    )
    return {
        "feature_map": feature_map,
        "projection": projection,
        "heads": (query, key, value),
        "mask": mask,
        "initial_sums": initial_sums,
        "num_features": feature_map.feature_dim(NUM_PROJECTIONS, KEY_DIM),
        "targets": [
            rng.normal(size=shape).astype("float32")
            for shape in (
                value.shape,
                initial_sums[0].shape,
                initial_sums[1].shape,
            )
        ],
    }


def op_outputs_and_sums(case, chunk_size, recompute_length=4096):
    """`causal_linear_attention`'s outputs and its final state as plain
    sums (times `exp(level)`), as a function of the heads and the sums
    it starts from (given at level 0)."""
    feature_map, projection = case["feature_map"], case["projection"]

    def run(query, key, value, initial_kv, initial_sum):
        initial_state = (initial_kv, initial_sum, ops.zeros_like(initial_sum))
        outputs, (kv, key_sum, level) = favor_ops.causal_linear_attention(
            query,
            key,
            value,
            lambda x: feature_map.log_scaled(x, projection),
            case["num_features"],
            mask=reference.key_mask(case["mask"]),
            chunk_size=chunk_size,
            query_feature_fn=lambda x: feature_map.query_log_scaled(
                x, projection
            ),
            initial_state=initial_state,
            return_state=True,
            recompute_length=recompute_length,
        )
        to_sums = ops.exp(level)
        return outputs, (kv * to_sums[..., None], key_sum * to_sums)

    return run


def reference_outputs_and_sums(case):
    """The same through the `L x L` matrix of unstabilized features, in
    `reference.FLOAT64`."""
    feature_map = case["feature_map"]
    dtype = reference.FLOAT64
    projection = ops.cast(case["projection"], dtype)
    mask = ops.cast(case["mask"], dtype)[:, None, :, None]

    def run(query, key, value, initial_kv, initial_sum):
        query, key, value, initial_kv, initial_sum = (
            ops.cast(x, dtype)
            for x in (query, key, value, initial_kv, initial_sum)
        )
        phi_q = feature_map(query, projection)
        phi_k = feature_map(key, projection) * mask
        length = ops.shape(query)[2]
        earlier = ops.cast(ops.tril(ops.ones((length, length))), dtype)
        scores = ops.matmul(phi_q, ops.transpose(phi_k, (0, 1, 3, 2)))
        scores = scores * earlier
        numerator = ops.matmul(scores, value) + ops.matmul(phi_q, initial_kv)
        denominator = ops.sum(scores, axis=-1) + ops.einsum(
            "bhlf,bhf->bhl", phi_q, initial_sum
        )
        final = (
            initial_kv + ops.matmul(ops.transpose(phi_k, (0, 1, 3, 2)), value),
            initial_sum + ops.sum(phi_k, axis=2),
        )
        return numerator / denominator[..., None], final

    return run


def values_and_gradients(run, case):
    """Outputs, final sums, and the gradients of a fixed projection of both
    with respect to the heads and the starting sums."""
    target, kv_target, sum_target = case["targets"]

    def loss(*args):
        outputs, (kv, key_sum) = run(*args)
        total = (
            ops.sum(ops.cast(outputs, "float32") * target)
            + ops.sum(ops.cast(kv, "float32") * kv_target)
            + ops.sum(ops.cast(key_sum, "float32") * sum_target)
        )
        return total, (outputs, kv, key_sum)

    args = [
        *case["heads"],
        *(x.astype("float32") for x in case["initial_sums"]),
    ]
    grads, values = reference.gradients(loss, args, has_aux=True)
    return [reference.numpy(v) for v in values], grads


def assert_close(actual, expected, tolerance, name):
    """Equal up to `tolerance` times the largest entry of `expected`."""
    scale = np.max(np.abs(expected))
    assert scale > 0, name
    np.testing.assert_allclose(
        actual, expected, rtol=0, atol=tolerance * scale, err_msg=name
    )


@pytest.mark.backend_samples(3)
@pytest.mark.parametrize(
    "feature_map, length, chunk_size, recompute_length",
    # 19 and 13 positions in chunks of 4 and 8, the last one partial; and
    # groups of 8 positions recomputed in the backward pass (the same
    # grouping for every map: exponential and plain features).
    [(name, 19, 4, 4096) for name in FEATURE_MAPS]
    + [(name, 13, 8, 4096) for name in FEATURE_MAPS]
    + [("softmax", 19, 4, 8), ("relu", 19, 4, 8)],
)
def test_causal_op_equals_the_quadratic_form_from_a_state(
    feature_map, length, chunk_size, recompute_length
):
    case = setup(feature_map, length)
    # The NumPy float64 reference of the outputs and sums.
    phi = [
        reference.numpy(case["feature_map"](x, case["projection"]))
        for x in case["heads"][:2]
    ]
    expected_outputs, expected_sums = reference.causal_attention_with_state(
        *phi, case["heads"][2], case["mask"], case["initial_sums"]
    )
    (outputs, kv, key_sum), grads = values_and_gradients(
        op_outputs_and_sums(case, chunk_size, recompute_length), case
    )
    (ref_outputs, ref_kv, ref_sum), ref_grads = values_and_gradients(
        reference_outputs_and_sums(case), case
    )
    # Positive features: a few float32 round-offs of each summed term,
    # relative to the largest output, sum or gradient.
    assert outputs.shape == (BATCH, HEADS, length, VALUE_DIM)
    assert_close(outputs, expected_outputs, 2e-6, "outputs")
    assert_close(ref_outputs, expected_outputs, 2e-6, "reference outputs")
    assert_close(ref_kv, expected_sums[0], 2e-6, "reference key_values")
    assert_close(ref_sum, expected_sums[1], 2e-6, "reference key_sum")
    assert_close(kv, expected_sums[0], 2e-6, "final key_values")
    assert_close(key_sum, expected_sums[1], 2e-6, "final key_sum")
    names = ["query", "key", "value", "initial key_values", "initial key_sum"]
    for name, grad, ref_grad in zip(names, grads, ref_grads):
        assert_close(grad, ref_grad, 1e-5, f"gradient of the {name}")


@pytest.mark.parametrize(
    "feature_map, recompute_length",
    [(name, 4096) for name in FEATURE_MAPS] + [("softmax", 8), ("relu", 8)],
)
def test_bidirectional_op_equals_the_quadratic_form(
    feature_map, recompute_length
):
    # 19 queries and 19 keys, two of them padding in the second row; in
    # groups of 8 positions recomputed in the backward pass, or one.
    case = setup(feature_map, 19)
    feature_map, projection = case["feature_map"], case["projection"]
    mask = reference.key_mask(case["mask"])

    def op(query, key, value):
        return favor_ops.bidirectional_linear_attention(
            query,
            key,
            value,
            lambda x: feature_map.log_scaled(x, projection),
            mask=mask,
            query_feature_fn=lambda x: feature_map.query_log_scaled(
                x, projection
            ),
            recompute_length=recompute_length,
        )

    dtype = reference.FLOAT64

    def naive(query, key, value):
        query, key, value = (ops.cast(x, dtype) for x in (query, key, value))
        return favor_ops.naive_linear_attention(
            query,
            key,
            value,
            lambda x: feature_map(x, ops.cast(projection, dtype)),
            mask=mask,
        )

    target = case["targets"][0]

    def loss_of(fn):
        def loss(*heads):
            outputs = fn(*heads)
            return ops.sum(ops.cast(outputs, "float32") * target), outputs

        return loss

    grads, outputs = reference.gradients(
        loss_of(op), case["heads"], has_aux=True
    )
    ref_grads, ref_outputs = reference.gradients(
        loss_of(naive), case["heads"], has_aux=True
    )
    assert_close(outputs, ref_outputs, 2e-6, "outputs")
    for name, grad, ref_grad in zip(
        ["query", "key", "value"], grads, ref_grads
    ):
        assert_close(grad, ref_grad, 1e-5, f"gradient of the {name}")
