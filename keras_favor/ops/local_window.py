"""Exact softmax attention over nearby keys, random features beyond them.

The softmax feature maps estimate the very kernel `exp(q . k / sqrt(d))` that
softmax attention weighs keys by, so each query can take the exact kernel
for the keys within a window of its position and the random-feature
estimate for all other keys, with numerator and denominator summed together:
one normalizer over all keys (docs/numerics.md, section 9).

- Causal: query `t` takes keys `t - w < s <= t` exactly and keys `s <= t - w`
  through causal linear attention over the keys delayed by `w` positions.
- Bidirectional: keys `|t - s| < w` exactly, keys `s <= t - w` as in the
  causal mode and keys `s >= t + w` by the same on the reversed sequence.

Each part comes as `(numerator, denominator, shift)` (the sums over its keys
times `exp(-shift)`), and the parts are summed at the larger shift, with
factors `<= 1` (`merge_attention_parts`). The window part costs
`O(L min(w, L) d)` time (`exact_window`). A window at least as long as the
sequence leaves no key to the random features: the call is exact softmax
attention at its cost, and a cached step attends to the `w` keys it keeps,
`O(w d)`.
"""

from keras import ops

from keras_favor.ops import causal_state
from keras_favor.ops import stabilizers
from keras_favor.ops.causal_attention import causal_linear_attention
from keras_favor.ops.exact_window import banded_window_parts
from keras_favor.ops.exact_window import dense_window_parts
from keras_favor.ops.exact_window import window_attention_parts


def merge_attention_parts(parts):
    """Outputs of attention parts over disjoint keys, with one normalizer.

    Args:
        parts: `(numerator (B, H, L, D), denominator (B, H, L), shift
            (B, H, L))` triples, as `causal_linear_attention(...,
            normalized=False)` returns them.

    Returns:
        `(B, H, L, D)`: `sum numerator exp(shift) / sum denominator
        exp(shift)`, and 0 for a query that sees no key in any part.
    """
    top = ops.stop_gradient(
        ops.max(ops.stack([shift for _, _, shift in parts]), axis=0)
    )
    numerator, denominator = 0.0, 0.0
    for part_numerator, part_denominator, shift in parts:
        factor = ops.exp(shift - top)
        numerator += part_numerator * factor[..., None]
        denominator += part_denominator * factor
    return stabilizers.normalize(numerator, denominator)


def _delayed(x, lag, fill=0):
    """`x` along axis 2 delayed by `lag` positions, `fill` before them."""
    length = ops.shape(x)[2]
    widths = [(0, 0), (0, 0), (lag, 0)] + [(0, 0)] * (len(x.shape) - 3)
    return ops.pad(x, widths, constant_values=fill)[:, :, :length]


def _all_keys(mask, query):
    """The `(B, 1, L)` key mask, all True for None."""
    if mask is None:
        return ops.ones_like(query[:, :1, :, 0], "bool")
    return mask


def _causal_parts(query, key, value, mask, window, state, seeds, options):
    """Parts of causal queries over the keys before them in the
    `LocalWindowState` `state` and their own, and the state after them.

    With the window's keys before the queries prepended, query `i` of the
    piece finds its far keys at positions `<= i` of the joined keys (causal
    linear attention from the carried state) and its near keys at positions
    `i < j <= i + w` (the window part, the queries at the last positions).
    """
    length = ops.shape(query)[2]
    keys, values, keys_mask = (
        ops.concatenate([before, x], axis=2)
        for before, x in (
            (state.window_keys, key),
            (state.window_values, value),
            (state.window_mask, _all_keys(mask, query)),
        )
    )
    far, far_state = causal_linear_attention(
        query,
        keys[:, :, :length],
        values[:, :, :length],
        mask=keys_mask[:, :, :length],
        initial_state=state.causal,
        return_state=True,
        normalized=False,
        dropout_seed=seeds[1],
        **options,
    )
    near = window_attention_parts(
        query,
        keys,
        values,
        window,
        True,
        keys_mask,
        options["dropout_rate"],
        seeds[0],
    )
    state = causal_state.LocalWindowState(
        *far_state,
        keys[:, :, length:],
        values[:, :, length:],
        keys_mask[:, :, length:],
    )
    return [near, far], state


def _far_parts(query, key, value, mask, window, causal, seeds, options):
    """Parts of the keys `w` or more before each query (and, bidirectional,
    after it): causal linear attention over the keys delayed by `w`."""
    parts = []
    for seed, flip in zip(seeds[1:], (False, True)[: 1 if causal else 2]):
        order = (lambda x: ops.flip(x, axis=2)) if flip else (lambda x: x)
        q, k, v, m = (
            order(x) for x in (query, key, value, _all_keys(mask, query))
        )
        earlier = causal_linear_attention(
            q,
            _delayed(k, window),
            _delayed(v, window),
            mask=_delayed(m, window, False),
            dropout_seed=seed,
            normalized=False,
            **options,
        )
        parts.append(tuple(order(x) for x in earlier))
    return parts


def _call_outputs(query, key, value, mask, window, causal, seeds, options):
    """The outputs of a call without a state.

    Where every key lies within the window of every query (`L <= w`), the
    random-feature parts are empty and are not computed: exact softmax
    attention, at its cost.
    """
    if mask is None:
        mask = ops.ones_like(key[:1, :1, :, 0], "bool")
    args = (
        query,
        key,
        value,
        window,
        causal,
        mask,
        options["dropout_rate"],
        seeds[0],
    )

    def exact():
        return stabilizers.normalize(*dense_window_parts(*args)[:2])

    def mixed():
        near = banded_window_parts(*args)
        far = _far_parts(
            query, key, value, mask, window, causal, seeds, options
        )
        return merge_attention_parts([near, *far])

    length = query.shape[2]
    if length is not None:
        return exact() if length <= window else mixed()
    return ops.cond(ops.shape(query)[2] <= window, exact, mixed)


def _no_outputs(query, value):
    """The `(B, H, 0, D)` outputs of no position."""
    return ops.zeros(ops.shape(query)[:3] + ops.shape(value)[3:])


def _initial_state(initial_state, query, key, value, num_features, window):
    """The checked `LocalWindowState` `initial_state`, or the empty one."""
    if initial_state is None:
        batch, heads = ops.shape(query)[:2]
        return causal_state.empty_local_window_state(
            batch,
            heads,
            num_features,
            ops.shape(key)[-1],
            ops.shape(value)[-1],
            window,
            value.dtype,
        )
    causal_state.check_state(
        initial_state,
        causal_state.LocalWindowState.shapes(
            *query.shape[:2], num_features, key.shape[-1], value.shape[-1], None
        ),
        "initial_state",
        "local_window_attention(..., return_state=True)",
    )
    return causal_state.LocalWindowState(*initial_state)


def local_window_attention(
    query,
    key,
    value,
    feature_fn,
    num_features,
    window,
    causal,
    mask=None,
    chunk_size=64,
    dropout_rate=0.0,
    dropout_seed=None,
    query_feature_fn=None,
    recompute_length=None,
    initial_state=None,
    return_state=False,
):
    """Exact attention within `window`, random features beyond it, with one
    normalizer (module docstring).

    Args:
        query, key: `(B, H, L, d)` heads of one length; value `(B, H, L, D)`.
        feature_fn, num_features, chunk_size, recompute_length: as for
            `causal_linear_attention`. The feature map must estimate the
            softmax kernel, and `query_feature_fn` (default `feature_fn`)
            must give the queries' full features, with no factor left out,
            so that both parts weigh keys in the same units.
        window: int >= 1, see `exact_window.window_attention_parts`.
        causal: bool.
        mask: bool `(B, 1, L)`, True at real keys, or None.
        dropout_rate, dropout_seed: dropout of the numerator, in both parts.
        initial_state: causal only: the `LocalWindowState` before position
            0 (or a tuple of its tensors), as returned with
            `return_state=True`, or None for no key yet
            (`empty_local_window_state`). Its window may keep fewer than
            `window` keys, as many as the positions it will see.
        return_state: bool, causal only: also return the state after the
            last key. A sequence run in pieces, each given the state the
            previous one returned, gives the outputs of the whole.

    Returns:
        `(B, H, L, D)` float32, and with `return_state=True` the tuple
        `(outputs, state)`.
    """
    if not causal and (initial_state is not None or return_state):
        raise ValueError(
            "A local-window state exists for causal attention only: "
            "bidirectional queries also see keys after them."
        )
    seeds = [None] * 3
    if dropout_rate:
        seeds = [
            ops.cast(ops.convert_to_tensor(dropout_seed), "int32") + i
            for i in range(3)
        ]
    options = dict(
        feature_fn=feature_fn,
        num_features=num_features,
        chunk_size=chunk_size,
        dropout_rate=dropout_rate,
        query_feature_fn=query_feature_fn,
    )
    if recompute_length is not None:
        options["recompute_length"] = recompute_length
    length = query.shape[2]
    if initial_state is None and not return_state:
        if length == 0:
            return _no_outputs(query, value)
        return _call_outputs(
            query, key, value, mask, window, causal, seeds, options
        )
    initial_state = _initial_state(
        initial_state, query, key, value, num_features, window
    )
    if length == 0:
        outputs, state = _no_outputs(query, value), initial_state
    else:
        parts, state = _causal_parts(
            query, key, value, mask, window, initial_state, seeds, options
        )
        outputs = merge_attention_parts(parts)
    return (outputs, state) if return_state else outputs
