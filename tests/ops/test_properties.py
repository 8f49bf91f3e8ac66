"""Property-based tests (hypothesis) of the linear-attention kernels.

Over batch sizes, query and key lengths (chunk boundaries included), heads,
dimensions, feature maps, mask patterns and the causal flag:

(a) the float32 kernels equal the float64 quadratic reference with the same
    features, within a bound derived from float32 round-off;
(b) changing padded keys and values changes no output;
(c) in causal mode, changing the positions after `t` changes no output at or
    before `t`;
(d) outputs and gradients stay finite for heads scaled by 30 to 1000.

Examples are seeded (`derandomize=True`) and few (fewer on JAX, see
`examples`); the kernels run eagerly on TensorFlow and under `jax.jit` on
JAX (the gradients of (d) through `tests.reference.gradients`), where the
float64 references run as compiled programs too: an eager op there
compiles a program for each new shape, and each example's shapes are new.
One layer per feature map and dimensions provides the projection and the
feature functions. The float64 references compute in float64 on every
backend (`reference.float64_scope`).
"""

import functools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

import keras_favor
from keras_favor import backend
from keras_favor import ops as favor_ops
from keras_favor.layers import favor_kernels
from tests import reference as references

pytestmark = pytest.mark.backend_independent

FEATURE_MAPS = ["softmax", "softmax_hyperbolic", "softmax_trig", "relu", "elu"]
# Maps whose features are exponentials of the heads' norms and projections.
SOFTMAX_MAPS = ["softmax", "softmax_hyperbolic", "softmax_trig"]
CHUNK_SIZES = [1, 3, 4, 8, 64]
# float32's unit round-off: a rounded operation's relative error is <= u.
UNIT_ROUNDOFF = 2.0**-24

# `fixed_random_state` (conftest) only seeds and sets the float32 policy, the
# same for every example; the examples are slow by hypothesis' standards.
SETTINGS = dict(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


def examples(count):
    """`count` examples on TensorFlow; a fifth of them on JAX, where every
    example's new shapes cost a compilation."""
    return count if backend.is_tensorflow() else max(3, count // 5)


@functools.cache
def feature_layer(feature_map, key_dim, num_features):
    """A built `FavorAttention` whose projection and feature map the kernels
    use; heads are made directly, so its dense sub-layers go unused."""
    layer = keras_favor.FavorAttention(
        num_heads=1,
        key_dim=key_dim,
        feature_map=feature_map,
        num_features=num_features,
        seed=97 * key_dim + num_features,
    )
    layer.build((1, 2, key_dim), (1, 2, key_dim))
    return layer


def features64(layer, *xs):
    """The layer's unstabilized features `phi(x)` of each of `xs`, in
    float64 (one program on JAX)."""

    def compute(*xs):
        feature_fn = references.feature_fn(layer, "float64")
        return [feature_fn(x) for x in xs]

    with references.float64_scope():
        return references.numpy(references.evaluate(compute, *xs))


# ----------------------------------------------------------------- inputs --


def boundary_lengths(chunk_size, limit=200):
    """Lengths one short of, at and one past 1 to 3 whole chunks."""
    return sorted(
        {
            n * chunk_size + offset
            for n in (1, 2, 3)
            for offset in (-1, 0, 1)
            if 1 <= n * chunk_size + offset <= limit
        }
    )


@st.composite
def lengths(draw, chunk_size):
    return draw(
        st.one_of(
            st.integers(1, 24),
            st.sampled_from(boundary_lengths(chunk_size)),
            st.integers(25, 200),
        )
    )


MASK_KINDS = ["none", "right_padding", "random", "mixed_rows"]


def make_mask(kind, batch, length, rng):
    """A `(B, S)` bool mask, or None.

    `right_padding` and `random` leave each row at least one valid key;
    `mixed_rows` mixes full, right-padded, random and fully padded rows, at
    least one of them fully padded when there are two rows or more.
    """
    if kind == "none":
        return None
    rows = []
    if kind == "mixed_rows":
        patterns = rng.choice(
            ["full", "right_padding", "random", "empty"], batch
        )
        if batch > 1:
            patterns[rng.integers(batch)] = "empty"
    else:
        patterns = [kind] * batch
    for pattern in patterns:
        if pattern == "full":
            row = np.ones(length, bool)
        elif pattern == "empty":
            row = np.zeros(length, bool)
        elif pattern == "right_padding":
            row = np.arange(length) < rng.integers(1, length + 1)
        else:
            row = rng.random(length) < rng.uniform(0.1, 0.9)
            row[rng.integers(length)] = True
        rows.append(row)
    return np.stack(rows)


@st.composite
def cases(draw, feature_maps=FEATURE_MAPS, causal=None, masks=MASK_KINDS):
    """One kernel call's configuration, with a seed for its arrays."""
    causal = draw(st.booleans()) if causal is None else causal
    chunk_size = draw(st.sampled_from(CHUNK_SIZES))
    query_length = draw(lengths(chunk_size))
    # Causal attention is self-attention: as many keys as queries.
    key_length = query_length if causal else draw(lengths(chunk_size))
    longest = max(query_length, key_length)
    return dict(
        feature_map=draw(st.sampled_from(feature_maps)),
        causal=causal,
        chunk_size=chunk_size,
        batch=draw(st.integers(1, 3)),
        heads=draw(st.integers(1, 3)),
        key_dim=draw(st.sampled_from([2, 4, 8, 16])),
        value_dim=draw(st.integers(1, 6)),
        num_features=draw(st.sampled_from([8, 32])),
        query_length=query_length,
        key_length=key_length,
        mask=draw(st.sampled_from(masks)),
        # One group, or a few: the sums carried from group to group are
        # under test too; few groups keep the eager loops short.
        recompute_length=draw(
            st.sampled_from([32768, max(8, longest // 2), max(8, longest // 4)])
        ),
        prefix_block=draw(st.sampled_from([2, 8])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def make_inputs(case, scale=1.0):
    """float32 `(q, k, v)` heads of `case`, and its `(B, S)` mask or None.

    Builds the case's layer here, outside any `jax.jit` the kernel runs in.
    """
    feature_layer(case["feature_map"], case["key_dim"], case["num_features"])
    rng = np.random.default_rng(case["seed"])
    b, h, d = case["batch"], case["heads"], case["key_dim"]

    def normal(length, dim, scale):
        return (scale * rng.normal(size=(b, h, length, dim))).astype("float32")

    q = normal(case["query_length"], d, scale)
    k = normal(case["key_length"], d, scale)
    v = normal(case["key_length"], case["value_dim"], 1.0)
    return q, k, v, make_mask(case["mask"], b, case["key_length"], rng)


def kernel(case, q, k, v, mask):
    """The float32 linear-time kernel of `case` on `(q, k, v)`, with the
    `(B, S)` mask or None."""
    return masked_kernel(case, q, k, v, references.key_mask(mask))


def masked_kernel(case, q, k, v, mask):
    """`kernel` with the mask as the ops take it (`references.key_mask`)."""
    layer = feature_layer(
        case["feature_map"], case["key_dim"], case["num_features"]
    )
    feature_fn, query_feature_fn = favor_kernels.feature_fns(layer)
    options = dict(
        mask=mask,
        query_feature_fn=query_feature_fn,
        recompute_length=case["recompute_length"],
    )
    if case["causal"]:
        return favor_ops.causal_linear_attention(
            q,
            k,
            v,
            feature_fn,
            layer.feature_map.feature_dim(layer.num_features, layer.key_dim),
            chunk_size=case["chunk_size"],
            prefix_block=case["prefix_block"],
            **options,
        )
    return favor_ops.bidirectional_linear_attention(
        q, k, v, feature_fn, **options
    )


def run_kernel(case, q, k, v, mask):
    """`kernel` as NumPy: eager on TensorFlow; on JAX one compiled program,
    which the next call of the same case and shapes reuses."""
    heads = [ops.convert_to_tensor(x) for x in (q, k, v)]
    program = kernel_program(tuple(sorted(case.items())))
    return ops.convert_to_numpy(program(*heads, references.key_mask(mask)))


@functools.lru_cache(maxsize=1)
def kernel_program(case_items):
    """`masked_kernel` of a case (its sorted items), the mask an argument
    (`references.jit_on_jax`)."""
    case = dict(case_items)
    return references.jit_on_jax(
        lambda q, k, v, mask: masked_kernel(case, q, k, v, mask)
    )


def seen_keys(case, mask):
    """Bool `(B, 1, T, S)`: which keys each query sees."""
    t, s = case["query_length"], case["key_length"]
    seen = np.ones((case["batch"], 1, t, s), bool)
    if mask is not None:
        seen &= mask[:, None, None, :]
    if case["causal"]:
        seen &= np.tril(np.ones((t, s), bool))
    return seen


# ----------------------------------------------- (a) linear == quadratic --


def feature_envelope(layer, x, phi):
    """`(E, A)` for float64 heads `x` `(B, H, L, d)` and their float64
    features `phi = phi(x)`, which bound how float32 computes them.

    `E >= |phi(x)|` elementwise, and float32 computes each feature (through
    any shift that cancels later) with an absolute error of at most
    `u (d + 16) (A + 1) E`: `A` bounds, over all of `x`, the magnitude of
    every exponent and the sums of magnitudes `|W| |x~|` whose rounding
    enters a feature, each rounded exponent argument `a` giving a relative
    error of `u |a|`, and a `d`-term product a relative error of `d u` of
    its sum of magnitudes. The `16` covers the exponentials of differences
    of such arguments that the stabilizers multiply in (key and query
    shifts, the causal scan's decays over up to ~9 levels of blocks).

    - softmax, softmax_hyperbolic: positive exponentials, `E = phi`,
      `A = max |W| |x~| + max |x~|^2 / 2 + log(m) / 2`.
    - softmax_trig: `exp(|x~|^2/2) / sqrt(m) [sin, cos](W x~)`, signed; the
      sine's absolute error is that of its argument, so `E` is the pair's
      magnitude `exp(|x~|^2 / 2) / sqrt(m)` for every feature, and `A` as
      above.
    - relu: `relu(W x) / sqrt(m) + eps`; `W x` has an absolute error of
      `d u |W| |x|`, so `E = phi + |W| |x| / sqrt(m)` and `A = 0`.
    - elu: `elu(x) + 1 >= exp(-|x|)`, `E = phi`, `A = max |x|`.
    """
    name = type(layer.feature_map).__name__
    if name == "EluFeatures":
        return phi, np.max(np.abs(x))
    projection = np.asarray(layer.projection, np.float64)
    magnitude = np.abs(x) @ np.abs(projection).T
    m = projection.shape[0]
    if name == "ReluFeatures":
        return phi + magnitude / math.sqrt(m), 0.0
    d = x.shape[-1]
    half_sq_norm = np.sum(x**2, axis=-1, keepdims=True) / (2 * math.sqrt(d))
    log_magnitude = (
        np.max(magnitude) * d**-0.25 + np.max(half_sq_norm) + 0.5 * math.log(m)
    )
    if name == "SoftmaxTrigFeatures":
        envelope = np.exp(half_sq_norm) / math.sqrt(m)
        return np.broadcast_to(envelope, phi.shape), log_magnitude
    return phi, log_magnitude


def round_off_bound(case, q, k, v, mask, expected):
    """Elementwise bound on `|kernel - reference|`, `(B, H, T, D)`.

    With the envelopes `E` of `feature_envelope`, every product
    `w_ts = phi(q_t) . phi(k_s)` is computed within `u K_w e_ts`, where
    `e_ts = E(q_t) . E(k_s)` and `K_w = F + (d + 16)(A + 1)` (the `F`-term
    dot product's own round-off is `F u e_ts`). The sums over the `S` keys
    add `S u` times the sums of magnitudes (Higham's bound for any order of
    summation, as in chunks, groups and block scans). So the numerator
    `N_t = sum_s w_ts v_s` and the normalizer `D_t = sum_s w_ts` come out
    within `u K sum_s e_ts |v_s|` and `u K sum_s e_ts`, with
    `K = K_w + S`, and the output `N_t / D_t` within

        u K sum_s e_ts (|v_s| + |out_t|) / |D_t|,

    doubled here for the second-order terms. The bound scales with the
    normalizer's condition number `sum_s e_ts / |D_t|`: 1 for positive
    features, large where signed (trig) features cancel in the normalizer,
    where no float32 algorithm can be closer to the reference. A query that
    sees no key has `D_t = 0`; the reference and the kernels give it 0
    exactly (bound 0).
    """
    layer = feature_layer(
        case["feature_map"], case["key_dim"], case["num_features"]
    )
    q, k = q.astype(np.float64), k.astype(np.float64)
    phi_q, phi_k = features64(layer, q, k)
    eq, aq = feature_envelope(layer, q, phi_q)
    ek, ak = feature_envelope(layer, k, phi_k)
    seen = seen_keys(case, mask)
    w = np.where(seen, phi_q @ np.swapaxes(phi_k, -1, -2), 0.0)
    e = np.where(seen, eq @ np.swapaxes(ek, -1, -2), 0.0)
    normalizer = np.abs(w.sum(-1, keepdims=True))
    d, s = case["key_dim"], case["key_length"]
    f = eq.shape[-1]
    k_total = f + (d + 16) * (max(aq, ak) + 1) + s
    spread = e @ np.abs(v.astype(np.float64)) + e.sum(
        -1, keepdims=True
    ) * np.abs(expected)
    sees_keys = seen.any(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = 2 * UNIT_ROUNDOFF * k_total * spread / normalizer
    return np.where(sees_keys, bound, 0.0)


def reference(case, q, k, v, mask):
    """The quadratic form `phi(Q) phi(K)^T V / phi(Q) phi(K)^T 1` in
    float64, with the layer's unstabilized features (one program on JAX;
    `references.quadratic_feature_attention`)."""
    layer = feature_layer(
        case["feature_map"], case["key_dim"], case["num_features"]
    )

    def compute(q, k, v):
        return favor_ops.naive_linear_attention(
            *(ops.cast(x, "float64") for x in (q, k, v)),
            references.feature_fn(layer, "float64"),
            mask=references.key_mask(mask),
            causal=case["causal"],
        )

    with references.float64_scope():
        return references.numpy(references.evaluate(compute, q, k, v))


@settings(max_examples=examples(40), **SETTINGS)
@given(case=cases(), scale=st.floats(0.05, 1.5))
def test_linear_equals_quadratic_reference(case, scale):
    # Head scales up to 1.5: |q~ . k~| stays below ~10 for d <= 16, so no
    # feature product underflows and the bound's A stays small; larger
    # scales are (d)'s.
    if case["feature_map"] == "softmax_trig":
        # Trig normalizers estimate sums of exp(q~ . k~) with features of
        # size exp(|q~|^2 / 2 + |k~|^2 / 2): their condition number grows
        # like exp(|q~ - k~|^2 / 2), and beyond scale ~0.7 the bound below
        # says little about most outputs.
        scale = min(scale, 0.7)
    q, k, v, mask = make_inputs(case, scale)
    actual = run_kernel(case, q, k, v, mask)
    expected = reference(case, q, k, v, mask)
    bound = round_off_bound(case, q, k, v, mask, expected)
    assert actual.shape == expected.shape
    assert np.all(np.isfinite(actual))
    error = np.abs(actual - expected)
    worst = np.unravel_index(np.argmax(error - bound), error.shape)
    assert np.all(error <= bound), (
        f"error {error[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"
    )


# --------------------------------------------------- (b) padding invariance --


@settings(max_examples=examples(25), **SETTINGS)
@given(
    case=cases(masks=["right_padding", "random", "mixed_rows"]),
    padded_scale=st.sampled_from([1.0, 30.0, 300.0]),
)
def test_padded_keys_and_values_change_nothing(case, padded_scale):
    q, k, v, mask = make_inputs(case)
    rng = np.random.default_rng(case["seed"] + 1)
    padded = ~mask[:, None, :, None]
    changed_k = np.where(
        padded, padded_scale * rng.normal(size=k.shape), k
    ).astype("float32")
    changed_v = np.where(
        padded, padded_scale * rng.normal(size=v.shape), v
    ).astype("float32")
    before = run_kernel(case, q, k, v, mask)
    after = run_kernel(case, q, changed_k, changed_v, mask)
    assert np.all(np.isfinite(after))
    # Padded keys enter as exact zeros, so the outputs agree to the last
    # bit but for the order of float32 sums; 1e-6 of the largest output.
    np.testing.assert_allclose(
        after,
        before,
        rtol=1e-6,
        atol=1e-6 * np.max(np.abs(before), initial=1.0),
    )


# ------------------------------------------------ (c) no future leakage --


@settings(max_examples=examples(25), **SETTINGS)
@given(
    case=cases(causal=True).filter(lambda case: case["query_length"] > 1),
    position=st.floats(0.0, 1.0, exclude_max=True),
    future_scale=st.sampled_from([1.0, 30.0, 300.0]),
)
def test_causal_outputs_ignore_later_positions(case, position, future_scale):
    q, k, v, mask = make_inputs(case)
    t = int(position * (case["query_length"] - 1))
    rng = np.random.default_rng(case["seed"] + 2)

    def changed(x):
        x = x.copy()
        x[:, :, t + 1 :] = future_scale * rng.normal(
            size=x[:, :, t + 1 :].shape
        )
        return x

    if mask is not None:
        changed_mask = mask.copy()
        changed_mask[:, t + 1 :] = (
            rng.random(changed_mask[:, t + 1 :].shape) < 0.5
        )
    else:
        changed_mask = None
    before = run_kernel(case, q, k, v, mask)
    after = run_kernel(case, changed(q), changed(k), changed(v), changed_mask)
    assert np.all(np.isfinite(after))
    np.testing.assert_allclose(
        after[:, :, : t + 1],
        before[:, :, : t + 1],
        rtol=1e-6,
        atol=1e-6 * np.max(np.abs(before[:, :, : t + 1]), initial=1.0),
    )


# ------------------------------------------- (d) finite at large scales --


@settings(max_examples=examples(25), **SETTINGS)
@given(case=cases(), scale=st.sampled_from([30.0, 100.0, 300.0, 1000.0]))
def test_large_scales_give_finite_outputs_and_gradients(case, scale):
    # Finiteness only: at these scales exp(q~ . k~) spans far more than
    # float32's range, and whether each output is also right is for (a) at
    # moderate scales.
    q, k, v, mask = make_inputs(case, scale)
    target = (
        np.random.default_rng(case["seed"] + 3)
        .normal(
            size=(
                case["batch"],
                case["heads"],
                case["query_length"],
                case["value_dim"],
            )
        )
        .astype("float32")
    )

    def loss(q, k, v):
        outputs = kernel(case, q, k, v, mask)
        return ops.sum(outputs * target), outputs

    gradients, outputs = references.gradients(loss, [q, k, v], has_aux=True)
    assert np.all(np.isfinite(outputs))
    # The values' gradient is a sum of each seen key's normalized weights
    # (`references.gradients` gives zeros where a gradient is disconnected).
    if seen_keys(case, mask).any():
        assert np.any(gradients[2] != 0)
    for name, gradient in zip("qkv", gradients, strict=True):
        assert np.all(np.isfinite(gradient)), f"non-finite d loss / d {name}"
