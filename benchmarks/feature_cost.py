"""Cost of FAVOR++ features and simplex projections: the layer's training step.

`FavorAttention` alone, as the layer benchmark of `speed_memory.py` times it
(batch 1, 8 heads x 64, 256 features, self-attention, the step of
`models.compiled_step`: forward and the gradients of the trainable weights),
called with `training=True` (FAVOR++'s causal moving statistic is updated,
as in training), in three configurations:

- `favor+`: `feature_map="softmax"`, `projection="orthogonal"` (the default);
- `favor++`: `feature_map="favor++"`, `projection="orthogonal"`;
- `simplex`: `feature_map="softmax"`, `projection="simplex"`;

bidirectional and causal. All six steps are built and traced in one process,
then timed in alternation: each round runs every configuration once after
an untimed call of its own (`common.time_calls`), so drifting load on the
machine reaches every configuration alike. `median_s` is the median of the
rounds; `ratio` is it over FAVOR+'s in the same mode, and `paired_ratio`
the median over rounds of the same ratio within a round.

Writes `feature_cost.csv`, `feature_cost.json` (machine, versions,
settings) and `feature_cost_summary.txt` to `--output-dir`.

    python -m benchmarks.feature_cost                   # L = 8192, 7 rounds
    python -m benchmarks.feature_cost --length 4096 --rounds 5
"""

import os
import statistics

from benchmarks import common

CONFIGS = {
    "favor+": {"feature_map": "softmax", "projection": "orthogonal"},
    "favor++": {"feature_map": "favor++", "projection": "orthogonal"},
    "simplex": {"feature_map": "softmax", "projection": "simplex"},
}
MODES = ("bidirectional", "causal")
BASELINE = "favor+"
TARGET = 1.1  # a variant's step within this factor of FAVOR+'s
FIELDS = (
    "config",
    "feature_map",
    "projection",
    "mode",
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
    "paired_ratio",
    "load_average",
    "keras_favor_commit",
)


def build_step(config, causal, length, num_features):
    """The compiled training step of `FavorAttention` in `config`, as
    `models.build("layer", "favor", ...)` builds it but for the options."""
    import keras_favor
    from benchmarks import models

    shape = (1, length, models.HIDDEN)
    layer = keras_favor.FavorAttention(
        models.NUM_HEADS,
        models.KEY_DIM,
        num_features=num_features,
        seed=0,
        **CONFIGS[config],
    )
    layer.build(shape, shape)

    def forward(x):
        return layer(x, x, use_causal_mask=causal, training=True)

    return models.compiled_step(
        forward, layer.trainable_variables, "forward_backward"
    )


def measure(args):
    """The CSV rows: every configuration and mode, timed in alternation."""
    from benchmarks import models

    x = models.random_inputs(args.length)
    jobs = [(config, mode) for mode in args.modes for config in args.configs]
    steps, first, times = {}, {}, {job: [] for job in jobs}
    for job in jobs:  # build and trace
        steps[job] = build_step(
            job[0], job[1] == "causal", args.length, args.num_features
        )
        first[job], _ = common.time_calls(
            steps[job], [x], repeats=1, warmup=args.warmup
        )
    for round_ in range(args.rounds):
        for job in jobs if round_ % 2 == 0 else jobs[::-1]:
            times[job] += common.time_calls(
                steps[job], [x], repeats=1, warmup=0
            )[1]
    rows = []
    for config, mode in jobs:
        row_times = times[(config, mode)]
        base = times.get((BASELINE, mode))
        median = statistics.median(row_times)
        rows.append(
            {
                "config": config,
                **CONFIGS[config],
                "mode": mode,
                "length": args.length,
                "num_heads": models.NUM_HEADS,
                "key_dim": models.KEY_DIM,
                "num_features": args.num_features,
                "median_s": round(median, 5),
                "min_s": round(min(row_times), 5),
                "max_s": round(max(row_times), 5),
                "timed_runs": len(row_times),
                "first_call_s": round(first[(config, mode)], 3),
                "ratio": base and round(median / statistics.median(base), 4),
                "paired_ratio": base
                and round(
                    statistics.median(t / b for t, b in zip(row_times, base)), 4
                ),
                "load_average": round(os.getloadavg()[0], 2),
                "keras_favor_commit": common.git_commit(),
            }
        )
    return rows


def summary(rows):
    """A line per configuration, and the target for each variant."""
    lines = [
        f"{r['mode']:13s} {r['config']:8s} L={r['length']}: median {r['median_s']:.3f} s "
        f"(min {r['min_s']:.3f}, max {r['max_s']:.3f}, {r['timed_runs']} runs)"
        for r in rows
    ]
    for r in rows:
        if r["config"] != BASELINE and r["ratio"]:
            verdict = "met" if r["ratio"] <= TARGET else "not met"
            lines.append(
                f"{r['mode']}, L={r['length']}: {r['config']} / {BASELINE} = "
                f"{r['ratio']:.2f}x (paired {r['paired_ratio']:.2f}x); target "
                f"<= {TARGET}x: {verdict}"
            )
    return lines


def main(argv=None):
    args = common.parse_args(
        __doc__,
        argv,
        configs=list(CONFIGS),
        modes=list(MODES),
        length=8192,
        num_features=256,
        rounds=(7, "timed calls per configuration"),
        warmup=(2, "untimed calls per configuration after tracing"),
    )
    environment = common.describe()
    rows = measure(args)
    common.write_results(
        args, "feature_cost", FIELDS, rows, summary(rows), environment
    )
    return rows


if __name__ == "__main__":
    main()
