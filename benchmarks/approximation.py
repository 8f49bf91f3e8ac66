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

import argparse
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


def random_heads(length, dim, qk_std, seed):
    """`(1, 1, L, d)` float64 queries, keys and values."""
    rng = np.random.default_rng(seed)
    scales = (qk_std, qk_std, 1.0)
    return [scale * rng.standard_normal((1, 1, length, dim)) for scale in scales]


@tf.function
def favor_attention(q, k, v, feature_map, projection):
    """Bidirectional FAVOR attention of float32 heads, as the layer computes it."""
    return keras_favor.ops.bidirectional_linear_attention(
        q, k, v, lambda heads: feature_map.log_scaled(heads, projection))


def mse(a, b):
    return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def measure(regime, length, dim, num_features, samples, seed):
    """One row per (feature map, projection, m, sample) with its errors."""
    heads = random_heads(length, dim, REGIMES[regime], seed)
    exact = keras_favor.ops.softmax_attention(*heads)
    heads32 = [tf.constant(x, tf.float32) for x in heads]
    rows = []
    for map_name, projection_name, m, sample in itertools.product(
            FEATURE_MAPS, PROJECTIONS, num_features, range(samples)):
        feature_map = keras_favor.feature_maps.get(FEATURE_MAPS[map_name])
        projection = keras_favor.projections.get(projection_name)((m, dim), seed + 1 + sample)
        approx = favor_attention(*heads32, feature_map, projection)
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


def ordering_checks(stats):
    """`(text, holds, claimed)`: is `better` below `worse` at every m?

    The paper claims orthogonal below iid (both regimes), and positive below
    trigonometric where attention weights are small (the peaked regime).
    """
    pairs = []
    for regime in REGIMES:
        pairs += [(regime, (f, "orthogonal"), (f, "iid"), True) for f in FEATURE_MAPS]
        pairs += [(regime, ("positive", p), ("trigonometric", p), regime == "peaked")
                  for p in PROJECTIONS]
    checks = []
    for regime, better, worse, claimed in pairs:
        sweep = sorted(k[3] for k in stats if k[:3] == (regime, *better))
        holds = [stats[(regime, *better, m)][0] < stats[(regime, *worse, m)][0] for m in sweep]
        if sweep:
            checks.append((f"{regime}: {' '.join(better)} below {' '.join(worse)} at "
                           f"{sum(holds)}/{len(sweep)} of m", all(holds), claimed))
    return checks


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
    """Mean and std of the MSE per setting, the orderings, the kernel's own error."""
    lines = [f"{r:6s} {f:13s} {p:10s} m={m:4d}: MSE {mean:.3e} +- {std:.1e}"
             for (r, f, p, m), (mean, std) in sorted(stats.items())]
    lines += [f"{'HOLDS' if holds else 'DOES NOT HOLD'}: {text} "
              f"({'the paper claims this' if claimed else 'not claimed here'})"
              for text, holds, claimed in ordering_checks(stats)]
    for regime, name in sorted({(r["regime"], r["feature_map"]) for r in rows}):
        worst = max(r["mse_vs_quadratic_form"] for r in rows if "mse_vs_quadratic_form" in r
                    and (r["regime"], r["feature_map"]) == (regime, name))
        lines.append(f"{regime}, {name} features, first samples: largest MSE of the float32 "
                     f"kernel against the float64 quadratic form of the same features: {worst:.1e}")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES))
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--num-features", nargs="+", type=int, default=list(NUM_FEATURES))
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=common.RESULTS_DIR)
    args = parser.parse_args()
    rows = [row for regime in args.regimes for row in measure(
        regime, args.length, args.dim, args.num_features, args.samples, args.seed)]
    os.makedirs(args.output_dir, exist_ok=True)
    stem = os.path.join(args.output_dir, "approximation")
    common.write_csv(stem + ".csv", FIELDS, rows)
    common.write_environment(stem + ".json", common.describe(), vars(args))
    stats = mean_and_std(rows)
    plot(stats, stem + ".png", args.length, args.dim, args.samples)
    common.write_lines(stem + "_summary.txt", summary(rows, stats))


if __name__ == "__main__":
    main()
