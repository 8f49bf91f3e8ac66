"""Cost of a local window against its length: a short call and a cached step.

`FavorAttention(local_window=w)` (8 heads x 64, 256 features, batch 1), forward
only, each call a `tf.function` traced once:

- `call`: self-attention over `--length` positions (8 by default), causal and
  bidirectional, at each window `w` of `--windows`; a window at least as long as
  the input is exact softmax attention, and `MultiHeadAttention` with the same
  heads (`window` 0 in the rows) is timed beside it;
- `step`: one cached decoding position (`cache=empty_cache(1)`), at each `w`;
- `capped_step`: the same with `cache=empty_cache(1, max_length)` for
  `--max-length` positions (128 by default), as `generate` makes it: the cache
  keeps `min(w, max_length)` keys, so a step stops growing with `w` there.

The configurations are timed in alternation: each round runs every one once,
so drifting load on the machine reaches all alike. `median_s` is the median of
the rounds; `ratio` is it over the smallest window's median of the same kind
and mode, which grows like `w` where the cost does (`O(L min(w, L) d)` for a
call, `O(w d)` for a step) and stays near 1 where it does not.

Writes `local_window_cost.csv`, `local_window_cost.json` (machine, versions,
settings) and `local_window_cost_summary.txt` to `--output-dir`.

    python -m benchmarks.local_window_cost          # w = 8 ... 2048, 15 rounds
    python -m benchmarks.local_window_cost --windows 8 2048 --rounds 5
"""

import os
import statistics

from benchmarks import common

FIELDS = (
    "kind",
    "mode",
    "window",
    "length",
    "num_heads",
    "key_dim",
    "num_features",
    "median_s",
    "min_s",
    "max_s",
    "timed_runs",
    "first_call_s",
    "ratio",
    "load_average",
    "keras_favor_commit",
)


def build_call(kind, causal, window, args):
    """`(function, inputs)`: the traced forward pass of one configuration;
    `window` 0 is `MultiHeadAttention`."""
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_favor

    heads = dict(num_heads=args.num_heads, key_dim=args.key_dim)
    hidden = args.num_heads * args.key_dim
    length = args.length if kind == "call" else 1
    x = (
        np.random.default_rng(0)
        .standard_normal((1, length, hidden))
        .astype("float32")
    )
    if window == 0:
        layer = keras.layers.MultiHeadAttention(**heads)
        layer(x, x)
        return tf.function(lambda x: layer(x, x, use_causal_mask=causal)), [x]
    layer = keras_favor.FavorAttention(
        **heads, num_features=args.num_features, local_window=window, seed=0
    )
    layer(x, x)
    if kind == "call":
        return tf.function(lambda x: layer(x, x, use_causal_mask=causal)), [x]
    cache = layer.empty_cache(
        1, args.max_length if kind == "capped_step" else None
    )
    step = tf.function(
        lambda x, cache: layer(x, use_causal_mask=True, cache=cache)[0]
    )
    return step, [x, cache]


def jobs(args):
    """`(kind, mode, window)` of every configuration."""
    found = []
    for mode in args.modes:
        found += [("call", mode, w) for w in [0] + args.windows]
    return found + [
        (kind, "causal", w)
        for kind in ("step", "capped_step")
        for w in args.windows
    ]


def measure(args):
    """The CSV rows: every configuration, timed in alternation."""
    functions, first, times = {}, {}, {}
    for job in jobs(args):
        functions[job] = build_call(job[0], job[1] == "causal", job[2], args)
        first[job], _ = common.time_calls(
            *functions[job], repeats=1, warmup=args.warmup
        )
        times[job] = []
    for round_ in range(args.rounds):
        order = list(functions) if round_ % 2 == 0 else list(functions)[::-1]
        for job in order:
            times[job] += common.time_calls(
                *functions[job], repeats=1, warmup=0
            )[1]
    rows = []
    for (kind, mode, window), job_times in times.items():
        smallest = (kind, mode, min(args.windows))
        median = statistics.median(job_times)
        rows.append(
            {
                "kind": kind,
                "mode": mode,
                "window": window,
                "length": args.length if kind == "call" else 1,
                "num_heads": args.num_heads,
                "key_dim": args.key_dim,
                "num_features": args.num_features,
                "median_s": round(median, 6),
                "min_s": round(min(job_times), 6),
                "max_s": round(max(job_times), 6),
                "timed_runs": len(job_times),
                "first_call_s": round(first[(kind, mode, window)], 3),
                "ratio": round(median / statistics.median(times[smallest]), 3),
                "load_average": round(os.getloadavg()[0], 2),
                "keras_favor_commit": common.git_commit(),
            }
        )
    return rows


def summary(rows):
    """A line per configuration."""
    return [
        f"{r['kind']:11s} {r['mode']:13s} L={r['length']} "
        f"{'MultiHeadAttention' if r['window'] == 0 else 'w=' + str(r['window']):18s} "
        f"median {1e3 * r['median_s']:8.3f} ms (min {1e3 * r['min_s']:.3f}, "
        f"{r['timed_runs']} runs), x{r['ratio']:.2f} the smallest window's"
        for r in rows
    ]


def main(argv=None):
    args = common.parse_args(
        __doc__,
        argv,
        windows=[8, 32, 128, 512, 2048],
        modes=["causal", "bidirectional"],
        length=8,
        max_length=(128, "positions of the capped step's cache"),
        num_heads=8,
        key_dim=64,
        num_features=256,
        rounds=(15, "timed calls per configuration"),
        warmup=(2, "untimed calls per configuration after tracing"),
    )
    environment = common.describe()
    rows = measure(args)
    common.write_results(
        args, "local_window_cost", FIELDS, rows, summary(rows), environment
    )
    return rows


if __name__ == "__main__":
    main()
