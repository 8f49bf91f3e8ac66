"""What arithmetic allows: the FLOPs of one training step and this machine's rate.

Counts the floating-point operations of the bidirectional forward + backward
step that `speed_memory.py` times for `FavorAttention` and for exact
`keras.layers.MultiHeadAttention`, measures how fast this machine multiplies
matrices, and reads the measured step times from the speed CSV. From these it
reports each model's achieved rate and the rate FAVOR+ would need for a given
speed-up over exact attention (issue 5's 10x at L = 8192).

    python benchmarks/flop_bound.py          # after speed_memory.py

Only matrix products are counted (2 FLOPs per multiply-add); the elementwise
work (exponentials, softmax, normalisation) is left out, so a needed rate is
a lower bound on what the implementation would have to reach.
"""

import argparse
import csv
import os
import time

import common
import models

# (rows, inner, columns) of the products timed for the machine's rate: a
# projection of the benchmark at L = 8192, and a large square product.
RATE_SHAPES = ((8192, models.HIDDEN, models.HIDDEN), (4096, 4096, 4096))


def projection_flops(length):
    """Query, key, value and output projections, forward and backward.

    The query, key and value products, the four kernels' gradients and the
    output projection's input gradient. TensorFlow prunes the rest: the
    benchmark's input takes no gradient, and the timed step returns only
    gradients, which for a sum of outputs need no output projection.
    """
    return 8 * 2 * length * models.HIDDEN * models.HIDDEN


def favor_step_flops(length):
    """FavorAttention's bidirectional step, projections included.

    Forward: the query and key feature projections `(L, d) x (d, F)`, then
    `K'^T V` and `Q' (K'^T V)`. Backward: the gradients of `Q'`, `K'^T V`,
    `K'` and `V`, and of the query and key heads through the projections.
    Ten products of `2 L H F d` FLOPs each.
    """
    core = 10 * 2 * length * models.NUM_HEADS * models.NUM_FEATURES * models.KEY_DIM
    return projection_flops(length) + core


def exact_step_flops(length):
    """Exact attention's step: `Q K^T` and `A V`, each with two gradients."""
    core = 6 * 2 * length * length * models.NUM_HEADS * models.KEY_DIM
    return projection_flops(length) + core


def matmul_rate(rows, inner, columns, repeats=20):
    """Best GFLOP/s of a float32 `(rows, inner) x (inner, columns)` product."""
    import tensorflow as tf

    a = tf.random.normal((rows, inner))
    b = tf.random.normal((inner, columns))
    product = tf.function(lambda a, b: tf.reduce_sum(tf.matmul(a, b)))
    product(a, b).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, b).numpy()
        times.append(time.perf_counter() - start)
    return 2 * rows * inner * columns / min(times) / 1e9


def measured_medians(csv_path):
    """`{(model, length): median_s}` of the bidirectional layer steps."""
    medians = {}
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            if (
                row["level"] == "layer"
                and row["mode"] == "bidirectional"
                and row["pass"] == "forward_backward"
                and row["status"] == "ok"
            ):
                medians[row["model"], int(row["length"])] = float(row["median_s"])
    return medians


def report(medians, rates, target_speedup):
    """Lines comparing achieved rates with what `target_speedup` needs."""
    best_rate = max(rates.values())
    lines = [
        "matrix-product rate of this machine (float32, best of 20): "
        + ", ".join(f"{'x'.join(map(str, s))}: {r:.0f} GFLOP/s" for s, r in rates.items())
    ]
    lengths = sorted(
        length for model, length in medians if model == "favor" and ("exact", length) in medians
    )
    for length in lengths:
        favor_flops, exact_flops = favor_step_flops(length), exact_step_flops(length)
        favor_s, exact_s = medians["favor", length], medians["exact", length]
        needed_rate = favor_flops / (exact_s / target_speedup) / 1e9
        lines.append(
            f"L={length}: FAVOR+ {favor_flops / 1e9:.1f} GFLOP in {favor_s:.3f} s "
            f"= {favor_flops / favor_s / 1e9:.0f} GFLOP/s; exact {exact_flops / 1e9:.1f} GFLOP "
            f"in {exact_s:.3f} s = {exact_flops / exact_s / 1e9:.0f} GFLOP/s; "
            f"FLOP ratio {exact_flops / favor_flops:.1f}x, measured {exact_s / favor_s:.1f}x; "
            f"{target_speedup:g}x needs FAVOR+ at {needed_rate:.0f} GFLOP/s "
            f"({needed_rate / best_rate:.0%} of the best product rate) in matrix products alone"
        )
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=os.path.join(common.RESULTS_DIR, "speed_memory_cpu.csv"))
    parser.add_argument("--target-speedup", type=float, default=10.0)
    parser.add_argument("--output", default=os.path.join(common.RESULTS_DIR, "flop_bound_cpu.txt"))
    args = parser.parse_args()
    rates = {shape: matmul_rate(*shape) for shape in RATE_SHAPES}
    lines = report(measured_medians(args.csv), rates, args.target_speedup)
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
