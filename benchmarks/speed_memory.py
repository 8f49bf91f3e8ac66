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

    python benchmarks/speed_memory.py --fresh           # the full sweep
    python benchmarks/speed_memory.py --levels layer --lengths 1024 8192
    python benchmarks/speed_memory.py --plot-only       # redraw from the CSV
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import common

LEVELS, PASSES, MODES = ("layer", "stack"), common.PASSES, ("bidirectional", "causal")
FAVOR, EXACT = ("favor", "bidirectional"), ("exact", "bidirectional")
MODELS = {"layer": (FAVOR, ("favor", "causal"), EXACT, ("exact", "causal")),
          "stack": (FAVOR, ("favor", "causal"), EXACT, ("identity", "bidirectional"))}
LENGTHS = tuple(2**k for k in range(9, 17))  # 512 ... 65536
CONFIGURATION = ("device", "level", "model", "mode", "pass", "length", "chunk_size", "jit_compile")
FIELDS = CONFIGURATION[:6] + (
    "status", "median_s", "min_s", "max_s", "timed_runs", "first_call_s", "baseline_rss_mib",
    "peak_rss_mib", "gpu_peak_mib", "chunk_size", "jit_compile", "load_average",
    "keras_favor_commit", "note")
WORKER_SETTINGS = ("repeats", "min_repeats", "budget_s", "time_cap_s", "chunk_size", "jit",
                   "profile_dir")
MEASURED = ("ok", "over_time_cap")
OUT_OF_BUDGET = ("over_time_cap", "out_of_memory", "timeout")  # longer lengths are skipped
RESULT_PREFIX = "RESULT "
STATUS_CELLS = {"out_of_memory": "OOM", "timeout": "timeout", "": ""}
# Table columns and plot panels: (pass, CSV column, column, axis label, scale, digits).
PANELS = (("forward", "median_s", "fwd s", "forward time (s)", 1, 3),
          ("forward_backward", "median_s", "fwd+bwd s", "forward + backward time (s)", 1, 3),
          ("forward_backward", "peak_rss_mib", "fwd+bwd peak GiB", "peak RSS, fwd + bwd (GiB)",
           1 / 1024, 2))


def measure(job):
    """Times one configuration in this process and returns its CSV columns."""
    import tensorflow as tf

    import models

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    x = models.random_inputs(job["length"])
    result = {"baseline_rss_mib": round(common.peak_rss_mib(), 1)}
    model, forward = models.build(
        job["level"], job["model"], job["mode"] == "causal", job["length"], job["chunk_size"])
    step = models.compiled_step(forward, model.trainable_variables, job["pass"], job["jit"])
    try:
        first, times = common.time_calls(step, [x], job["repeats"], budget_s=job["budget_s"],
                                         min_repeats=min(job["min_repeats"], job["repeats"]))
    except tf.errors.ResourceExhaustedError as error:
        result.update(status="out_of_memory", note=error.message[:120])
    else:
        median = statistics.median(times)
        result.update(status="over_time_cap" if median > job["time_cap_s"] else "ok",
                      median_s=round(median, 5), min_s=round(min(times), 5),
                      max_s=round(max(times), 5), timed_runs=len(times),
                      first_call_s=round(first, 3))
    result["peak_rss_mib"] = round(common.peak_rss_mib(), 1)
    if gpus:
        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
        result["gpu_peak_mib"] = round(peak / 2**20, 1)
    if job["profile_dir"] and result["status"] == "ok":  # one more step, for TensorBoard
        name = "_".join(str(job[key]) for key in ("level", "model", "mode", "pass", "length"))
        tf.profiler.experimental.start(os.path.join(job["profile_dir"], name))
        step(x).numpy()
        tf.profiler.experimental.stop()
    return result


def run_isolated(args, configuration):
    """Runs one configuration in a worker process: its result, or what stopped it.

    A watchdog kills the worker when its resident memory passes
    `--memory-cap-gb`, when the machine has less than `--reserve-gb` left
    (status `machine_busy`: rerun it), or after `--timeout-s`; an
    address-space limit backs it up.
    """
    job = dict(configuration, **{name: getattr(args, name) for name in WORKER_SETTINGS})
    if args.in_process:
        return measure(job)
    limit = int((2 * args.memory_cap_gb + 8) * 2**30)
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    deadline, stopped, rss = time.monotonic() + args.timeout_s, None, 0.0
    while stopped is None and process.poll() is None:
        time.sleep(0.05)
        rss = common.proc_mib(f"/proc/{process.pid}/status", "VmRSS") or rss
        if rss > args.memory_cap_gb * 1024:
            stopped = "out_of_memory", f"killed at {rss:.0f} MB RSS"
        elif common.proc_mib("/proc/meminfo", "MemAvailable") < args.reserve_gb * 1024:
            stopped = "machine_busy", f"killed: machine below {args.reserve_gb} GB free"
        elif time.monotonic() > deadline:
            stopped = "timeout", f"killed after {args.timeout_s} s"
    if stopped:
        process.kill()
    stdout, stderr = process.communicate()
    if stopped:
        return {"status": stopped[0], "note": stopped[1], "peak_rss_mib": round(rss, 1)}
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    # Under the address-space limit an allocation fails without a Python error.
    memory = any(word in stderr for word in ("bad_alloc", "Cannot allocate", "OOM"))
    note = (stderr.strip().splitlines() or ["no output"])[-1][:160]
    return {"status": "out_of_memory" if memory else "error", "note": note}


def sweep(args, device, csv_path):
    """Runs each selected configuration up the lengths, merging rows into the CSV.

    Rows of configurations not run stay as they were (`--fresh` drops them).
    """
    key = lambda row: tuple(str(row[name]) for name in CONFIGURATION)  # noqa: E731
    rows = {}
    if os.path.exists(csv_path) and not args.fresh:
        rows = {key(row): row for row in read_rows(csv_path)}
    order = {name: index for index, name in enumerate(LEVELS + PASSES)}
    selected = [(level, model, mode, pass_) for level in args.levels
                for model, mode in MODELS[level] if not args.models or model in args.models
                for pass_ in args.passes]
    for level, model, mode, pass_ in selected:
        stopped_at = None
        for length in sorted(args.lengths):
            row = {"device": device, "level": level, "model": model, "mode": mode, "pass": pass_,
                   "length": length, "chunk_size": args.chunk_size or "", "jit_compile": args.jit,
                   # How busy the machine was, and the code measured (others may commit).
                   "load_average": round(os.getloadavg()[0], 2),
                   "keras_favor_commit": common.git_commit()}
            if stopped_at:
                row.update(status="skipped", note=f"out of budget from L={stopped_at}")
            else:
                row.update(run_isolated(args, row))
                stopped_at = length if row["status"] in OUT_OF_BUDGET else None
            print(f"{level} {model} {mode} {pass_} L={length}: {row['status']}, median "
                  f"{row.get('median_s', '-')} s, peak {row.get('peak_rss_mib', '-')} MiB",
                  flush=True)
            rows[key(row)] = row
            common.write_csv(csv_path, FIELDS, sorted(rows.values(), key=lambda r: (
                order[r["level"]], r["model"], r["mode"], order[r["pass"]], int(r["length"]))))


def read_rows(csv_path):
    rows = common.read_csv(csv_path)
    for row in rows:
        row["length"] = int(row["length"])
        for name in ("median_s", "min_s", "peak_rss_mib", "baseline_rss_mib"):
            row[name] = float(row[name]) if row.get(name) else None
    return rows


def find(rows, level, model, mode, pass_):
    return [r for r in rows if (r["level"], r["model"], r["mode"], r["pass"])
            == (level, model, mode, pass_)]


def measured(rows, level, model, mode, pass_, name="median_s"):
    """`{length: value}` of one configuration's measured rows."""
    return {r["length"]: r[name] for r in find(rows, level, model, mode, pass_)
            if r["status"] in MEASURED and r[name] is not None}


def out_of_budget_from(rows, level, model, mode, passes=PASSES):
    return min((r["length"] for p in passes for r in find(rows, level, model, mode, p)
                if r["status"] in OUT_OF_BUDGET), default=None)


def crossover_length(rows, mode, pass_):
    """Length from which FAVOR+ is faster than exact attention (layer level).

    Interpolated in log-log between the last length where exact attention
    is faster and the first where it is not; None if it never crosses in
    the measured range, the shortest length if FAVOR+ is always faster.
    """
    favor = measured(rows, "layer", "favor", mode, pass_)
    exact = measured(rows, "layer", "exact", mode, pass_)
    previous = None
    for length in sorted(set(favor) & set(exact)):
        ratio = exact[length] / favor[length]
        if ratio >= 1:
            if previous is None:
                return length
            (l0, r0) = previous
            t = math.log(1 / r0) / math.log(ratio / r0)
            return round(math.exp(math.log(l0) + t * math.log(length / l0)))
        previous = (length, ratio)
    return None


def summary(rows, at=8192, memory_at=65536):
    """Issue 5's targets as measured, one line each.

    Time ratios are of the medians, with the ratio of the fastest runs in
    brackets, as a check against other processes' load. Memory grows as
    `L^slope`: the log-log slope of peak minus baseline from L = 4096 on.
    """
    def fmt(value, digits=2, unit=""):
        return "n/a" if value is None else f"{value:.{digits}f}{unit}"

    def verdict(value, holds):
        return "n/a" if value is None else "met" if holds(value) else "not met"

    def time_ratio(text, slower, faster, pass_, length, goal, holds, optional=False):
        medians, fastest = ([measured(rows, *c, pass_, name).get(length) for c in (slower, faster)]
                            for name in ("median_s", "min_s"))
        value, best = (None if None in v else v[0] / v[1] for v in (medians, fastest))
        return [] if optional and value is None else [
            f"{text} = {fmt(value, unit='x')} (min: {fmt(best, unit='x')}); "
            f"target {goal}: {verdict(value, holds)}"]

    lines = time_ratio(f"layer, bidirectional, fwd+bwd, L={at}: exact / FAVOR+", ("layer", *EXACT),
                       ("layer", *FAVOR), "forward_backward", at, ">= 10x", lambda v: v >= 10)
    for pass_ in PASSES:
        lines += time_ratio(f"stack, {pass_}, L={at}: FAVOR+ / identity", ("stack", *FAVOR),
                            ("stack", "identity", "bidirectional"), pass_, at, "<= 2x",
                            lambda v: v <= 2)
    for level in LEVELS:
        for pass_ in PASSES:
            for length in sorted({r["length"] for r in rows if r["length"] >= at}):
                lines += time_ratio(f"{level}, {pass_}, L={length}: causal / bidirectional",
                                    (level, "favor", "causal"), (level, *FAVOR), pass_, length,
                                    "<= 1.5x", lambda v: v <= 1.5, optional=True)
    for level in LEVELS:
        for mode in MODES:
            peaks = measured(rows, level, "favor", mode, "forward_backward", "peak_rss_mib")
            bases = measured(rows, level, "favor", mode, "forward_backward", "baseline_rss_mib")
            growth = [(math.log(n), math.log(p - bases[n])) for n, p in sorted(peaks.items())
                      if n >= 4096 and p > bases.get(n, p)]
            slope = statistics.linear_regression(*zip(*growth)).slope if len(growth) > 1 else None
            peak = peaks.get(memory_at)
            lines.append(
                f"{level}, {mode}, fwd+bwd, L={memory_at}: peak RSS "
                f"{fmt(peak and peak * 2**20 / 1e9, 2, ' GB')} "
                f"({fmt(peak and peak / 1024, 2, ' GiB')}); target < 6 GB: "
                f"{verdict(peak, lambda v: v * 2**20 < 6e9)}; log-log slope of "
                f"(peak - baseline) over L >= 4096: {fmt(slope)} (1 = linear)")
    for mode in MODES:
        for pass_ in PASSES:
            length = crossover_length(rows, mode, pass_) or "n/a (not within the measured lengths)"
            lines.append(f"crossover, layer, {mode}, {pass_}: FAVOR+ faster than exact from "
                         f"L ~ {length}")
    return lines + [f"{level}, {model} {mode}: out of budget from L={stop}"
                    for level in LEVELS for model, mode in MODELS[level]
                    if (stop := out_of_budget_from(rows, level, model, mode))]


STYLES = {("favor", "bidirectional"): ("FAVOR+ bidirectional", "tab:blue", "-"),
          ("favor", "causal"): ("FAVOR+ causal", "tab:blue", "--"),
          ("exact", "bidirectional"): ("exact bidirectional", "tab:red", "-"),
          ("exact", "causal"): ("exact causal", "tab:red", "--"),
          ("identity", "bidirectional"): ("identity (X, lower bound)", "black", ":")}


def plot(rows, level, png_path, device_name):
    """Log-log forward time, forward + backward time and peak memory against L."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for axis, (pass_, name, _, label, scale, _) in zip(axes, PANELS):
        for model, mode in MODELS[level]:
            points = sorted(measured(rows, level, model, mode, pass_, name).items())
            if points:
                title, color, style = STYLES[(model, mode)]
                axis.plot([n for n, _ in points], [v * scale for _, v in points], style,
                          color=color, marker="o", markersize=3, label=title)
                if stop := out_of_budget_from(rows, level, model, mode, (pass_,)):
                    axis.axvline(stop, color=color, alpha=0.15)
        if name == "peak_rss_mib":
            axis.axhline(6e9 / 2**30, color="gray", linestyle=":", linewidth=1)
            axis.annotate("6 GB", (0.02, 6e9 / 2**30), xycoords=("axes fraction", "data"),
                          fontsize=7, color="gray", va="bottom")
        axis.set_xscale("log", base=2)
        axis.set(yscale="log", xlabel="sequence length L", ylabel=label)
        axis.grid(True, which="both", alpha=0.3)
    next(a for a in axes if a.get_legend_handles_labels()[0]).legend(fontsize=8)
    title = "attention layer alone" if level == "layer" else "two pre-norm blocks (hidden 512)"
    figure.suptitle(f"{title}, batch 1, 8 heads x 64, 256 features; {device_name} "
                    "(shaded line: out of budget from there)", fontsize=10)
    figure.tight_layout()
    figure.savefig(png_path, dpi=80)
    plt.close(figure)


def markdown_table(rows, level):
    """One line per L, the PANELS columns of each model; OOM: over the memory cap."""
    models = [c for c in MODELS[level] if any(find(rows, level, *c, p) for p in PASSES)]
    names = [m if m == "identity" else f"{m} {'bi' if o == 'bidirectional' else o}"
             for m, o in models]
    header = ["L"] + [f"{n}, {column}" for _, _, column, *_ in PANELS for n in names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for length in sorted({r["length"] for r in rows if r["level"] == level}):
        cells = [str(length)]
        for pass_, name, _, _, scale, digits in PANELS:
            for model in models:
                row = next((r for r in find(rows, level, *model, pass_) if r["length"] == length),
                           {"status": ""})
                if row["status"] in MEASURED and row[name] is not None:
                    cells.append(f"{row[name] * scale:.{digits}f}")
                else:  # the status that stopped the model, "-" where it was not run
                    cells.append(STATUS_CELLS.get(row["status"], "-"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--levels", nargs="+", choices=LEVELS, default=list(LEVELS))
    add("--models", nargs="+", choices=("favor", "exact", "identity"), help="default: all")
    add("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    add("--lengths", nargs="+", type=int, default=list(LENGTHS))
    add("--repeats", type=int, default=5, help="timed runs at most")
    add("--min-repeats", type=int, default=3, help="timed runs at least")
    add("--budget-s", type=float, default=20.0,
        help="stop timing once --min-repeats runs used this many seconds")
    add("--time-cap-s", type=float, default=60.0, help="median step time cap")
    add("--memory-cap-gb", type=float, default=10.0, help="resident memory cap")
    add("--reserve-gb", type=float, default=2.0,
        help="kill a worker when the machine has less memory available")
    add("--timeout-s", type=float, default=900.0, help="hard cap per process")
    add("--chunk-size", type=int, help="FavorAttention chunk_size (default: the layer's)")
    add("--jit", action="store_true", help="compile the steps with XLA")
    add("--profile-dir", help="trace one more step of each configuration with tf.profiler here")
    add("--output-dir", default=common.RESULTS_DIR)
    add("--plot-only", action="store_true", help="redraw plots and summary from the CSV")
    add("--fresh", action="store_true", help="discard the CSV's earlier rows")
    add("--in-process", action="store_true", help="no subprocesses (smoke tests only)")
    add("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main():
    args = parse_args()
    if args.worker:
        print(RESULT_PREFIX + json.dumps(measure(json.loads(args.worker))), flush=True)
        return
    environment = common.describe() if args.in_process else common.environment()
    device = "gpu" if environment["gpu"] else "cpu"
    stem = os.path.join(args.output_dir, f"speed_memory_{device}")
    os.makedirs(args.output_dir, exist_ok=True)
    if not args.plot_only:
        common.write_environment(stem + ".json", environment, vars(args), not args.fresh)
        sweep(args, device, stem + ".csv")
    rows = read_rows(stem + ".csv")
    levels = [level for level in LEVELS if any(row["level"] == level for row in rows)]
    for level in levels:
        plot(rows, level, f"{stem}_{level}.png", environment["gpu"] or environment["cpu"])
    with open(f"{stem}_tables.md", "w") as file:
        file.write("".join(f"### {level}\n\n{markdown_table(rows, level)}\n\n" for level in levels))
    common.write_lines(f"{stem}_summary.txt", summary(rows))


if __name__ == "__main__":
    main()
