"""Causal linear attention with its recurrent state in and out: a
dispatcher over its kernels.

- no position: no outputs, the state as it is;
- one position (decoding): the recurrent step (`one_position_step`);
- otherwise groups of positions, one after another, each recomputed in the
  backward pass (`grouped_recompute`), each by the chunked kernel with one
  stabilizer level per key (`causal_chunks`), and again with one level per
  feature (`log_domain_causal`) where that loses a query's normalizer.

The state they carry is a `causal_state.CausalState`.
"""

import functools

from keras import ops

from keras_favor.ops import causal_state
from keras_favor.ops import stabilizers
from keras_favor.ops.causal_chunks import one_level_causal_attention
from keras_favor.ops.chunk_scan import PREFIX_BLOCK
from keras_favor.ops.chunk_scan import pad_positions
from keras_favor.ops.fallback import with_fallback
from keras_favor.ops.feature_dropout import group_seed
from keras_favor.ops.grouped_recompute import RECOMPUTE_LENGTH
from keras_favor.ops.grouped_recompute import position_groups
from keras_favor.ops.grouped_recompute import run_in_groups
from keras_favor.ops.grouped_recompute import split_positions
from keras_favor.ops.log_domain_causal import log_domain_causal_attention
from keras_favor.ops.one_position_step import one_position_attention


def attention_parts_outputs(parts):
    """`numerator / denominator` of `(numerator, denominator, shift)`."""
    return stabilizers.normalize(parts[0], parts[1])


def causal_linear_attention(
    query,
    key,
    value,
    feature_fn,
    num_features,
    mask=None,
    chunk_size=64,
    dropout_rate=0.0,
    dropout_seed=None,
    query_feature_fn=None,
    initial_state=None,
    return_state=False,
    recompute_length=RECOMPUTE_LENGTH,
    prefix_block=PREFIX_BLOCK,
    normalized=True,
):
    """Exact causal linear attention (docs/numerics.md, section 5).

    Query `t` attends to keys `s <= t`. Memory grows like
    `L (F + D + C) + (L / C) F D` for one group of up to `recompute_length`
    positions; longer sequences run group after group, carrying the prefix
    state, with the activations of every group but the last recomputed in
    the backward pass instead of stored.

    The state after the last key is a `CausalState` (`causal_state`): the
    running sums `phi(K)^T V` and `phi(K)^T 1` and their stabilizer levels.
    A sequence run in pieces, each piece given the state the previous one
    returned, gives the outputs (and gradients) of the whole sequence run
    at once; a piece of one position (without dropout) is the recurrent
    step of `one_position_step`, `O(F D)` per head.

    Large input scales: keys share one stabilizer level per position and
    batch and head. Where that would lose the normalizer of a query that
    sees a key (below `SAFE_NORMALIZER`), which takes attention logits in
    the hundreds, the group of positions is computed again with one level
    per feature (`log_domain_causal`), exact to float32 round-off at any
    scale and several times slower (docs/numerics.md, section 5).

    Args:
        query, key: `(B, H, L, d)` heads; value: `(B, H, L, D)`.
        feature_fn: maps heads to `(values, log_scale)` feature parts, as
            `FeatureMap.log_scaled`.
        num_features: int, the number of features `F` that `feature_fn`
            makes.
        mask: bool `(B, 1, L)`, True at real keys, or None. A masked key
            leaves the state as it is.
        chunk_size: int, positions per chunk. It changes speed and memory,
            not the result beyond float32 round-off.
        dropout_rate: float, key-feature dropout in the numerator.
        dropout_seed: `(2,)` int stateless seed, when `dropout_rate > 0`.
        query_feature_fn: the queries' `feature_fn`; defaults to
            `feature_fn`.
        initial_state: the `CausalState` before position 0 (or a tuple of
            its tensors), as returned with `return_state=True`, or None for
            no key yet (`empty_causal_state`).
        return_state: bool, whether to return the state after the last key.
        recompute_length: int, positions per group recomputed in the
            backward pass (rounded down to whole chunks).
        prefix_block: int >= 2, chunks per block of the prefix scan.
        normalized: bool. False returns, instead of the outputs, their
            attention parts `(numerator (B, H, L, D), denominator (B, H, L),
            shift (B, H, L))`: the sums over the keys each query sees,
            times `exp(-shift)`; the shift is about `NO_KEY_LEVEL` for a
            query that sees no key. Parts of several attentions over
            disjoint keys sum into one (`merge_attention_parts`).

    Returns:
        `(B, H, L, D)` float32 outputs (or their parts), and with
        `return_state=True` the tuple `(outputs, state)`, `state` a
        `CausalState`.
    """
    if prefix_block < 2:
        raise ValueError(
            f"`prefix_block` must be at least 2. Received: {prefix_block}"
        )
    feature_fns = (feature_fn, query_feature_fn or feature_fn)
    state = _initial_state(initial_state, query, value, num_features)
    length = query.shape[2]
    if length == 0:
        outputs = _no_positions(query, value, normalized)
    elif length == 1 and not dropout_rate:
        parts, state = one_position_attention(
            feature_fns[1](query), feature_fns[0](key), value, mask, state
        )
        outputs = _outputs(parts, normalized)
    else:
        outputs, state = _in_groups(
            query,
            key,
            value,
            mask,
            state,
            recompute_length,
            chunk_size,
            return_state,
            functools.partial(
                _group_attention,
                feature_fns=feature_fns,
                num_features=num_features,
                dropout_rate=dropout_rate,
                dropout_seed=dropout_seed,
                prefix_block=prefix_block,
                normalized=normalized,
                starts_empty=initial_state is None,
            ),
        )
    if return_state:
        return outputs, causal_state.CausalState(*state)
    return outputs


def _initial_state(initial_state, query, value, num_features):
    """The checked `initial_state` in `value`'s dtype, or the empty state."""
    if initial_state is None:
        batch, heads = ops.shape(query)[:2]
        return causal_state.empty_causal_state(
            batch, heads, num_features, ops.shape(value)[-1], value.dtype
        )
    causal_state.check_state(
        initial_state,
        causal_state.CausalState.shapes(
            *query.shape[:2], num_features, value.shape[-1]
        ),
        "initial_state",
        "causal_linear_attention(..., return_state=True)",
    )
    return causal_state.CausalState(
        *(ops.cast(x, value.dtype) for x in initial_state)
    )


def _outputs(parts, normalized):
    """The normalized outputs of attention parts, or the parts."""
    return attention_parts_outputs(parts) if normalized else tuple(parts)


def _no_positions(query, value, normalized):
    """The outputs (or parts) of no position: `(B, H, 0, D)`."""
    outputs = ops.zeros(ops.shape(query)[:3] + ops.shape(value)[3:])
    if normalized:
        return outputs
    no_key = ops.full(ops.shape(query)[:3], stabilizers.NO_KEY_LEVEL)
    return outputs, ops.zeros_like(no_key), no_key


def _in_groups(
    query,
    key,
    value,
    mask,
    state,
    recompute_length,
    chunk_size,
    return_state,
    group_attention,
):
    """Positions padded to whole chunks and run in groups of at most
    `recompute_length`, each from the state the one before left
    (`group_attention`); the outputs of the real positions and the state
    after the last group."""
    length = query.shape[2]
    if length is None:
        length = ops.shape(query)[2]
    else:
        chunk_size = max(1, min(chunk_size, length))
    padding = (-length) % chunk_size
    if not isinstance(padding, int) or padding:
        if mask is None:
            mask = ops.ones_like(query[:1, :1, :, 0], "bool")
        query, key, value, mask = (
            pad_positions(x, padding) for x in (query, key, value, mask)
        )
    groups = position_groups(
        length if isinstance(length, int) else None,
        recompute_length,
        multiple=chunk_size,
    )
    inputs = (query, key, value, mask)
    outputs, state = run_in_groups(
        functools.partial(
            group_attention,
            chunk_size=chunk_size,
            num_groups=len(groups),
            return_state=return_state,
        ),
        [
            list(pieces)
            for pieces in zip(*(split_positions(x, groups) for x in inputs))
        ],
        carry=list(state),
    )
    # One group of whole chunks needs neither a concatenation nor a slice,
    # whose gradients would copy every output.
    outputs = [
        pieces[0] if len(pieces) == 1 else ops.concatenate(pieces, axis=2)
        for pieces in map(list, zip(*outputs))
    ]
    if not isinstance(padding, int) or padding:
        outputs = [x[:, :, :length] for x in outputs]
    return outputs[0] if len(outputs) == 1 else tuple(outputs), state


def _group_attention(
    index,
    inputs,
    shared,
    state,
    feature_fns,
    num_features,
    chunk_size,
    dropout_rate,
    dropout_seed,
    prefix_block,
    normalized,
    num_groups,
    return_state,
    starts_empty=False,
):
    """One group of positions, as `run_in_groups` calls it: the one-level
    kernel, and the per-feature one where it may have lost a normalizer.
    `starts_empty`: whether the call began with no key before position 0,
    which spares the first group the carried state's terms.

    Returns:
        `(outputs, state)`: the list of the outputs (or the parts), and the
        list of the state's tensors after the group.
    """
    query, key, value, mask = inputs
    key_parts, query_parts = feature_fns[0](key), feature_fns[1](query)
    seed = group_seed(dropout_seed, index, num_groups)
    starts_here = starts_empty and index == 0

    def one_level(query_parts, key_parts, value, state, mask, seed):
        parts, state_after = one_level_causal_attention(
            query_parts,
            key_parts,
            value,
            mask,
            None if starts_here else causal_state.CausalState(*state),
            chunk_size,
            dropout_rate,
            seed,
            prefix_block,
        )
        return parts, _as_list(_outputs(parts, normalized)), list(state_after)

    if not all(
        _has_feature_levels(parts, num_features)
        for parts in (query_parts, key_parts)
    ):
        _, outputs, state_after = one_level(
            query_parts, key_parts, value, state, mask, seed
        )
        return outputs, state_after

    # Only what is used is selected, so that an unused final state is not
    # computed by the per-feature algorithm; the state after a last group
    # that is not returned is an empty list.
    keep_state = return_state or index < num_groups - 1

    def one_level_checked(tensors):
        # Every tensor from `tensors`, none from the enclosing scope: on
        # JAX the selection's backward pass runs outside that scope.
        parts, outputs, state_after = one_level(*_unpacked(tensors))
        return (
            outputs + state_after * keep_state,
            _loses_a_normalizer(parts[2], parts[1]),
        )

    results = with_fallback(
        one_level_checked,
        functools.partial(
            _per_feature_levels,
            dropout_rate=dropout_rate,
            prefix_block=prefix_block,
            normalized=normalized,
            keep_state=keep_state,
        ),
        [*query_parts, *key_parts, value, *state, mask, seed],
    )
    count = len(results) - len(state) * keep_state
    return results[:count], results[count:]


def _per_feature_levels(
    tensors, dropout_rate, prefix_block, normalized, keep_state
):
    """The fallback of `_group_attention`: its outputs (and state) by the
    per-feature algorithm, from `[*query_parts, *key_parts, value, *state,
    mask, seed]`. A function of its arguments alone (`trace_cache`)."""
    query_parts, key_parts, value, state, mask, seed = _unpacked(tensors)
    parts, state_after = log_domain_causal_attention(
        query_parts,
        key_parts,
        value,
        mask,
        causal_state.CausalState(*state),
        dropout_rate,
        seed,
        prefix_block,
    )
    outputs = _as_list(_outputs(parts, normalized))
    return outputs + list(state_after) * keep_state


def _unpacked(tensors):
    """`(query_parts, key_parts, value, state, mask, seed)` of their flat
    list `[*query_parts, *key_parts, value, *state, mask, seed]`."""
    return (
        tensors[:2],
        tensors[2:4],
        tensors[4],
        tensors[5:-2],
        tensors[-2],
        tensors[-1],
    )


def _as_list(outputs):
    """Normalized outputs, or parts, as a list of tensors."""
    return list(outputs) if isinstance(outputs, tuple) else [outputs]


def _loses_a_normalizer(shift, denominator):
    """Whether a query that sees a key (its shift above about
    `NO_KEY_LEVEL`) got a normalizer below `SAFE_NORMALIZER`."""
    sees_a_key = shift > 0.5 * stabilizers.NO_KEY_LEVEL
    return ops.any(
        ops.logical_and(sees_a_key, denominator < stabilizers.SAFE_NORMALIZER)
    )


def _has_feature_levels(parts, num_features):
    """Whether the feature parts have a log-scale per feature."""
    log_scale = parts[1]
    return log_scale is not None and log_scale.shape[-1] == num_features
