"""Speed and peak memory of FAVOR+ against exact attention, across lengths.

Levels (`models.py`): `layer`, `FavorAttention` against `MultiHeadAttention`,
bidirectional and causal; `stack`, two `PerformerBlock`s with FAVOR+, exact,
and identity attention (its value and output projections only: the lower
bound). Each (level, model, mode, pass, length) runs in a worker process of
its own: input made (the baseline memory), model built, step compiled,
called to trace and to warm up, then timed; the CSV has the median, min and
max seconds and the peak resident memory. A step over the time cap, or a
worker over the memory cap (a watchdog kills it), puts the model out of
budget from that length on. On a GPU, results go to `speed_memory_gpu.*`.
With `KERAS_BACKEND=jax` the steps are `jax.jit` functions, TensorFlow is
not imported (a machine without it will do), and the files are
`speed_memory_jax_cpu.*` or `speed_memory_jax_gpu.*`, with the same columns.

    python -m benchmarks.speed_memory --fresh           # the full sweep
    python -m benchmarks.speed_memory --levels layer --lengths 1024 8192
    python -m benchmarks.speed_memory --plot-only       # redraw from the CSV
    KERAS_BACKEND=jax python -m benchmarks.speed_memory --levels layer stack
"""

import argparse
import csv
import itertools
import json
import math
import os
import statistics

from benchmarks import common

LEVELS, PASSES = ("layer", "stack"), ("forward", "forward_backward")
MODES = ("bidirectional", "causal")
FAVOR, EXACT, IDENTITY = (
    (model, "bidirectional") for model in ("favor", "exact", "identity")
)
MODELS = {
    "layer": (FAVOR, ("favor", "causal"), EXACT, ("exact", "causal")),
    "stack": (FAVOR, ("favor", "causal"), EXACT, IDENTITY),
}
LENGTHS = [2**k for k in range(9, 17)]  # 512 ... 65536
CONFIGURATION = (
    "device",
    "level",
    "model",
    "mode",
    "pass",
    "length",
    "chunk_size",
    "jit_compile",
)
FIELDS = CONFIGURATION[:6] + (
    "status",
    "median_s",
    "min_s",
    "max_s",
    "timed_runs",
    "first_call_s",
    "baseline_rss_mib",
    "peak_rss_mib",
    "gpu_peak_mib",
    "chunk_size",
    "jit_compile",
    "load_average",
    "keras_favor_commit",
    "note",
)
MEASURED = ("ok", "over_time_cap")
OUT_OF_BUDGET = (
    "over_time_cap",
    "out_of_memory",
    "timeout",
)  # longer lengths are skipped


def measure(job):
    """Times one configuration in this process and returns its CSV columns.

    `job` names the level, model, mode, pass, length and chunk size, the
    timing options, and optionally `favor_options`, more FAVOR+ options
    (`recompute_length`...).

    On the TensorFlow backend the step is a `tf.function` (`models.compiled_step`);
    on another Keras backend (`KERAS_BACKEND=jax`) it is `jax_step`'s, and
    TensorFlow is not imported.
    """
    import keras

    from benchmarks import models

    tensorflow = keras.backend.backend() == "tensorflow"
    if tensorflow:
        import tensorflow as tf

        for gpu in (gpus := tf.config.list_physical_devices("GPU")):
            tf.config.experimental.set_memory_growth(gpu, True)
    else:
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
    x = models.random_inputs(job["length"])
    result = {"baseline_rss_mib": round(common.peak_rss_mib(), 1)}
    model, forward = models.build(
        job["level"],
        job["model"],
        job["mode"] == "causal",
        job["length"],
        job["chunk_size"] or None,
        **job.get("favor_options", {}),
    )
    if tensorflow:
        step = models.compiled_step(
            forward, model.trainable_variables, job["pass"], job["jit"]
        )
    else:
        step = jax_step(model, forward, job["pass"])
    try:
        first, times = common.time_calls(
            step,
            [x],
            job["repeats"],
            budget_s=job["budget_s"],
            min_repeats=min(job["min_repeats"], job["repeats"]),
        )
    except Exception as error:
        text = getattr(error, "message", None) or str(error)
        if (
            type(error).__name__ != "ResourceExhaustedError"
            and "RESOURCE_EXHAUSTED" not in text
        ):
            raise
        result.update(status="out_of_memory", note=text[:120])
    else:
        result.update(common.timing_fields(times, first, job["time_cap_s"]))
    result["peak_rss_mib"] = round(common.peak_rss_mib(), 1)
    if gpus and tensorflow:
        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
        result["gpu_peak_mib"] = round(peak / 2**20, 1)
    elif gpus:
        peak = (gpus[0].memory_stats() or {}).get("peak_bytes_in_use")
        result["gpu_peak_mib"] = peak and round(peak / 2**20, 1)
    return result


def jax_step(model, forward, pass_):
    """`models.compiled_step` on the JAX backend: a `jax.jit` function of `x`
    returning the sum of `forward(x)` (`pass_="forward"`) or of the gradients
    of the model's trainable weights. `forward` runs in a `keras.StatelessScope`
    that maps the variables to the function's arguments, as Keras's own JAX
    training step does; XLA always compiles it (`--jit` has no effect)."""
    import jax
    import jax.numpy as jnp
    import keras

    trainable, other = model.trainable_variables, model.non_trainable_variables

    def total(trainable_values, other_values, x):
        mapping = list(zip(trainable, trainable_values)) + list(
            zip(other, other_values)
        )
        with keras.StatelessScope(state_mapping=mapping):
            return jnp.sum(forward(x))

    def step(trainable_values, other_values, x):
        if pass_ == "forward":
            return total(trainable_values, other_values, x)
        grads = jax.grad(total)(trainable_values, other_values, x)
        return sum(jnp.sum(g) for g in grads)

    compiled = jax.jit(step)
    values = ([v.value for v in trainable], [v.value for v in other])
    return lambda x: compiled(*values, x)


def run_isolated(args, configuration):
    """Runs one configuration in a worker process: its result, or what stopped it.

    A watchdog kills the worker when its resident memory passes
    `--memory-cap-gb`, when the machine has less than `--reserve-gb` left
    (status `machine_busy`: rerun it), or after `--timeout-s`; on a CPU an
    address-space limit backs it up (not on a GPU, whose driver maps more
    address space than that).
    """
    job = dict(configuration, **vars(args))
    limit = int((2 * args.memory_cap_gb + 8) * 2**30)
    on_cpu = configuration.get("device") != "gpu"
    return common.run_worker(
        common.module_command("speed_memory", "--worker", json.dumps(job)),
        common.worker_env(TF_CPP_MIN_LOG_LEVEL="2"),
        args,
        limit if on_cpu else None,
    )


def sweep(args, device, csv_path, jit_compile=None):
    """Runs each selected configuration up the lengths, merging rows into the CSV.

    Rows of configurations not run stay as they were (`--fresh` drops them).
    `jit_compile`: the column's value when not `--jit` (JAX compiles always).
    """

    def key(row):
        return tuple(str(row[name]) for name in CONFIGURATION)

    rows = (
        {}
        if args.fresh or not os.path.exists(csv_path)
        else {key(row): row for row in read_rows(csv_path)}
    )

    def order(r):
        return (
            LEVELS.index(r["level"]),
            r["model"],
            r["mode"],
            PASSES.index(r["pass"]),
            int(r["length"]),
        )

    selected = [
        (level, model, mode, pass_)
        for level in args.levels
        for model, mode in MODELS[level]
        if model in args.models
        for pass_ in args.passes
    ]
    for level, model, mode, pass_ in selected:
        stopped_at = None
        for length in sorted(args.lengths):
            row = {
                "device": device,
                "level": level,
                "model": model,
                "mode": mode,
                "pass": pass_,
                "length": length,
                "chunk_size": args.chunk_size or "",
                "jit_compile": args.jit if jit_compile is None else jit_compile,
                # How busy the machine was, and the code measured (others may commit).
                "load_average": round(os.getloadavg()[0], 2),
                "keras_favor_commit": common.git_commit(),
            }
            if stopped_at:
                row.update(
                    status="skipped", note=f"out of budget from L={stopped_at}"
                )
            else:
                row.update(run_isolated(args, row))
                stopped_at = length if row["status"] in OUT_OF_BUDGET else None
            print(
                f"{level} {model} {mode} {pass_} L={length}: {row['status']}, median "
                f"{row.get('median_s', '-')} s, peak {row.get('peak_rss_mib', '-')} MiB",
                flush=True,
            )
            rows[key(row)] = row
            common.write_csv(csv_path, FIELDS, sorted(rows.values(), key=order))


def read_rows(csv_path):
    """The CSV's rows, with the lengths and the columns read here as numbers."""
    with open(csv_path, newline="") as file:
        rows = list(csv.DictReader(file))
    for row in rows:
        row["length"] = int(row["length"])
        for name in ("median_s", "min_s", "peak_rss_mib", "baseline_rss_mib"):
            row[name] = float(row[name]) if row.get(name) else None
    return rows


def measured(rows, level, model, mode, pass_, name="median_s"):
    """`{length: value}` of one configuration's measured rows."""
    return {
        r["length"]: r[name]
        for r in rows
        if r["status"] in MEASURED
        and r[name] is not None
        and (r["level"], r["model"], r["mode"], r["pass"])
        == (level, model, mode, pass_)
    }


def out_of_budget_from(rows, level, model, mode, passes=PASSES):
    """The length from which a configuration (any of `passes`) was out of budget, or None."""
    return min(
        (
            r["length"]
            for r in rows
            if r["status"] in OUT_OF_BUDGET
            and r["pass"] in passes
            and (r["level"], r["model"], r["mode"]) == (level, model, mode)
        ),
        default=None,
    )


def crossover_length(rows, mode, pass_):
    """Length from which FAVOR+ is faster than exact attention (layer level).

    Interpolated in log-log between the last length where exact attention
    is faster and the first where it is not; None if it never crosses in
    the measured range, the shortest length if FAVOR+ is always faster.
    """
    favor, exact = (
        measured(rows, "layer", model, mode, pass_)
        for model in ("favor", "exact")
    )
    previous = None
    for length in sorted(set(favor) & set(exact)):
        ratio = exact[length] / favor[length]
        if ratio >= 1:
            if previous is None:
                return length
            (l0, r0) = previous
            return round(
                l0 * (length / l0) ** (math.log(1 / r0) / math.log(ratio / r0))
            )
        previous = (length, ratio)
    return None


def summary(rows, at=8192, memory_at=65536):
    """The targets as measured, one line each.

    Time ratios are of the medians, with the ratio of the fastest runs in
    brackets, as a check against other processes' load. Memory grows as
    `L^slope`: the log-log slope of peak minus baseline from L = 4096 on.
    """

    def fmt(value, digits=2, unit=""):
        return "n/a" if value is None else f"{value:.{digits}f}{unit}"

    def verdict(value, holds):
        return "n/a" if value is None else "met" if holds(value) else "not met"

    def time_ratio(
        text, slower, faster, pass_, length, goal, holds, optional=False
    ):
        medians, fastest = (
            [
                measured(rows, *c, pass_, name).get(length)
                for c in (slower, faster)
            ]
            for name in ("median_s", "min_s")
        )
        value, best = (
            None if None in v else v[0] / v[1] for v in (medians, fastest)
        )
        return (
            []
            if optional and value is None
            else [
                f"{text} = {fmt(value, unit='x')} (min: {fmt(best, unit='x')}); "
                f"target {goal}: {verdict(value, holds)}"
            ]
        )

    lines = time_ratio(
        f"layer, bidirectional, fwd+bwd, L={at}: exact / FAVOR+",
        ("layer", *EXACT),
        ("layer", *FAVOR),
        "forward_backward",
        at,
        ">= 10x",
        lambda v: v >= 10,
    )
    for pass_ in PASSES:
        lines += time_ratio(
            f"stack, {pass_}, L={at}: FAVOR+ / identity",
            ("stack", *FAVOR),
            ("stack", *IDENTITY),
            pass_,
            at,
            "<= 2x",
            lambda v: v <= 2,
        )
    for level, pass_, length in itertools.product(
        LEVELS, PASSES, sorted({r["length"] for r in rows if r["length"] >= at})
    ):
        lines += time_ratio(
            f"{level}, {pass_}, L={length}: causal / bidirectional",
            (level, "favor", "causal"),
            (level, *FAVOR),
            pass_,
            length,
            "<= 1.5x",
            lambda v: v <= 1.5,
            optional=True,
        )
    for level, mode in itertools.product(LEVELS, MODES):
        peaks = measured(
            rows, level, "favor", mode, "forward_backward", "peak_rss_mib"
        )
        bases = measured(
            rows, level, "favor", mode, "forward_backward", "baseline_rss_mib"
        )
        growth = [
            (math.log(n), math.log(p - bases[n]))
            for n, p in sorted(peaks.items())
            if n >= 4096 and p > bases.get(n, p)
        ]
        slope = (
            statistics.linear_regression(*zip(*growth)).slope
            if len(growth) > 1
            else None
        )
        peak = peaks.get(memory_at)
        lines.append(
            f"{level}, {mode}, fwd+bwd, L={memory_at}: peak RSS "
            f"{fmt(peak and peak * 2**20 / 1e9, 2, ' GB')} "
            f"({fmt(peak and peak / 1024, 2, ' GiB')}); target < 6 GB: "
            f"{verdict(peak, lambda v: v * 2**20 < 6e9)}; log-log slope of "
            f"(peak - baseline) over L >= 4096: {fmt(slope)} (1 = linear)"
        )
    for mode, pass_ in itertools.product(MODES, PASSES):
        length = (
            crossover_length(rows, mode, pass_)
            or "n/a (not within the measured lengths)"
        )
        lines.append(
            f"crossover, layer, {mode}, {pass_}: FAVOR+ faster than exact from "
            f"L ~ {length}"
        )
    return lines + [
        f"{level}, {model} {mode}: out of budget from L={stop}"
        for level in LEVELS
        for model, mode in MODELS[level]
        if (stop := out_of_budget_from(rows, level, model, mode))
    ]


COLORS = {"favor": "tab:blue", "exact": "tab:red", "identity": "black"}
LABELS = {
    "favor": "FAVOR+",
    "exact": "exact",
    "identity": "identity (X, lower bound)",
}


def plot(rows, level, png_path, device_name):
    """Log-log forward time, forward + backward time and peak memory against L."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (
        ("forward", "median_s", "forward time (s)", 1),
        ("forward_backward", "median_s", "forward + backward time (s)", 1),
        (
            "forward_backward",
            "peak_rss_mib",
            "peak RSS, fwd + bwd (GiB)",
            1 / 1024,
        ),
    )
    for axis, (pass_, name, label, scale) in zip(axes, panels):
        for model, mode in MODELS[level]:
            points = sorted(
                measured(rows, level, model, mode, pass_, name).items()
            )
            if points:
                style = (
                    ":"
                    if model == "identity"
                    else "-"
                    if mode == "bidirectional"
                    else "--"
                )
                axis.plot(
                    [n for n, _ in points],
                    [v * scale for _, v in points],
                    style,
                    color=COLORS[model],
                    marker="o",
                    markersize=3,
                    label=LABELS[model]
                    + ("" if model == "identity" else f" {mode}"),
                )
                if stop := out_of_budget_from(
                    rows, level, model, mode, (pass_,)
                ):
                    axis.axvline(stop, color=COLORS[model], alpha=0.15)
        if name == "peak_rss_mib":
            axis.axhline(6e9 / 2**30, color="gray", linestyle=":", linewidth=1)
            axis.annotate(
                "6 GB",
                (0.02, 6e9 / 2**30),
                xycoords=("axes fraction", "data"),
                fontsize=7,
                color="gray",
                va="bottom",
            )
        axis.set_xscale("log", base=2)
        axis.set(
            yscale="log", xlabel="sequence length L (tokens)", ylabel=label
        )
        axis.grid(True, which="both", alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    title = (
        "attention layer alone"
        if level == "layer"
        else "two pre-norm blocks (hidden 512)"
    )
    figure.suptitle(
        f"{title}, batch 1, 8 heads x 64, 256 features; {device_name} "
        "(shaded line: out of budget from there)",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(png_path, dpi=130)
    plt.close(figure)


def parse_args(argv=None):
    return common.parse_args(
        __doc__,
        argv,
        levels=list(LEVELS),
        models=["favor", "exact", "identity"],
        passes=list(PASSES),
        lengths=LENGTHS,
        repeats=(5, "timed runs at most"),
        min_repeats=(3, "timed runs at least"),
        budget_s=(
            20.0,
            "stop timing once --min-repeats runs used this many seconds",
        ),
        time_cap_s=(60.0, "median step time cap"),
        memory_cap_gb=(10.0, "resident memory cap"),
        reserve_gb=(
            2.0,
            "kill a worker when the machine has less memory available",
        ),
        timeout_s=(900.0, "hard cap per process"),
        chunk_size=(0, "FavorAttention chunk_size (0: the layer's default)"),
        jit=(False, "compile the steps with XLA"),
        plot_only=(False, "redraw the plots and the summary from the CSV"),
        fresh=(False, "discard the CSV's earlier rows"),
        worker=("", argparse.SUPPRESS),
    )


def measured_on(json_path, environment):
    """The device of the last run recorded in `json_path` (this one's if none)."""
    if os.path.exists(json_path):
        with open(json_path) as file:
            environment = json.load(file)["runs"][-1]["environment"]
    return environment["gpu"] or environment["cpu"]


def main():
    args = parse_args()
    if args.worker:
        print(
            "RESULT " + json.dumps(measure(json.loads(args.worker))), flush=True
        )
        return
    environment = common.environment()
    device = "gpu" if environment["gpu"] else "cpu"
    # Another backend's rows go to files of their own: speed_memory_jax_cpu.csv.
    backend = (
        ""
        if environment["backend"] == "tensorflow"
        else environment["backend"] + "_"
    )
    stem = os.path.join(args.output_dir, f"speed_memory_{backend}{device}")
    if not args.plot_only:
        common.write_environment(
            stem + ".json", environment, vars(args), not args.fresh
        )
        sweep(args, device, stem + ".csv", None if not backend else True)
    rows = read_rows(stem + ".csv")
    try:
        import matplotlib  # noqa: F401
    except (
        ImportError
    ):  # a GPU machine may lack it: the CSV and summary suffice
        print("matplotlib is not installed: no plots", flush=True)
    else:
        device_name = measured_on(stem + ".json", environment)
        for level in {row["level"] for row in rows}:
            plot(rows, level, f"{stem}_{level}.png", device_name)
    common.write_lines(f"{stem}_summary.txt", summary(rows))


if __name__ == "__main__":
    main()
