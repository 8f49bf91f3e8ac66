"""Linear attention over a sequence split into consecutive shards, one per
device, exchanging only states: the backend-neutral half of context
parallelism.

Each shard of `Ls` positions runs in two phases with one exchange between
them:

1. `shard_states`: the key sums of the shard's own keys (`K'^T V`,
   `K'^T 1` and one stabilizer level per feature, `bidirectional_key_sums`),
   which have the same size whatever `Ls`; with a local window `w`, also
   the sums of the shard's first `h` keys and its last `min(w, Ls)` keys
   and values (the halo that the next shards read).
2. `shard_outputs`: given every shard's states stacked on a leading axis
   (an all-gather) and, with a window, the `w` keys and values before the
   shard, the outputs of the shard's queries:

   - bidirectional: the queries attend to the sum of all shards' key sums;
   - causal: the shard runs `causal_linear_attention` from the exclusive
     prefix of the shards before it (its `initial_state`);
   - causal with a local window: `local_window_attention` from the
     `LocalWindowState` of the keys before the shard: the keys more than
     `w` before it summed from the earlier shards' states, the last `w`
     keys from the halo.

Sums of several shards merge at the larger level of each feature, with
factors `exp(level - larger) <= 1` (`merge_states`), as the chunked kernel
merges chunks: exact in float32 whatever the inputs' scale. The sums'
gradients flow back through the exchange (the transpose of an all-gather
is a reduce-scatter), so each shard's keys get the gradient of every later
query that read them.

`emulated_shards.emulated_shards` runs the same phases for `n` shards in
one program with the exchange as a Python loop: the reference for the
distributed versions, which run each shard's phases by
`one_shard.one_shard_attention` (`keras_favor.distribute.sequence_parallel`
on JAX, `keras_favor.distribute.replica_sequence_parallel` on TensorFlow).
"""

import math

from keras import ops

from keras_favor.ops import causal_state
from keras_favor.ops import stabilizers
from keras_favor.ops.bidirectional_attention import (
    attend_to_bidirectional_key_sums,
)
from keras_favor.ops.bidirectional_attention import bidirectional_key_sums
from keras_favor.ops.causal_attention import causal_linear_attention
from keras_favor.ops.chunk_scan import pad_positions
from keras_favor.ops.grouped_recompute import RECOMPUTE_LENGTH
from keras_favor.ops.grouped_recompute import position_groups
from keras_favor.ops.grouped_recompute import run_in_groups
from keras_favor.ops.local_window import local_window_attention


def merge_states(key_values, key_sum, level, include=None):
    """Key sums of several shards, stacked on axis 0, summed at the larger
    level of each feature.

    Args:
        key_values: `(n, B, H, F, D)`; key_sum and level `(n, B, H, F)`,
            each shard's sums times `exp(-level)`.
        include: None, or bool `(n,)`: the shards that enter the sum.

    Returns:
        A `CausalState` `(B, H, F, D)`, `(B, H, F)`, `(B, H, F)`; zero sums
        at `NO_KEY_LEVEL` where no included shard holds a key.
    """
    if include is not None:
        level = ops.where(include[:, None, None, None], level, _no_key(level))
    level = ops.stop_gradient(level)
    top = ops.max(level, axis=0)
    factor = ops.exp(level - top)
    if include is not None:
        factor = ops.where(include[:, None, None, None], factor, 0.0)
    return causal_state.CausalState(
        ops.sum(key_values * factor[..., None], axis=0),
        ops.sum(key_sum * factor, axis=0),
        top,
    )


def _no_key(x):
    return ops.full(ops.shape(x), stabilizers.NO_KEY_LEVEL, x.dtype)


def local_key_sums(key, value, feature_fn, mask, recompute_length):
    """`bidirectional_key_sums` of a shard, in groups of at most
    `recompute_length` keys whose features are recomputed in the backward
    pass; a `CausalState` of per-feature levels."""
    slices = position_groups(key.shape[2], recompute_length)
    if len(slices) == 1:
        return causal_state.CausalState(
            *bidirectional_key_sums(key, value, feature_fn, mask)
        )

    def group(index, inputs, shared, carry):
        more = bidirectional_key_sums(*inputs[:2], feature_fn, inputs[2])
        stacked = [ops.stack([a, b]) for a, b in zip(carry, more)]
        return [], list(merge_states(*stacked))

    first = bidirectional_key_sums(
        key[:, :, :1], value[:, :, :1], feature_fn, positions(mask, 0, 1)
    )
    empty = list(_empty_like(first))
    inputs = [
        [key[:, :, s], value[:, :, s], positions(mask, s.start, s.stop)]
        for s in slices
    ]
    _, sums = run_in_groups(group, inputs, carry=empty, keep_last=False)
    return causal_state.CausalState(*sums)


def positions(mask, start, stop):
    """`mask[:, :, start:stop]`, None for None."""
    return None if mask is None else mask[:, :, start:stop]


def halo_sizes(window, shard_length):
    """`(steps, head)`: the window's `w` keys before a shard span the last
    keys of `steps` earlier shards; the keys more than `w` before the shard
    are all of the shards before those and the first `head` keys of the
    earliest of them."""
    steps = math.ceil(window / shard_length)
    return steps, steps * shard_length - window


def shard_states(
    key,
    value,
    feature_fn,
    mask=None,
    window=0,
    recompute_length=RECOMPUTE_LENGTH,
):
    """Phase 1: what a shard of keys gives the other shards.

    Args:
        key: `(B, H, Ls, d)` heads of the shard; value `(B, H, Ls, D)`.
        feature_fn: the keys' feature parts, as `FeatureMap.log_scaled`.
        mask: bool `(B, 1, Ls)`, True at real keys, or None.
        window: int, the causal local window, 0 for none.
        recompute_length: int, keys per group of recomputed features.

    Returns:
        A dict: `sums`, the shard's `CausalState`; with a window, `head`,
        that of its first `h` keys (`halo_sizes`), and `tail`, its last
        `min(w, Ls)` keys, values and mask (float) for the halo.
    """
    states = {
        "sums": local_key_sums(key, value, feature_fn, mask, recompute_length)
    }
    if window:
        length = key.shape[2]
        _, head = halo_sizes(window, length)
        states["head"] = (
            _empty_like(states["sums"])
            if not head
            else (
                local_key_sums(
                    key[:, :, :head],
                    value[:, :, :head],
                    feature_fn,
                    positions(all_keys(mask, key), 0, head),
                    recompute_length,
                )
            )
        )
        tail = slice(max(0, length - window), length)
        states["tail"] = (
            key[:, :, tail],
            value[:, :, tail],
            ops.cast(all_keys(mask, key)[:, :, tail], key.dtype),
        )
    return states


def _empty_like(sums):
    """A `CausalState` of no key, of `sums`' shapes."""
    return causal_state.CausalState(
        ops.zeros_like(sums[0]), ops.zeros_like(sums[1]), _no_key(sums[2])
    )


def all_keys(mask, key):
    """The `(B, 1, L)` key mask, all True for None."""
    if mask is None:
        return ops.ones_like(key[:, :1, :, 0], "bool")
    return mask


def _prefix(sums, index, initial_state):
    """The `CausalState` before shard `index`: `initial_state` and the
    shards before it, from the stacked `sums`."""
    count = ops.shape(sums[1])[0]
    include = ops.arange(count) < index
    if initial_state is not None:
        initial = [ops.cast(x, sums[0].dtype)[None] for x in initial_state]
        sums = [ops.concatenate([a, b]) for a, b in zip(initial, sums)]
        include = ops.concatenate([ops.ones((1,), "bool"), include])
    return merge_states(*sums, include=include)


def _window_state(gathered, halo, index, window, length):
    """The `LocalWindowState` before shard `index`: the sums of the keys
    more than `window` before it (the shards before `index - steps` and the
    first keys of shard `index - steps`, `halo_sizes`) and the halo."""
    steps, _ = halo_sizes(window, length)
    earliest = index - steps
    sums = gathered["sums"]
    count = ops.shape(sums[1])[0]
    head = [
        ops.take(h, ops.maximum(earliest, 0), axis=0)[None]
        for h in gathered["head"]
    ]
    stacked = [ops.concatenate([s, h]) for s, h in zip(sums, head)]
    include = ops.concatenate(
        [ops.arange(count) < earliest, ops.reshape(earliest >= 0, (1,))]
    )
    keys, values, mask = halo
    return causal_state.LocalWindowState(
        *merge_states(*stacked, include=include),
        keys,
        values,
        ops.cast(mask, "bool"),
    )


def shard_outputs(
    query,
    key,
    value,
    feature_fn,
    num_features,
    causal,
    gathered,
    index,
    halo=None,
    mask=None,
    window=0,
    query_feature_fn=None,
    chunk_size=64,
    recompute_length=RECOMPUTE_LENGTH,
    initial_state=None,
    return_state=False,
):
    """Phase 2: the outputs of shard `index`'s queries.

    Args:
        query, key: `(B, H, Ls, d)` heads of the shard; value
            `(B, H, Ls, D)`.
        feature_fn: as for `causal_linear_attention`, and so are
            `num_features`, `query_feature_fn`, `chunk_size` and
            `recompute_length`.
        causal: bool.
        gathered: every shard's `shard_states`, each tensor stacked on a
            new leading axis in shard order.
        index: int or scalar int tensor, the shard's place in the sequence.
        halo: with a window, the `(keys, values, mask)` of the `window`
            positions before the shard (zeros and False before the first).
        mask: bool `(B, 1, Ls)`, True at real keys, or None.
        window: int, the causal local window, 0 for none.
        initial_state: causal, no window: the `CausalState` before the
            first shard, or None.
        return_state: causal, no window: also return the `CausalState`
            after the last shard's last key (the same on every shard).

    Returns:
        `(B, H, Ls, D)` float32 outputs; with `return_state`, also the
        state.
    """
    query_feature_fn = query_feature_fn or feature_fn
    if window:
        if initial_state is not None or return_state:
            raise ValueError(
                "A local window under sequence sharding starts from no key "
                "and returns no state: `initial_state` must be None and "
                "`return_state` False."
            )
        state = _window_state(gathered, halo, index, window, key.shape[2])
        return local_window_attention(
            query,
            key,
            value,
            feature_fn,
            num_features,
            window,
            True,
            mask=mask,
            chunk_size=chunk_size,
            query_feature_fn=feature_fn,
            recompute_length=recompute_length,
            initial_state=state,
        )
    sums = gathered["sums"]
    if not causal:
        total = merge_states(*sums)
        return _attend_in_groups(
            query, total, query_feature_fn, recompute_length
        )
    outputs = causal_linear_attention(
        query,
        key,
        value,
        feature_fn,
        num_features,
        mask=mask,
        chunk_size=chunk_size,
        query_feature_fn=query_feature_fn,
        initial_state=_prefix(sums, index, initial_state),
        recompute_length=recompute_length,
    )
    if not return_state:
        return outputs
    count = ops.shape(sums[1])[0]
    total = _prefix(sums, count, initial_state)
    return outputs, causal_state.per_feature(causal_state.one_level(total))


def _attend_in_groups(query, key_sums, query_feature_fn, recompute_length):
    """`attend_to_bidirectional_key_sums` in groups of recomputed queries."""
    slices = position_groups(query.shape[2], recompute_length)
    if len(slices) == 1:
        return attend_to_bidirectional_key_sums(
            query, key_sums, query_feature_fn
        )

    def group(index, inputs, shared, carry):
        sums = tuple(shared)
        return [
            attend_to_bidirectional_key_sums(inputs[0], sums, query_feature_fn)
        ], []

    outputs, _ = run_in_groups(
        group, [[query[:, :, s]] for s in slices], shared=list(key_sums)
    )
    return ops.concatenate([o[0] for o in outputs], axis=2)


def halo(tails, window):
    """The `window` keys, values and mask before a shard, from the `tail`s
    of the `steps` shards before it (`halo_sizes`), the earliest first (a
    shard before the first gives zeros)."""
    return tuple(
        ops.concatenate(list(parts), axis=2)[:, :, -window:]
        for parts in zip(*tails)
    )


def shard_padding(length, num_shards):
    """Positions added at the end so that `num_shards` shards have one
    length (`ceil(length / num_shards)`)."""
    return (-length) % num_shards


def padded_to_shards(query, key, value, mask, num_shards):
    """Queries and keys each padded at the end to a multiple of
    `num_shards` positions, the added keys masked (the mask stays None
    where no key is added)."""
    padding = shard_padding(query.shape[2], num_shards)
    if padding:
        query = pad_positions(query, padding)
    padding = shard_padding(key.shape[2], num_shards)
    if padding:
        mask = all_keys(mask, key)
        key, value, mask = (
            pad_positions(x, padding) for x in (key, value, mask)
        )
    return query, key, value, mask
