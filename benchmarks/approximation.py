"""Approximation error of FAVOR+ against exact softmax attention.

The Performer paper's Figure 4 setting: one head, L = 4096, d = 16, m = 8 ...
256 random projections, iid against orthogonal projections and positive
(FAVOR+) against trigonometric features (m projections, 2m features), 15
samples of a fresh projection each. Queries and keys are `N(0, std^2)` per
entry, values `N(0, 1)`: "flat" (std 0.5, attention within a factor ~3 of
uniform) and "peaked" (std 1, a row's largest weight ~20x the uniform one).

`mse`: mean squared difference over all outputs between
`keras_favor.ops.bidirectional_linear_attention` with keras_favor's feature
maps and projections in float32 (what the layer computes after its dense
projections) and `keras_favor.ops.softmax_attention` in float64.
`mse_vs_quadratic_form` (first sample): the same output against
`keras_favor.ops.naive_linear_attention`, the quadratic form of the same
features in float64: the kernel's own error. The summary checks the paper's
orderings at every m.

    python benchmarks/approximation.py                 # the full setting
    python benchmarks/approximation.py --length 512 --samples 3
"""

import itertools
import os
import statistics

import numpy as np
import tensorflow as tf

import common
import keras_favor

FEATURE_MAPS = {"positive": "softmax", "trigonometric": "softmax_trig"}
PROJECTIONS = ("iid", "orthogonal")
NUM_FEATURES = (8, 16, 32, 64, 128, 256)
REGIMES = {"flat": 0.5, "peaked": 1.0}
FIELDS = ("regime", "qk_std", "feature_map", "projection", "num_features", "sample", "mse",
          "mse_vs_quadratic_form")


def mse(a, b):
    return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def measure(regime, length, dim, num_features, samples, seed):
    """One row per (feature map, projection, m, sample) with its errors."""
    rng = np.random.default_rng(seed)  # (1, 1, L, d) float64 queries, keys and values
    heads = [scale * rng.standard_normal((1, 1, length, dim))
             for scale in (REGIMES[regime], REGIMES[regime], 1.0)]
    exact = keras_favor.ops.softmax_attention(*heads)
    heads32 = [tf.constant(x, tf.float32) for x in heads]
    rows = []
    for map_name, projection_name, m, sample in itertools.product(
            FEATURE_MAPS, PROJECTIONS, num_features, range(samples)):
        feature_map = keras_favor.feature_maps.get(FEATURE_MAPS[map_name])
        projection = keras_favor.projections.get(projection_name)((m, dim), seed + 1 + sample)
        approx = keras_favor.ops.bidirectional_linear_attention(  # as the layer computes it
            *heads32, lambda x: feature_map.log_scaled(x, projection))
        rows.append({"regime": regime, "qk_std": REGIMES[regime], "feature_map": map_name,
                     "projection": projection_name, "num_features": m, "sample": sample,
                     "mse": mse(approx, exact)})
        if sample == 0:
            projection64 = tf.cast(projection, tf.float64)
            quadratic = keras_favor.ops.naive_linear_attention(
                *heads, lambda x: feature_map(x, projection64))
            rows[-1]["mse_vs_quadratic_form"] = mse(approx, quadratic)
    return rows


def mean_and_std(rows):
    """`{(regime, map, projection, m): (mean, std)}` of the MSE over samples."""
    groups = {}
    for r in rows:
        key = (r["regime"], r["feature_map"], r["projection"], int(r["num_features"]))
        groups.setdefault(key, []).append(float(r["mse"]))
    return {key: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
            for key, v in groups.items()}


def plot(stats, png_path, length, dim, samples):
    """MSE against m, one panel per regime, mean with a band of +-1 std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = [r for r in REGIMES if any(k[0] == r for k in stats)]
    figure, axes = plt.subplots(1, len(regimes), figsize=(5.5 * len(regimes), 4), squeeze=False)
    colors = {"positive": "tab:blue", "trigonometric": "tab:orange"}
    for axis, regime in zip(axes[0], regimes):
        for map_name in FEATURE_MAPS:
            for projection in PROJECTIONS:
                key = (regime, map_name, projection)
                sweep = sorted(k[3] for k in stats if k[:3] == key)
                means, stds = np.array([stats[(*key, m)] for m in sweep]).T
                axis.plot(sweep, means, "-" if projection == "orthogonal" else "--", marker="o",
                          markersize=3, color=colors[map_name], label=f"{map_name}, {projection}")
                axis.fill_between(sweep, np.maximum(means - stds, means * 0.05), means + stds,
                                  color=colors[map_name], alpha=0.1)
        axis.set_xscale("log", base=2)
        axis.set(yscale="log", xlabel="number of random projections m",
                 ylabel="MSE of the attention output")
        axis.set_title(f"{regime}: q, k ~ N(0, {REGIMES[regime]}^2), L={length}, d={dim}",
                       fontsize=9)
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"FAVOR vs exact softmax attention: mean of {samples} samples, "
                    "band +-1 std", fontsize=10)
    figure.tight_layout()
    figure.savefig(png_path, dpi=80)
    plt.close(figure)


def summary(rows, stats):
    """Mean and std of the MSE per setting; the paper's orderings, checked at
    every m: orthogonal below iid (claimed in both regimes), positive below
    trigonometric (claimed where attention weights are small: the peaked
    regime); the largest error of the kernel against its quadratic form."""
    lines = [f"{r:6s} {f:13s} {p:10s} m={m:4d}: MSE {mean:.3e} +- {std:.1e}"
             for (r, f, p, m), (mean, std) in sorted(stats.items())]
    for regime in [r for r in REGIMES if any(k[0] == r for k in stats)]:
        pairs = [((f, "orthogonal"), (f, "iid"), True) for f in FEATURE_MAPS] + [
            (("positive", p), ("trigonometric", p), regime == "peaked") for p in PROJECTIONS]
        for better, worse, claimed in pairs:
            sweep = sorted(k[3] for k in stats if k[:3] == (regime, *better))
            holds = [stats[(regime, *better, m)][0] < stats[(regime, *worse, m)][0] for m in sweep]
            lines.append(f"{'HOLDS' if all(holds) else 'DOES NOT HOLD'}: {regime}: "
                         f"{' '.join(better)} below {' '.join(worse)} at {sum(holds)}/{len(sweep)}"
                         f" of m ({'the paper claims this' if claimed else 'not claimed here'})")
    for regime, name in sorted({(r["regime"], r["feature_map"]) for r in rows}):
        worst = max(r["mse_vs_quadratic_form"] for r in rows if "mse_vs_quadratic_form" in r
                    and (r["regime"], r["feature_map"]) == (regime, name))
        lines.append(f"{regime}, {name} features, first samples: largest MSE of the float32 "
                     f"kernel against the float64 quadratic form of the same features: {worst:.1e}")
    return lines


def main():
    args = common.parse_args(__doc__, regimes=list(REGIMES), length=4096, dim=16,
                             num_features=list(NUM_FEATURES), samples=15, seed=0)
    rows = [row for regime in args.regimes for row in measure(
        regime, args.length, args.dim, args.num_features, args.samples, args.seed)]
    stem = os.path.join(args.output_dir, "approximation")
    common.write_environment(stem + ".json", common.describe(), vars(args))
    common.write_csv(stem + ".csv", FIELDS, rows)
    stats = mean_and_std(rows)
    plot(stats, stem + ".png", args.length, args.dim, args.samples)
    common.write_lines(stem + "_summary.txt", summary(rows, stats))


if __name__ == "__main__":
    main()
