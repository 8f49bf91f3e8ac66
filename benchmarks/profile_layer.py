"""Where the time of one attention step goes: TensorFlow profiler op totals.

Times the compiled step like `speed_memory.py`, then traces one more step
with the TensorFlow profiler and prints the ops with the largest total
time, by op name and by op type. CPU only (it reads the host plane).

    python benchmarks/profile_layer.py --length 8192 --mode causal \
        --pass forward_backward --chunk-size 64
"""

import argparse
import collections
import glob
import statistics
import tempfile

import tensorflow as tf
from tensorflow.tsl.profiler.protobuf import xplane_pb2

import models
import timing

# The executor's own spans contain the op events; counting them would
# count every op twice.
EXECUTOR_EVENTS = ("ExecutorState::Process",)


def op_totals(logdir):
    """Total milliseconds per op name on the host's compute threads."""
    path = sorted(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True))[-1]
    space = xplane_pb2.XSpace()
    with open(path, "rb") as file:
        space.ParseFromString(file.read())
    totals = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if name not in EXECUTOR_EVENTS:
                    totals[name] += event.duration_ps / 1e9
    return totals


def by_type(totals):
    """Sums `scope/op:Type` totals by `Type`."""
    types = collections.Counter()
    for name, ms in totals.items():
        types[name.rsplit(":", 1)[-1]] += ms
    return types


def print_table(title, totals, top):
    print(f"\n{title} (total {sum(totals.values()):.0f} ms)")
    for name, ms in totals.most_common(top):
        print(f"{ms:9.1f} ms  {name}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--mode", choices=("bidirectional", "causal"), default="bidirectional")
    parser.add_argument("--pass", dest="pass_", choices=timing.PASSES, default="forward_backward")
    parser.add_argument("--model", choices=models.ATTENTIONS, default="favor")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--jit", action="store_true", help="compile with XLA")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    layer = models.attention_layer(args.model, args.chunk_size)
    shape = (1, args.length, models.HIDDEN)
    layer.build(shape, shape)
    causal = args.mode == "causal"
    step = timing.compiled_step(
        lambda x: layer(x, x, use_causal_mask=causal),
        layer.trainable_variables,
        args.pass_,
        jit_compile=args.jit,
    )
    x = timing.random_inputs(args.length, models.HIDDEN)
    first, times = timing.time_step(step, x, args.repeats)
    print(
        f"{args.model} {args.mode} {args.pass_} L={args.length} "
        f"chunk={args.chunk_size} jit={args.jit}: median "
        f"{statistics.median(times):.3f} s of {[round(t, 3) for t in times]}, "
        f"first call {first:.1f} s, peak RSS {timing.peak_rss_mib():.0f} MB"
    )
    if args.jit:
        return  # XLA fuses the ops: the op table says little.
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        step(x).numpy()
        tf.profiler.experimental.stop()
        totals = op_totals(logdir)
    print_table("By op type", by_type(totals), args.top)
    print_table("By op", totals, args.top)


if __name__ == "__main__":
    main()
