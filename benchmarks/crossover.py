"""The length from which FAVOR+ is faster than exact attention.

For each number of random features and head size, one self-attention layer
(8 heads, batch 1, float32): `FavorAttention` against
`keras.layers.MultiHeadAttention`, forward and forward + backward,
bidirectional and causal. The crossover is the shortest length of the
grid `2^6 ... 2^--max-log2` at which FAVOR+'s step is the faster one,
found by bisection (FAVOR+'s cost grows linearly in `L`, exact attention's
quadratically, so once ahead FAVOR+ stays ahead); `> L` where it never
is. Each probed length times the two layers alternately, `--rounds`
steps each after two untimed ones, and compares their fastest steps.
Exact attention's times are shared by every number of features.

    python -m benchmarks.crossover                      # every setting
    python -m benchmarks.crossover --features 256 --head-sizes 64
"""

import argparse
import itertools
import os
import time

from benchmarks import common

NUM_HEADS = 8
FIELDS = (
    "num_features",
    "head_size",
    "mode",
    "pass",
    "crossover_length",
    "probes",
    "load_average",
)


def compiled_step(layer, causal, pass_, variables):
    import tensorflow as tf

    def forward(x):
        return tf.reduce_sum(layer(x, x, use_causal_mask=causal))

    def step(x):
        if pass_ == "forward":
            return forward(x)
        with tf.GradientTape() as tape:
            loss = forward(x)
        return tf.add_n(
            [tf.reduce_sum(g) for g in tape.gradient(loss, variables)]
        )

    return tf.function(step)


def build_step(kind, num_features, head_size, causal, pass_, length):
    import keras

    import keras_favor

    if kind == "favor":
        layer = keras_favor.FavorAttention(
            NUM_HEADS, head_size, num_features=num_features, seed=0
        )
    else:
        layer = keras.layers.MultiHeadAttention(NUM_HEADS, head_size)
    shape = (1, length, NUM_HEADS * head_size)
    layer.build(shape, shape)
    return compiled_step(layer, causal, pass_, layer.trainable_variables)


def fastest_steps(steps, x, rounds):
    """The fastest of `rounds` calls of each step, called alternately."""
    for step in steps:
        step(x)
        step(x)
    best = [float("inf")] * len(steps)
    for _ in range(rounds):
        for index, step in enumerate(steps):
            started = time.perf_counter()
            float(step(x))
            best[index] = min(best[index], time.perf_counter() - started)
    return best


class Timer:
    """Step times by setting and length; exact attention's shared."""

    def __init__(self, rounds):
        self.rounds, self.cache = rounds, {}

    def favor_wins(self, num_features, head_size, mode, pass_, length):
        import keras
        import numpy as np

        exact_key = ("exact", head_size, mode, pass_, length)
        favor_key = ("favor", num_features) + exact_key[1:]
        missing = [k for k in (favor_key, exact_key) if k not in self.cache]
        if missing:
            x = np.random.default_rng(0).standard_normal(
                (1, length, NUM_HEADS * head_size), dtype=np.float32
            )
            steps = [
                build_step(
                    key[0],
                    num_features,
                    head_size,
                    mode == "causal",
                    pass_,
                    length,
                )
                for key in missing
            ]
            times = fastest_steps(
                steps, keras.ops.convert_to_tensor(x), self.rounds
            )
            self.cache.update(zip(missing, times))
        return self.cache[favor_key] < self.cache[exact_key]


def crossover(timer, setting, low_log2, high_log2):
    """Bisection over `2^low_log2 ... 2^high_log2`: `(length or None,
    probed lengths)`."""
    probes = []

    def wins(log2):
        probes.append(2**log2)
        return timer.favor_wins(*setting, 2**log2)

    if not wins(high_log2):
        return None, probes
    low, high = low_log2 - 1, high_log2  # FAVOR+ loses at low, wins at high
    while high - low > 1:
        middle = (low + high) // 2
        if middle < low_log2 or not wins(middle):
            low = middle
        else:
            high = middle
    return 2**high, probes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--features", type=int, nargs="+", default=[64, 128, 256])
    add("--head-sizes", type=int, nargs="+", default=[32, 64, 128])
    add("--modes", nargs="+", default=["bidirectional", "causal"])
    add("--passes", nargs="+", default=["forward", "forward_backward"])
    add("--min-log2", type=int, default=6)
    add("--max-log2", type=int, default=13)
    add("--rounds", type=int, default=3, help="timed steps per layer")
    add("--csv", default="benchmarks/results/crossover.csv")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    timer, rows = Timer(args.rounds), []
    for setting in itertools.product(
        args.features, args.head_sizes, args.modes, args.passes
    ):
        load = os.getloadavg()[0]
        length, probes = crossover(timer, setting, args.min_log2, args.max_log2)
        row = dict(zip(FIELDS[:4], setting))
        row.update(
            crossover_length=length or f"> {2**args.max_log2}",
            probes=" ".join(map(str, probes)),
            load_average=round(load, 2),
        )
        rows.append(row)
        print(row, flush=True)
        common.write_csv(args.csv, FIELDS, rows)


if __name__ == "__main__":
    main()
