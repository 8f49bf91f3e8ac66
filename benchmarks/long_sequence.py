"""One FavorAttention layer's training step at up to 2^19 positions.

One `FavorAttention` (8 heads of 64, 256 features, model dimension 512,
batch 1, float32) takes a compiled forward + backward step, causal and
bidirectional, each length in a process of its own: the step's time and
the process's peak resident memory. Over two or more lengths the script
fits peak memory as a line in `L` and extrapolates it to `--target`.

A watchdog (`common.run_worker`) kills a worker whose resident memory
passes `--limit-gib`, and a length runs only while the machine has that
much memory available (`/proc/meminfo`), unless `--force`:

    python -m benchmarks.long_sequence --lengths 32768 65536 131072
    python -m benchmarks.long_sequence --lengths 524288     # needs 18 GiB

`--csv` keeps the rows of the modes and lengths that a run does not measure,
so that each mode can run on its own, from an idle machine.
"""

import argparse
import csv
import json
import os
import sys
import time

from benchmarks import common

RECOMPUTE_LENGTH = 32768
FIELDS = (
    "mode",
    "length",
    "status",
    "first_s",
    "step_s",
    "peak_rss_mib",
    "available_gib",
    "load_average",
    "note",
)


def available_gib():
    with open("/proc/meminfo") as file:
        for line in file:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def step(mode, length, recompute_length, repeats):
    """Times `repeats` training steps after one untimed call."""
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_favor

    layer = keras_favor.FavorAttention(
        8, 64, num_features=256, seed=0, recompute_length=recompute_length
    )
    layer.build((1, length, 512), (1, length, 512))
    # float32 from the start: no float64 copy of a 1 GiB input.
    x = np.random.default_rng(0).standard_normal(
        (1, length, 512), dtype=np.float32
    )
    x = keras.ops.convert_to_tensor(x)
    variables = layer.trainable_variables

    @tf.function
    def train_step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, x, use_causal_mask=mode == "causal"))
        return tf.add_n(
            [tf.reduce_sum(g) for g in tape.gradient(loss, variables)]
        )

    started = time.perf_counter()
    float(train_step(x))
    first = time.perf_counter() - started
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        float(train_step(x))
        times.append(time.perf_counter() - started)
    return {"first_s": round(first, 2), "step_s": round(min(times), 2)}


def worker(mode, length, recompute_length, repeats):
    result = step(mode, length, recompute_length, repeats)
    result["peak_rss_mib"] = round(common.peak_rss_mib(), 1)
    print("RESULT " + json.dumps(result), flush=True)


def fit_line(points):
    """Least-squares `(intercept, slope)` of `(x, y)` points."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum(
        (x - mean_x) ** 2 for x, _ in points
    )
    return mean_y - slope * mean_x, slope


def with_earlier_rows(path, rows):
    """The rows of the CSV at `path` whose mode and length `rows` do not
    measure, then `rows`."""
    if not os.path.exists(path):
        return rows
    measured = {(row["mode"], int(row["length"])) for row in rows}
    with open(path, newline="") as file:
        earlier = [
            row
            for row in csv.DictReader(file)
            if (row["mode"], int(row["length"])) not in measured
        ]
    return earlier + rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--lengths", type=int, nargs="+", default=[2**19])
    add("--modes", nargs="+", default=["causal", "bidirectional"])
    add("--recompute-length", type=int, default=RECOMPUTE_LENGTH)
    add("--repeats", type=int, default=1, help="timed steps after the first")
    add("--limit-gib", type=float, default=18.0)
    add("--target", type=int, default=2**19)
    add("--force", action="store_true", help="run without free memory")
    add("--csv", default="benchmarks/results/long_sequence.csv")
    add("--timeout-s", type=float, default=3600.0)
    add("--worker", nargs=4, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        mode, *numbers = args.worker
        worker(mode, *map(int, numbers))
        return
    # The watchdog's settings (`common.run_worker`), in GiB.
    args.memory_cap_gb, args.reserve_gb = args.limit_gib, 0.5
    rows = []
    for mode in args.modes:
        for length in args.lengths:
            free = available_gib()
            row = {
                "mode": mode,
                "length": length,
                "available_gib": round(free, 1),
            }
            row["load_average"] = round(os.getloadavg()[0], 2)
            if free < args.limit_gib and not args.force:
                row["status"] = f"not run: {free:.1f} GiB available"
            else:
                command = common.module_command(
                    "long_sequence",
                    "--worker",
                    mode,
                    str(length),
                    str(args.recompute_length),
                    str(args.repeats),
                )
                result = common.run_worker(
                    command, common.worker_env(TF_CPP_MIN_LOG_LEVEL="2"), args
                )
                row.update(result)
            rows.append(row)
            print(json.dumps(row), flush=True)
    common.write_csv(args.csv, FIELDS, with_earlier_rows(args.csv, rows))
    for mode in args.modes:
        points = [
            (r["length"], r["peak_rss_mib"])
            for r in rows
            if r["mode"] == mode and r.get("peak_rss_mib")
        ]
        if len(points) >= 2:
            intercept, slope = fit_line(points)
            print(
                f"{mode}: peak {intercept:.0f} MiB + {slope * 1024:.1f} KiB "
                f"per position; at L = {args.target}: "
                f"{(intercept + slope * args.target) / 1024:.1f} GiB"
            )


if __name__ == "__main__":
    sys.exit(main())
