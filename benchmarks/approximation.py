"""Approximation error of FAVOR+ and its variants against exact softmax attention.

The Performer paper's Figure 4 setting: one head, L = 4096, d = 16, m = 8 ...
256 random projections, iid against orthogonal projections and positive
(FAVOR+) against trigonometric features (m projections, 2m features), 15
samples of a fresh projection each. Queries and keys are `N(0, std^2)` per
entry, values `N(0, 1)`: "flat" (std 0.5, attention within a factor ~3 of
uniform) and "peaked" (std 1, a row's largest weight ~20x the uniform one).
Written to `approximation.csv`, `.png` and `_summary.txt`.

The lower-variance variants, in the same setting: positive (FAVOR+),
FAVOR++ (`feature_map="favor++"`, its coefficient A from `pair_statistic` of
the same queries and keys, as the layer computes it for bidirectional
attention) and hyperbolic features (`softmax_hyperbolic`, m projections, 2m
features), each with iid, orthogonal and simplex projections; against m in
both regimes (`sweep="features"`), and against the input norm, the std of
queries and keys from 0.25 to 1.5 at m = `--norm-features` (`sweep="norm"`,
the same standard normal draws scaled). Written to
`approximation_features.csv` and `.png`; its checks are appended to the
summary. Each sample's projection has the same seed for every feature map,
so the comparisons are paired.

`mse`: mean squared difference over all outputs between
`keras_favor.ops.bidirectional_linear_attention` with keras_favor's feature
maps and projections in float32 (what the layer computes after its dense
projections) and `keras_favor.ops.softmax_attention` in float64.
`mse_vs_quadratic_form` (first sample): the same output against
`keras_favor.ops.naive_linear_attention`, the quadratic form of the same
features in float64: the kernel's own error. The summary checks the paper's
orderings at every m.

    python -m benchmarks.approximation                 # the full setting
    python -m benchmarks.approximation --length 512 --samples 3
    python -m benchmarks.approximation --norm-stds 0.5 1 --norm-features 32
"""

import itertools
import os
import statistics

import numpy as np
import tensorflow as tf

import keras_favor
from benchmarks import common

FEATURE_MAPS = {
    "positive": "softmax",
    "trigonometric": "softmax_trig",
    "favor++": "favor++",
    "hyperbolic": "softmax_hyperbolic",
}
PROJECTIONS = ("iid", "orthogonal", "simplex")
# The paper's Figure 4 comparison, and the lower-variance variants'.
PAPER = tuple(
    itertools.product(("positive", "trigonometric"), ("iid", "orthogonal"))
)
VARIANTS = tuple(
    itertools.product(("positive", "favor++", "hyperbolic"), PROJECTIONS)
)
NUM_FEATURES = (8, 16, 32, 64, 128, 256)
REGIMES = {"flat": 0.5, "peaked": 1.0}
NORM_STDS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
FIELDS = (
    "regime",
    "qk_std",
    "feature_map",
    "projection",
    "num_features",
    "sample",
    "mse",
    "mse_vs_quadratic_form",
)
# `sweep`: "features" (against m, the regimes) or "norm" (against qk_std);
# `coefficient`: FAVOR++'s A.
VARIANT_FIELDS = ("sweep",) + FIELDS + ("coefficient",)


def mse(a, b):
    return float(
        np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    )


def favor_plus_plus_coefficient(query, key):
    """FAVOR++'s A for these `(1, 1, L, d)` queries and keys, `(1, 1, 1, 1)`:
    what `FavorAttention` uses in bidirectional attention."""
    from keras_favor.feature_maps import favor_plus_plus_features as favor_pp

    statistic = favor_pp.pair_statistic(query, key)
    return tf.reshape(
        favor_pp.optimal_coefficient(statistic, query.shape[-1]), (1, 1, 1, 1)
    )


def features64(feature_map, x, projection, a):
    """The unstabilized features in float64 (with FAVOR++'s A when not None)."""
    if a is None:
        return feature_map(x, projection)
    _, log_scale = feature_map.log_scaled(x, projection, a=a)
    return tf.exp(log_scale)


def measure(
    regime,
    length,
    dim,
    num_features,
    samples,
    seed,
    combinations=PAPER,
    qk_std=None,
):
    """One row per (feature map, projection) of `combinations`, m and sample
    with its errors; queries and keys of std `qk_std` (default: the regime's)."""
    qk_std = REGIMES[regime] if qk_std is None else qk_std
    rng = np.random.default_rng(
        seed
    )  # (1, 1, L, d) float64 queries, keys and values
    heads = [
        scale * rng.standard_normal((1, 1, length, dim))
        for scale in (qk_std, qk_std, 1.0)
    ]
    exact = keras_favor.ops.softmax_attention(*heads)
    heads32 = [tf.constant(x, tf.float32) for x in heads]
    a32 = favor_plus_plus_coefficient(*heads32[:2])
    rows = []
    for (map_name, projection_name), m, sample in itertools.product(
        combinations, num_features, range(samples)
    ):
        feature_map = keras_favor.feature_maps.get(FEATURE_MAPS[map_name])
        a = a32 if feature_map.uses_statistics else None
        options = {} if a is None else {"a": a}
        projection = keras_favor.projections.get(projection_name)(
            (m, dim), seed + 1 + sample
        )
        approx = keras_favor.ops.bidirectional_linear_attention(  # as the layer computes it
            *heads32, lambda x: feature_map.log_scaled(x, projection, **options)
        )
        rows.append(
            {
                "regime": regime,
                "qk_std": qk_std,
                "feature_map": map_name,
                "projection": projection_name,
                "num_features": m,
                "sample": sample,
                "mse": mse(approx, exact),
            }
        )
        if a is not None:
            rows[-1]["coefficient"] = round(float(tf.reshape(a, ())), 6)
        if sample == 0:
            projection64 = tf.cast(projection, tf.float64)
            a64 = None if a is None else tf.cast(a, tf.float64)
            quadratic = keras_favor.ops.naive_linear_attention(
                *heads, lambda x: features64(feature_map, x, projection64, a64)
            )
            rows[-1]["mse_vs_quadratic_form"] = mse(approx, quadratic)
    return rows


def mean_and_std(rows, by="regime"):
    """`{(regime, map, projection, m): (mean, std)}` of the MSE over samples
    (`by="qk_std"`: `(qk_std, map, projection, m)`)."""
    groups = {}
    for r in rows:
        key = (r[by], r["feature_map"], r["projection"], int(r["num_features"]))
        groups.setdefault(key, []).append(float(r["mse"]))
    return {
        key: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
        for key, v in groups.items()
    }


def plot(stats, png_path, length, dim, samples):
    """MSE against m, one panel per regime, mean with a band of +-1 std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = [r for r in REGIMES if any(k[0] == r for k in stats)]
    figure, axes = plt.subplots(
        1, len(regimes), figsize=(5.5 * len(regimes), 4), squeeze=False
    )
    colors = {"positive": "tab:blue", "trigonometric": "tab:orange"}
    for axis, regime in zip(axes[0], regimes):
        for map_name, projection in PAPER:
            key = (regime, map_name, projection)
            sweep = sorted(k[3] for k in stats if k[:3] == key)
            means, stds = np.array([stats[(*key, m)] for m in sweep]).T
            axis.plot(
                sweep,
                means,
                "-" if projection == "orthogonal" else "--",
                marker="o",
                markersize=3,
                color=colors[map_name],
                label=f"{map_name}, {projection}",
            )
            axis.fill_between(
                sweep,
                np.maximum(means - stds, means * 0.05),
                means + stds,
                color=colors[map_name],
                alpha=0.1,
            )
        axis.set_xscale("log", base=2)
        axis.set(
            yscale="log",
            xlabel="number of random projections m",
            ylabel="MSE of the attention output",
        )
        axis.set_title(
            f"{regime}: q, k ~ N(0, {REGIMES[regime]}^2), L={length}, d={dim}",
            fontsize=9,
        )
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(
        f"FAVOR vs exact softmax attention: mean of {samples} samples, "
        "band +-1 std",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)


VARIANT_COLORS = {
    "positive": "tab:blue",
    "favor++": "tab:green",
    "hyperbolic": "tab:purple",
}
VARIANT_STYLES = {"iid": ":", "orthogonal": "-", "simplex": "--"}
VARIANT_LABELS = {
    "positive": "FAVOR+",
    "favor++": "FAVOR++",
    "hyperbolic": "hyperbolic",
}


def plot_variants(stats, norm_stats, png_path, length, dim, samples):
    """The variants' mean MSE against m in each regime (top), and against the
    queries' and keys' std at one m (bottom): absolute, and over FAVOR+ with
    orthogonal projections (the layer's default)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = [r for r in REGIMES if any(k[0] == r for k in stats)]
    panels = [(regime, stats, False) for regime in regimes]
    if norm_stats:
        panels += [(None, norm_stats, False), (None, norm_stats, True)]
    rows = (len(panels) + 1) // 2
    figure, axes = plt.subplots(
        rows, 2, figsize=(12, 4.4 * rows), squeeze=False
    )
    for axis, (regime, table, relative) in zip(axes.flat, panels):
        x_index = 3 if regime else 0
        base = {
            k[x_index]: v[0]
            for k, v in table.items()
            if k[1:3] == ("positive", "orthogonal")
            and (regime is None or k[0] == regime)
        }
        for map_name, projection in VARIANTS:
            points = sorted(
                (k[x_index], v[0] / (base[k[x_index]] if relative else 1))
                for k, v in table.items()
                if k[1:3] == (map_name, projection)
                and (regime is None or k[0] == regime)
            )
            if points:
                axis.plot(
                    *zip(*points),
                    VARIANT_STYLES[projection],
                    marker="o",
                    markersize=3,
                    color=VARIANT_COLORS[map_name],
                    label=f"{VARIANT_LABELS[map_name]}, {projection}",
                )
        axis.set_yscale("log")
        axis.set_ylabel(
            "MSE / MSE of FAVOR+, orthogonal"
            if relative
            else "MSE of the attention output"
        )
        if regime is None:
            m = next(iter(table))[3]
            axis.set_xlabel("std of queries and keys (per entry)")
            axis.set_title(
                f"against the input norm{', relative' if relative else ''}: m={m}, "
                f"L={length}, d={dim}",
                fontsize=9,
            )
        else:
            axis.set_xscale("log", base=2)
            axis.set_xlabel("number of random projections m")
            axis.set_title(
                f"{regime}: q, k ~ N(0, {REGIMES[regime]}^2), L={length}, d={dim}",
                fontsize=9,
            )
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7, ncol=3 if relative else 1)
    for axis in axes.flat[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(
        f"FAVOR+, FAVOR++ and hyperbolic features with iid, orthogonal and simplex "
        f"projections vs exact softmax attention: mean of {samples} samples",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)


def summary(rows, stats):
    """Mean and std of the MSE per setting; the paper's orderings, checked at
    every m: orthogonal below iid (claimed in both regimes), positive below
    trigonometric (claimed where attention weights are small: the peaked
    regime); the largest error of the kernel against its quadratic form."""
    lines = [
        f"{r:6s} {f:13s} {p:10s} m={m:4d}: MSE {mean:.3e} +- {std:.1e}"
        for (r, f, p, m), (mean, std) in sorted(stats.items())
    ]
    for regime in [r for r in REGIMES if any(k[0] == r for k in stats)]:
        pairs = [
            ((f, "orthogonal"), (f, "iid"), True)
            for f in ("positive", "trigonometric")
        ]
        pairs += [
            (("positive", p), ("trigonometric", p), regime == "peaked")
            for p in ("iid", "orthogonal")
        ]
        for better, worse, claimed in pairs:
            sweep = sorted(k[3] for k in stats if k[:3] == (regime, *better))
            holds = [
                stats[(regime, *better, m)][0] < stats[(regime, *worse, m)][0]
                for m in sweep
            ]
            lines.append(
                f"{'HOLDS' if all(holds) else 'DOES NOT HOLD'}: {regime}: "
                f"{' '.join(better)} below {' '.join(worse)} at {sum(holds)}/{len(sweep)}"
                f" of m ({'the paper claims this' if claimed else 'not claimed here'})"
            )
    for regime, name in sorted({(r["regime"], r["feature_map"]) for r in rows}):
        worst = max(
            r["mse_vs_quadratic_form"]
            for r in rows
            if "mse_vs_quadratic_form" in r
            and (r["regime"], r["feature_map"]) == (regime, name)
        )
        lines.append(
            f"{regime}, {name} features, first samples: largest MSE of the float32 "
            f"kernel against the float64 quadratic form of the same features: {worst:.1e}"
        )
    return lines


LOWER = (  # (lower, higher): the variants' comparisons the summary checks
    [(("favor++", p), ("positive", p)) for p in PROJECTIONS]
    + [(("hyperbolic", p), ("positive", p)) for p in PROJECTIONS]
    + [
        ((f, "simplex"), (f, "orthogonal"))
        for f in ("positive", "favor++", "hyperbolic")
    ]
)


def variant_summary(stats, norm_stats):
    """The variants' mean MSE, and for each pair of LOWER, at how many m (per
    regime) and input stds the first is lower, with the ratios of the means."""
    lines = ["", "Lower-variance variants (approximation_features.csv):"]
    lines += [
        f"{r:6s} {f:10s} {p:10s} m={m:4d}: MSE {mean:.3e} +- {std:.1e}"
        for (r, f, p, m), (mean, std) in sorted(stats.items())
    ]
    lines += [
        f"std={s:<5} {f:10s} {p:10s} m={m:4d}: MSE {mean:.3e} +- {std:.1e}"
        for (s, f, p, m), (mean, std) in sorted(norm_stats.items())
    ]
    sweeps = [
        (regime, [k for k in stats if k[0] == regime], 3, stats, "m")
        for regime in REGIMES
        if any(k[0] == regime for k in stats)
    ]
    if norm_stats:
        sweeps.append(("norm", list(norm_stats), 0, norm_stats, "std"))
    for (lower, higher), (
        name,
        keys,
        x_index,
        table,
        x_name,
    ) in itertools.product(LOWER, sweeps):
        xs = sorted({k[x_index] for k in keys if k[1:3] == lower})
        pick = (
            (lambda x, c: (name, *c, x))
            if x_index == 3
            else (
                lambda x, c: next(k for k in keys if k[0] == x and k[1:3] == c)
            )
        )
        ratios = [
            table[pick(x, lower)][0] / table[pick(x, higher)][0] for x in xs
        ]
        if ratios:
            lines.append(
                f"{name}: {' '.join(lower)} lower than {' '.join(higher)} at "
                f"{sum(r < 1 for r in ratios)}/{len(ratios)} of {x_name}; ratio of the means "
                + " ".join(f"{x_name}={x}: {r:.2f}" for x, r in zip(xs, ratios))
            )
    return lines


def main():
    args = common.parse_args(
        __doc__,
        regimes=list(REGIMES),
        length=4096,
        dim=16,
        num_features=list(NUM_FEATURES),
        samples=15,
        seed=0,
        norm_stds=(list(NORM_STDS), "stds of the sweep over input norms"),
        norm_features=(64, "m of the sweep over input norms"),
    )
    stem = os.path.join(args.output_dir, "approximation")
    common.write_environment(stem + ".json", common.describe(), vars(args))
    # Both comparisons at once: the combinations they share run once.
    both = PAPER + tuple(c for c in VARIANTS if c not in PAPER)
    measured = [
        row
        for regime in args.regimes
        for row in measure(
            regime,
            args.length,
            args.dim,
            args.num_features,
            args.samples,
            args.seed,
            both,
        )
    ]
    rows = [r for r in measured if (r["feature_map"], r["projection"]) in PAPER]
    common.write_csv(stem + ".csv", FIELDS, rows)
    stats = mean_and_std(rows)
    plot(stats, stem + ".png", args.length, args.dim, args.samples)
    variants = [
        dict(r, sweep="features")
        for r in measured
        if (r["feature_map"], r["projection"]) in VARIANTS
    ]
    norm_rows = [
        dict(row, sweep="norm", regime="")
        for std in args.norm_stds
        for row in measure(
            "flat",
            args.length,
            args.dim,
            [args.norm_features],
            args.samples,
            args.seed,
            VARIANTS,
            qk_std=std,
        )
    ]
    common.write_csv(
        stem + "_features.csv", VARIANT_FIELDS, variants + norm_rows
    )
    variant_stats, norm_stats = (
        mean_and_std(variants),
        mean_and_std(norm_rows, "qk_std"),
    )
    plot_variants(
        variant_stats,
        norm_stats,
        stem + "_features.png",
        args.length,
        args.dim,
        args.samples,
    )
    common.write_lines(
        stem + "_summary.txt",
        summary(rows, stats) + variant_summary(variant_stats, norm_stats),
    )


if __name__ == "__main__":
    main()
