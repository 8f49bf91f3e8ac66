"""Sequence sharding emulated in one program: the reference.

`emulated_shards` runs the two phases of `sequence_shards` for `n`
consecutive shards of one sequence, shard after shard, the exchange a
Python loop over their states. It computes what `n` devices compute
together under `keras_favor.distribute.sequence_parallel` (or `n`
replicas under `keras_favor.distribute.replica_sequence_parallel`), on
any backend, and so pins down the math apart from the collectives.
"""

from keras import ops

from keras_favor.ops.grouped_recompute import RECOMPUTE_LENGTH
from keras_favor.ops.sequence_shards import halo
from keras_favor.ops.sequence_shards import halo_sizes
from keras_favor.ops.sequence_shards import padded_to_shards
from keras_favor.ops.sequence_shards import positions
from keras_favor.ops.sequence_shards import shard_outputs
from keras_favor.ops.sequence_shards import shard_states


def emulated_shards(
    query,
    key,
    value,
    feature_fn,
    num_features,
    causal,
    num_shards,
    mask=None,
    window=0,
    initial_state=None,
    return_state=False,
    **options,
):
    """`num_shards` shards of one sequence, each phase run shard after
    shard in one program, the exchange a Python loop: the reference for
    the distributed version, on any backend.

    Args:
        query, key: `(B, H, L, d)`; value `(B, H, L, D)`; `L` need not be
            a multiple of `num_shards` (`padded_to_shards`).
        feature_fn: as for `shard_states` and `shard_outputs`, and so
            are `num_features`, `causal`, `mask`, `window`,
            `initial_state` and `return_state`.
        num_shards: int >= 1.
        **options: `query_feature_fn`, `chunk_size`, `recompute_length`.

    Returns:
        As `shard_outputs`, for the whole sequence.
    """
    length = query.shape[2]
    query, key, value, mask = padded_to_shards(
        query, key, value, mask, num_shards
    )
    size = query.shape[2] // num_shards
    shards = [slice(i * size, (i + 1) * size) for i in range(num_shards)]
    recompute = options.get("recompute_length", RECOMPUTE_LENGTH)
    states = [
        shard_states(
            key[:, :, s],
            value[:, :, s],
            feature_fn,
            positions(mask, s.start, s.stop),
            window,
            recompute,
        )
        for s in shards
    ]
    gathered = _stacked(states)
    outputs = []
    for index, s in enumerate(shards):
        halo_keys = None
        if window:
            steps, _ = halo_sizes(window, size)
            halo_keys = halo(
                [_tail_of(states, index - m) for m in range(steps, 0, -1)],
                window,
            )
        outputs.append(
            shard_outputs(
                query[:, :, s],
                key[:, :, s],
                value[:, :, s],
                feature_fn,
                num_features,
                causal,
                gathered,
                index,
                halo=halo_keys,
                mask=positions(mask, s.start, s.stop),
                window=window,
                initial_state=initial_state,
                return_state=return_state,
                **options,
            )
        )
    if return_state:
        return _joined([o[0] for o in outputs], length), outputs[-1][1]
    return _joined(outputs, length)


def _stacked(states):
    """Each shard's `shard_states`, each tensor stacked in shard order."""
    return {
        name: tuple(
            ops.stack([s[name][i] for s in states])
            for i in range(len(states[0][name]))
        )
        for name in states[0]
    }


def _tail_of(states, index):
    """Shard `index`'s `tail`, zeros before the first shard."""
    tail = states[max(index, 0)]["tail"]
    return tail if index >= 0 else tuple(ops.zeros_like(x) for x in tail)


def _joined(outputs, length):
    return ops.concatenate(outputs, axis=2)[:, :, :length]
