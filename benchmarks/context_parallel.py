"""Context parallelism: what a sequence-sharded training step exchanges and
holds per device, from XLA's compiled programs on 8 emulated CPU devices.

Nothing here runs a step: each training step (the loss and the gradients
of a causal `build_performer` language model, one sequence) is lowered and
compiled for a `(batch, sequence)` mesh of 1 x 8 emulated devices and for
one device, and read:

- bytes exchanged per attention layer and step: from the states' shapes
  (each device receives the other devices' `K'^T V`, `K'^T 1` and levels),
  and from the compiled program's all-gather (forward) and reduce-scatter
  or all-reduce (backward) instructions;
- per-device peak memory: `compiled.memory_analysis()` (arguments,
  outputs, temporaries), for `L = 2^16 ... 2^21`;
- the longest power-of-two sequence whose step fits a per-device budget.

    python -m benchmarks.context_parallel              # the full table
    python -m benchmarks.context_parallel --lengths 16 17 --budget-gb 4
    python -m benchmarks.context_parallel --lengths 21 --devices 8

Results: benchmarks/results/context_parallel.{csv,json,_summary.txt};
docs: docs/context_parallel.md.
"""

import os
import re

DEVICES_FLAG = "--xla_force_host_platform_device_count"
if __name__ == "__main__":
    # Run as a script: JAX on 8 emulated CPU devices, set before Keras and
    # JAX start. Imported, it leaves the environment as it is.
    if DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" {DEVICES_FLAG}=8"
        ).strip()
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

from benchmarks import common  # noqa: E402

NUM_DEVICES = 8
COLLECTIVES = (
    "all-gather",
    "reduce-scatter",
    "all-reduce",
    "collective-permute",
)
DTYPE_BYTES = {"f32": 4, "s32": 4, "pred": 1, "bf16": 2, "f16": 2, "u32": 4}


def model(length, args):
    """The 2-block causal language model of the measurements."""
    import keras_favor

    return keras_favor.models.build_performer(
        vocabulary_size=args.vocabulary,
        max_length=length,
        num_layers=2,
        num_heads=args.heads,
        hidden_dim=args.hidden_dim,
        task="language_model",
        seed=0,
        num_features=args.features,
    )


def distribution(num_devices):
    """A `(batch, sequence)` mesh of 1 x `num_devices` devices."""
    import keras

    mesh = keras.distribution.DeviceMesh(
        (1, num_devices),
        ("batch", "sequence"),
        keras.distribution.list_devices()[:num_devices],
    )
    return keras.distribution.ModelParallel(
        layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="batch"
    )


def compiled_step(length, num_devices, args):
    """The compiled training step (loss and gradients) of one sequence of
    `length` tokens, sharded along the sequence over `num_devices`."""
    import jax
    import keras
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec

    # The weights live on one device; only their shapes enter the step.
    net = model(length, args)
    loss_fn = keras_favor_loss()
    trainable = [v.value for v in net.trainable_variables]
    non_trainable = [v.value for v in net.non_trainable_variables]
    scope = distribution(num_devices)
    with scope.scope():

        def loss(weights, tokens):
            logits, _ = net.stateless_call(
                weights, non_trainable, tokens[:, :-1], training=True
            )
            return loss_fn(tokens[:, 1:], logits)

        mesh = scope.device_mesh.backend_mesh
        tokens = jax.ShapeDtypeStruct(
            (1, length + 1),
            "int32",
            sharding=NamedSharding(mesh, PartitionSpec()),
        )
        weights = [
            jax.ShapeDtypeStruct(
                w.shape, w.dtype, sharding=NamedSharding(mesh, PartitionSpec())
            )
            for w in trainable
        ]
        step = jax.jit(jax.value_and_grad(loss))
        compiled = step.lower(weights, tokens).compile()
    keras.backend.clear_session()
    return compiled


def keras_favor_loss():
    import keras_favor

    return keras_favor.models.language_model_loss()


def state_bytes(args, num_devices):
    """Bytes one device receives per attention layer and step, float32, one
    sequence: the other devices' states forward (all-gather of `K'^T V`,
    `K'^T 1` and the levels), and the gradients of the sums backward
    (reduce-scatter; the levels have none). Returns them and one state's
    bytes."""
    key_dim = args.hidden_dim // args.heads
    sums = args.heads * args.features * (key_dim + 1) * 4
    per_state = sums + args.heads * args.features * 4
    return (num_devices - 1) * (per_state + sums), per_state


def collective_bytes(compiled):
    """The bytes of each collective's result in the compiled program's
    text, summed per collective kind (per device)."""
    totals = dict.fromkeys(COLLECTIVES, 0)
    pattern = re.compile(
        r"=\s*\(?([a-z0-9]+)\[([0-9,]*)\][^=]*?\s("
        + "|".join(COLLECTIVES)
        + r")\("
    )
    for line in compiled.as_text().splitlines():
        match = pattern.search(line)
        if not match:
            continue
        dtype, dims, kind = match.groups()
        size = 1
        for d in filter(None, dims.split(",")):
            size *= int(d)
        totals[kind] += size * DTYPE_BYTES.get(dtype, 4)
    return totals


def peak_bytes(compiled):
    """Per-device bytes of the compiled step: arguments, outputs and
    temporaries (aliased buffers counted once)."""
    memory = compiled.memory_analysis()
    return (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )


def measure(args):
    rows = []
    for exponent in args.lengths:
        length = 2**exponent
        for devices in args.devices:
            compiled = compiled_step(length, devices, args)
            row = {
                "length": length,
                "devices": devices,
                "peak_per_device_mib": peak_bytes(compiled) / 2**20,
            }
            row.update(
                {
                    f"{kind}_bytes": value
                    for kind, value in collective_bytes(compiled).items()
                }
            )
            rows.append(row)
            print(row, flush=True)
    return rows


def summary(rows, args):
    exchanged, per_state = state_bytes(args, NUM_DEVICES)
    lines = [
        f"2-block causal LM, hidden {args.hidden_dim}, {args.heads} heads, "
        f"{args.features} features, vocabulary {args.vocabulary}, one "
        "sequence; training step compiled (XLA CPU), not run.",
        f"State per device and layer: {per_state} bytes; received per layer "
        f"and step on {NUM_DEVICES} devices (forward + backward): "
        f"{exchanged} bytes, whatever the length.",
        "length  devices  peak/device MiB  all-gather B  reduce-scatter B  "
        "all-reduce B  permute B",
    ]
    for row in rows:
        lines.append(
            f"{row['length']:>7} {row['devices']:>8} "
            f"{row['peak_per_device_mib']:>16.1f} "
            f"{row['all-gather_bytes']:>13} {row['reduce-scatter_bytes']:>17} "
            f"{row['all-reduce_bytes']:>13} {row['collective-permute_bytes']:>10}"
        )
    budget = args.budget_gb * 2**30
    for devices in args.devices:
        fits = [
            r["length"]
            for r in rows
            if r["devices"] == devices
            and r["peak_per_device_mib"] * 2**20 <= budget
        ]
        longest = max(fits) if fits else "none measured"
        lines.append(
            f"Longest measured length within {args.budget_gb} GiB per device "
            f"on {devices} device(s): {longest}"
        )
    return lines


def main(argv=None):
    args = common.parse_args(
        __doc__,
        argv,
        lengths=([16, 17, 18, 19, 20, 21], "log2 of the sequence lengths"),
        hidden_dim=64,
        heads=4,
        features=64,
        vocabulary=256,
        budget_gb=(16.0, "per-device memory budget, GiB"),
        devices=(["1", "8"], "device counts along the sequence (1 or 8)"),
    )
    args.lengths = [int(x) for x in args.lengths]
    args.devices = [int(x) for x in args.devices]
    environment = common.describe()
    rows = measure(args)
    fields = list(rows[0])
    common.write_results(
        args, "context_parallel", fields, rows, summary(rows, args), environment
    )


if __name__ == "__main__":
    main()
