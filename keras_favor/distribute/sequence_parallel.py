"""Context parallelism on JAX: one sequence split across the devices of a
mesh axis, each device attending with its own positions and exchanging
only states.

`FavorAttention` (and so `PerformerBlock` and `build_performer`) shards its
attention along the sequence when, on the JAX backend, the Keras
distribution in effect (`keras.distribution.set_distribution`, or a
distribution's `scope()`) has a device mesh with an axis named
`"sequence"` (`SEQUENCE_AXIS`) of more than one device. The distribution's
`batch_dim_name` axis, when it is another one, keeps sharding the batch.

Inside `jax.shard_map` each device runs the two phases of
`keras_favor.ops.sequence_shards` on its `ceil(L / n)` positions (the
sequence padded at the end with masked keys), with one `all_gather` of
the key sums between them (and, for a local window, `ppermute`s of the
last `w` keys to the next devices). Their transposes, a reduce-scatter and
the reverse `ppermute`, carry the gradients back, so outputs and gradients
equal those of one device to float32 round-off. docs/context_parallel.md
says when it pays and what is exchanged.
"""

import functools

import keras

from keras_favor.ops import causal_state
from keras_favor.ops import one_shard
from keras_favor.ops import sequence_shards

SEQUENCE_AXIS = "sequence"


class SequenceSharding:
    """Where attention is sharded: a JAX mesh, the name of its sequence
    axis and of its batch axis (None to leave the batch unsharded).

    Attributes:
        mesh: a `jax.sharding.Mesh`.
        sequence_axis: str, an axis of `mesh`.
        batch_axis: str or None, another axis of `mesh`.
    """

    def __init__(self, mesh, sequence_axis=SEQUENCE_AXIS, batch_axis=None):
        for name, axis in (
            ("sequence_axis", sequence_axis),
            ("batch_axis", batch_axis),
        ):
            if axis is not None and axis not in mesh.axis_names:
                raise ValueError(
                    f"`{name}` must name an axis of the mesh "
                    f"{tuple(mesh.axis_names)}. Received: {axis!r}"
                )
        if batch_axis == sequence_axis:
            raise ValueError(
                "`batch_axis` must differ from `sequence_axis`. Received: "
                f"{batch_axis!r} for both."
            )
        self.mesh = mesh
        self.sequence_axis = sequence_axis
        self.batch_axis = batch_axis

    @property
    def num_shards(self):
        """The devices along the sequence axis."""
        return self.mesh.shape[self.sequence_axis]

    def sum_over_segments(self, tensors):
        """`tensors` as they are: outside the sharded kernels, arrays hold
        the whole sequence."""
        return tensors


def current_sharding():
    """The `SequenceSharding` of the Keras distribution in effect, or None
    (another backend, no distribution, no `"sequence"` axis of more than
    one device)."""
    if keras.backend.backend() != "jax":
        return None
    distribution = keras.distribution.distribution()
    if distribution is None:
        return None
    device_mesh = distribution.device_mesh
    names = list(device_mesh.axis_names)
    if SEQUENCE_AXIS not in names:
        return None
    if device_mesh.shape[names.index(SEQUENCE_AXIS)] < 2:
        return None
    batch_axis = distribution.batch_dim_name
    if batch_axis == SEQUENCE_AXIS:
        batch_axis = None
    return SequenceSharding(device_mesh.backend_mesh, SEQUENCE_AXIS, batch_axis)


def sharded_linear_attention(
    sharding,
    query,
    key,
    value,
    feature_map,
    projection,
    num_features,
    causal,
    mask=None,
    coefficient=None,
    window=0,
    chunk_size=64,
    recompute_length=sequence_shards.RECOMPUTE_LENGTH,
    initial_state=None,
    return_state=False,
):
    """Linear attention with the positions split across `sharding`'s
    sequence axis: the numbers of one device, with each device holding
    `ceil(L / n)` positions.

    Args:
        sharding: a `SequenceSharding`.
        query, key: `(B, H, L, d)` float32 heads (`S` keys for a
            bidirectional call); value `(B, H, S, D)`.
        feature_map: a `FeatureMap`.
        projection: its `(m, d)` projection, or None.
        coefficient: FAVOR++'s `(B or 1, H, 1, 1)` coefficient (from the
            whole sequence's statistic), or None.
        num_features: int, the features the map makes.
        causal: bool.
        mask: bool `(B, 1, S)`, True at real keys, or None.
        window: int, a causal local window (0 for none).
        chunk_size, recompute_length: as for `causal_linear_attention`.
        initial_state: causal without a window: the `CausalState` before
            position 0, or None.
        return_state: causal without a window: also return the
            `CausalState` after the last position.

    Returns:
        `(B, H, L, D)` float32, and with `return_state` the state.
    """
    jax, shard_map, spec = _jax()
    one_shard.check_shardable(query.shape[2], key.shape[2], causal, window)
    count = sharding.num_shards
    length = query.shape[2]
    if mask is None:
        mask = keras.ops.ones_like(key[:, :1, :, 0], "bool")
    query, key, value, mask = sequence_shards.padded_to_shards(
        query, key, value, mask, count
    )
    batch = _batch_axis(sharding, query.shape[0])
    heads = spec(batch, None, sharding.sequence_axis, None)
    extras = {"projection": projection, "coefficient": coefficient}
    extras_specs = {
        "projection": spec(),
        "coefficient": spec(batch if _has_batch(coefficient) else None),
    }
    if initial_state is not None:
        extras["initial_state"] = tuple(initial_state)
        extras_specs["initial_state"] = (spec(batch),) * 3
    body = functools.partial(
        _shard_body,
        sharding=sharding,
        feature_map=feature_map,
        num_features=num_features,
        causal=causal,
        window=window,
        chunk_size=chunk_size,
        recompute_length=recompute_length,
        return_state=return_state,
    )
    state_spec = (spec(sharding.sequence_axis, batch),) * 3
    run = shard_map(
        body,
        mesh=sharding.mesh,
        in_specs=(
            heads,
            heads,
            heads,
            spec(batch, None, sharding.sequence_axis),
            extras_specs,
        ),
        out_specs=(heads, state_spec) if return_state else heads,
        # The kernels' scans start from constant carries, which JAX's
        # replication types would have to mark as varying over the mesh.
        check_vma=False,
    )
    outputs = run(query, key, value, mask, extras)
    if not return_state:
        return outputs[:, :, :length]
    outputs, states = outputs
    # Every device computed the same final state: take the last one's.
    state = causal_state.CausalState(*(x[-1] for x in states))
    return outputs[:, :, :length], state


def _jax():
    import jax
    from jax.sharding import PartitionSpec

    return jax, jax.shard_map, PartitionSpec


def _has_batch(coefficient):
    return coefficient is not None and coefficient.shape[0] != 1


def _batch_axis(sharding, batch_size):
    """The batch axis when it divides the batch, else None (replicated)."""
    axis = sharding.batch_axis
    if axis is None or batch_size % sharding.mesh.shape[axis]:
        return None
    return axis


def _shard_body(
    query,
    key,
    value,
    mask,
    extras,
    sharding,
    feature_map,
    num_features,
    causal,
    window,
    chunk_size,
    recompute_length,
    return_state,
):
    """One device's part of `sharded_linear_attention`."""
    import jax

    axis = sharding.sequence_axis
    count = sharding.num_shards
    result = one_shard.one_shard_attention(
        query,
        key,
        value,
        mask,
        one_shard.feature_fns(
            feature_map, extras["projection"], extras["coefficient"]
        ),
        num_features,
        causal,
        jax.lax.axis_index(axis),
        lambda x: jax.lax.all_gather(x, axis, axis=0),
        lambda tail, steps: [
            _from_previous(tail, m, axis, count) for m in range(steps, 0, -1)
        ],
        window=window,
        chunk_size=chunk_size,
        recompute_length=recompute_length,
        initial_state=extras.get("initial_state"),
        return_state=return_state,
    )
    if not return_state:
        return result
    outputs, state = result
    return outputs, tuple(x[None] for x in state)


def _from_previous(tensors, steps, axis, count):
    """`tensors` of the device `steps` before this one on `axis` (zeros on
    the first `steps` devices)."""
    import jax

    pairs = [(source, source + steps) for source in range(count - steps)]
    return tuple(jax.lax.ppermute(x, axis, pairs) for x in tensors)
