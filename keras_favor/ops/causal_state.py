"""The states that causal attention carries from one piece of a sequence to
the next: their layout, their value before any key, and their checks.

- `CausalState`, of `causal_linear_attention`: the running sums over the
  keys so far.
- `LocalWindowState`, of causal `local_window_attention`: the same sums
  over the keys that have left the window, and the window's last keys.

Both are named tuples of tensors: they pass through `tf.function`,
`jax.jit` and Keras's `cache` arguments as plain nested structures, and a
plain tuple of the same tensors in the same order is accepted wherever a
state is (`FavorAttention.empty_cache` returns one).

The sums of each feature are stored times `exp(-level)`, with `level` the
running maximum of that feature's log-scale over the keys so far, so that
no stored number leaves float32's range at any input scale
(docs/numerics.md, section 5). Before any key the sums are zero and the
level is `NO_KEY_LEVEL`. The chunked algorithm carries one level per batch
row and head instead, the largest of the features' (`one_level`); the
stored state always has one per feature (`per_feature`).
"""

from typing import NamedTuple

from keras import ops

from keras_favor.ops import stabilizers
from keras_favor.validation import check_cache_shapes


class CausalState(NamedTuple):
    """The state of causal linear attention after some keys.

    Attributes:
        key_values: `(B, H, F, D)`, `sum_s phi(k_s) v_s^T` over the keys so
            far, each feature `f` times `exp(-level_f)`.
        key_sum: `(B, H, F)`, `sum_s phi(k_s)`, scaled alike.
        level: `(B, H, F)`, each feature's stabilizer level.
    """

    key_values: object
    key_sum: object
    level: object

    @staticmethod
    def shapes(batch_size, num_heads, num_features, value_dim):
        """The fields' shapes, as a `CausalState` of shape tuples."""
        heads = (batch_size, num_heads)
        return CausalState(
            heads + (num_features, value_dim),
            heads + (num_features,),
            heads + (num_features,),
        )


class LocalWindowState(NamedTuple):
    """The state of causal local-window attention after some keys.

    Attributes:
        key_values, key_sum, level: the `CausalState` of the keys that have
            left the window (`causal`).
        window_keys: `(B, H, n, d)`, the last `n` keys, the oldest first.
        window_values: `(B, H, n, D)`, their values.
        window_mask: bool `(B, 1, n)`, False where no key has come yet or
            the key is masked.
    """

    key_values: object
    key_sum: object
    level: object
    window_keys: object
    window_values: object
    window_mask: object

    @property
    def causal(self):
        """The `CausalState` of the keys beyond the window."""
        return CausalState(*self[:3])

    @staticmethod
    def shapes(batch_size, num_heads, num_features, key_dim, value_dim, window):
        """The fields' shapes, as a `LocalWindowState` of shape tuples."""
        heads = (batch_size, num_heads)
        causal = CausalState.shapes(
            batch_size, num_heads, num_features, value_dim
        )
        return LocalWindowState(
            *causal,
            heads + (window, key_dim),
            heads + (window, value_dim),
            (batch_size, 1, window),
        )


def empty_causal_state(
    batch_size, num_heads, num_features, value_dim, dtype="float32"
):
    """The `CausalState` before any key: zero sums at no level.

    Args:
        batch_size: int or scalar int tensor.
        num_heads, num_features, value_dim: ints `H`, `F`, `D`.
        dtype: the sums' floating dtype.

    Returns:
        A `CausalState` of shapes `CausalState.shapes(...)`.
    """
    shapes = CausalState.shapes(batch_size, num_heads, num_features, value_dim)
    return CausalState(
        ops.zeros(shapes.key_values, dtype),
        ops.zeros(shapes.key_sum, dtype),
        ops.full(shapes.level, stabilizers.NO_KEY_LEVEL, dtype),
    )


def empty_local_window_state(
    batch_size,
    num_heads,
    num_features,
    key_dim,
    value_dim,
    window,
    dtype="float32",
):
    """The `LocalWindowState` before any key: an empty `CausalState` and a
    window of `window` slots, none holding a key.

    Args:
        batch_size: int or scalar int tensor.
        num_heads, num_features, key_dim, value_dim: ints `H`, `F`, `d`,
            `D`.
        window: int, the keys the window keeps.
        dtype: the floating dtype.

    Returns:
        A `LocalWindowState` of shapes `LocalWindowState.shapes(...)`.
    """
    shapes = LocalWindowState.shapes(
        batch_size, num_heads, num_features, key_dim, value_dim, window
    )
    return LocalWindowState(
        *empty_causal_state(
            batch_size, num_heads, num_features, value_dim, dtype
        ),
        ops.zeros(shapes.window_keys, dtype),
        ops.zeros(shapes.window_values, dtype),
        ops.zeros(shapes.window_mask, "bool"),
    )


def check_state(state, shapes, argument, maker, inputs_name="query"):
    """A `ValueError` naming `argument` and the field unless `state` is a
    tuple of tensors of `shapes`.

    Args:
        state: the state received.
        shapes: a `CausalState` or `LocalWindowState` of shape tuples, None
            for a size that may be anything.
        argument: str, the argument that holds `state` (`"initial_state"`,
            `"cache"`).
        maker: str, the call that makes such a state, for the message.
        inputs_name: str, the argument whose batch the shapes carry.
    """
    check_cache_shapes(
        state,
        shapes,
        inputs_name,
        maker,
        argument=argument,
        names=shapes._fields,
    )


def one_level(state):
    """`state` with one level per batch row and head, the largest of its
    features' levels: a `CausalState` whose `level` is `(B, H)`, each
    feature's sums rescaled to it (factors <= 1)."""
    top = ops.max(state.level, axis=-1)
    to_top = ops.exp(state.level - top[..., None])
    return CausalState(
        state.key_values * to_top[..., None], state.key_sum * to_top, top
    )


def per_feature(state):
    """A `one_level` state with its level repeated for every feature."""
    level = state.level[..., None] + ops.zeros_like(state.key_sum)
    return CausalState(state.key_values, state.key_sum, level)
