"""Speed and peak memory of FAVOR+ against exact attention, across lengths.

Two levels, each timed forward and forward plus backward (the gradients of
all trainable weights), batch 1, 8 heads, key_dim 64, 256 features:

- `layer`: `FavorAttention` (bidirectional and causal) against
  `keras.layers.MultiHeadAttention` (exact, bidirectional and causal);
- `stack`: two pre-norm blocks of hidden size 512 and intermediate size
  2048 (the Performer paper's Figure 3) with FAVOR+ attention, exact
  attention, and the identity attention that returns the value projection
  (the paper's lower-bound "X" line).

Each (level, model, mode, pass, length) runs in its own process: the step is
compiled with `tf.function`, called once to trace and once to warm up, then
timed; the median is reported with the process's peak resident memory and,
beside it, its baseline (TensorFlow imported and inputs made). A
configuration that passes the time cap or the memory cap is recorded as out
of budget, and the model's longer lengths are skipped. A watchdog kills a
process whose resident memory passes the cap, or when the machine runs low.

    python benchmarks/speed_memory.py                  # the full sweep
    python benchmarks/speed_memory.py --levels layer --lengths 1024 8192
    python benchmarks/speed_memory.py --plot-only      # redraw from the CSV

The same script runs on a GPU when TensorFlow sees one: results then go to
`results/speed_memory_gpu.*` and the GPU's peak memory is recorded.
"""

import argparse
import csv
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import common

LEVELS = ("layer", "stack")
PASSES = ("forward", "forward_backward")
MODELS = {
    "layer": (
        ("favor", "bidirectional"),
        ("favor", "causal"),
        ("exact", "bidirectional"),
        ("exact", "causal"),
    ),
    "stack": (
        ("favor", "bidirectional"),
        ("favor", "causal"),
        ("exact", "bidirectional"),
        ("identity", "bidirectional"),
    ),
}
LENGTHS = tuple(2**k for k in range(9, 17))  # 512 ... 65536
FIELDS = (
    "device",
    "level",
    "model",
    "mode",
    "pass",
    "length",
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
# Statuses after which a model's longer lengths are not run.
OUT_OF_BUDGET = ("over_time_cap", "out_of_memory", "timeout")
# A worker stopped because the machine (not the worker) ran low on memory:
# it is run again once memory is free, and never counts against the model.
MACHINE_BUSY = "machine_busy"
ATTEMPTS = 3
RESULT_PREFIX = "RESULT "
WATCH_INTERVAL_S = 0.05
GIB = 2**30


# --------------------------------------------------------------------------
# Worker: one configuration, in its own process.


def run_worker(args):
    """Times one configuration and prints its result as one JSON line."""
    import tensorflow as tf

    import models
    import timing

    timing.grow_gpu_memory()
    x = timing.random_inputs(args.length, models.HIDDEN)
    baseline = timing.peak_rss_mib()
    causal = args.mode == "causal"
    shape = (1, args.length, models.HIDDEN)
    if args.level == "layer":
        layer = models.attention_layer(args.model, args.chunk_size)
        layer.build(shape, shape)
        forward = lambda x: layer(x, x, use_causal_mask=causal)  # noqa: E731
        variables = layer.trainable_variables
    else:
        stack = models.block_stack(args.model, causal, args.chunk_size)
        stack.build(shape)
        forward = stack
        variables = stack.trainable_variables
    step = timing.compiled_step(forward, variables, args.pass_, args.jit)
    result = {"baseline_rss_mib": round(baseline, 1)}
    timing.reset_gpu_peak()
    try:
        first, times = timing.time_step(
            step,
            x,
            args.repeats,
            warmup=1,
            budget_s=args.budget_s,
            min_repeats=min(args.min_repeats, args.repeats),
        )
    except tf.errors.ResourceExhaustedError as error:
        result.update(status="out_of_memory", note=error.message[:120])
    else:
        median = statistics.median(times)
        result.update(
            status="over_time_cap" if median > args.time_cap_s else "ok",
            median_s=round(median, 5),
            min_s=round(min(times), 5),
            max_s=round(max(times), 5),
            timed_runs=len(times),
            first_call_s=round(first, 3),
        )
    result["peak_rss_mib"] = round(timing.peak_rss_mib(), 1)
    gpu_peak = timing.gpu_peak_mib()
    if gpu_peak is not None:
        result["gpu_peak_mib"] = round(gpu_peak, 1)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# --------------------------------------------------------------------------
# Orchestrator: runs the workers, enforces the caps, writes the CSV.


def proc_status_kb(pid, field):
    """A `VmRSS`-style field of `/proc/<pid>/status` in KiB, or None."""
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def available_memory_mb():
    with open("/proc/meminfo") as file:
        for line in file:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return math.inf


def limit_address_space(limit_bytes):
    """Runs in the child before exec: a hard backstop behind the watchdog."""

    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return apply


def wait_for_free_memory(args, needed_gb=3.0, poll_s=10.0, patience_s=600.0):
    """Waits (up to `patience_s`) until the machine has memory to spare."""
    deadline = time.monotonic() + patience_s
    while available_memory_mb() < (args.reserve_gb + needed_gb) * 1024:
        if time.monotonic() > deadline:
            return
        time.sleep(poll_s)


def run_with_retries(args, level, model, mode, pass_, length):
    """Runs a worker, again when the machine ran out of memory under it."""
    if args.in_process:
        return run_in_process(args, level, model, mode, pass_, length)
    command = worker_command(args, level, model, mode, pass_, length)
    for _ in range(ATTEMPTS):
        wait_for_free_memory(args)
        result = run_isolated(command, args)
        if result["status"] != MACHINE_BUSY:
            return result
    result["status"] = "error"
    return result


def worker_command(args, level, model, mode, pass_, length):
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        f"--level={level}",
        f"--model={model}",
        f"--mode={mode}",
        f"--pass={pass_}",
        f"--length={length}",
        f"--repeats={args.repeats}",
        f"--min-repeats={args.min_repeats}",
        f"--budget-s={args.budget_s}",
        f"--time-cap-s={args.time_cap_s}",
    ]
    if args.chunk_size is not None:
        command.append(f"--chunk-size={args.chunk_size}")
    if args.jit:
        command.append("--jit")
    return command


def run_isolated(command, args):
    """Runs a worker under the timeout and the memory watchdog.

    Returns the worker's result dict, or a dict with the status that
    stopped it.
    """
    cap_mb = args.memory_cap_gb * 1024
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=limit_address_space(int((2 * args.memory_cap_gb + 8) * GIB)),
    )
    start = time.monotonic()
    stopped, note, peak_kb = None, "", 0
    while process.poll() is None:
        peak_kb = max(peak_kb, proc_status_kb(process.pid, "VmHWM") or 0)
        rss_mb = (proc_status_kb(process.pid, "VmRSS") or 0) / 1024
        if rss_mb > cap_mb:
            stopped, note = "out_of_memory", f"killed at {rss_mb:.0f} MB RSS"
        elif available_memory_mb() < args.reserve_gb * 1024:
            stopped = MACHINE_BUSY
            note = f"killed: machine below {args.reserve_gb} GB free at {rss_mb:.0f} MB RSS"
        elif time.monotonic() - start > args.timeout_s:
            stopped, note = "timeout", f"killed after {args.timeout_s} s"
        if stopped:
            process.kill()
            break
        time.sleep(WATCH_INTERVAL_S)
    stdout, stderr = process.communicate()
    if stopped:
        return {"status": stopped, "note": note, "peak_rss_mib": round(peak_kb / 1024, 1)}
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    # The address-space limit makes allocations fail without a Python error.
    memory_failure = any(
        word in stderr for word in ("bad_alloc", "Cannot allocate", "OOM")
    )
    return {
        "status": "out_of_memory" if memory_failure else "error",
        "note": (stderr.strip().splitlines() or ["no output"])[-1][:160],
        "peak_rss_mib": round(peak_kb / 1024, 1),
    }


def run_in_process(args, level, model, mode, pass_, length):
    """Runs a worker in this process (for smoke tests: no isolation)."""
    import contextlib
    import io

    worker_args = parse_args(worker_command(args, level, model, mode, pass_, length)[2:])
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        run_worker(worker_args)
    return json.loads(output.getvalue().split(RESULT_PREFIX, 1)[1])


def configuration(row):
    """The key of a row: a rerun of the same configuration replaces it."""
    return tuple(
        str(row[key])
        for key in ("device", "level", "model", "mode", "pass", "length", "chunk_size", "jit_compile")
    )


def write_rows(csv_path, rows):
    order = {name: index for index, name in enumerate(LEVELS + PASSES)}
    rows = sorted(
        rows,
        key=lambda r: (order[r["level"]], r["model"], r["mode"], order[r["pass"]], int(r["length"])),
    )
    with open(csv_path, "w", newline="") as file:
        writer = csv.DictWriter(file, FIELDS, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def selected_configurations(args):
    for level in args.levels:
        for model, mode in MODELS[level]:
            if args.models and model not in args.models:
                continue
            for pass_ in args.passes:
                yield level, model, mode, pass_


def sweep(args, device, csv_path):
    """Runs the selected configurations, merging each row into the CSV.

    Rows of configurations not run now stay as they were, so a partial
    rerun updates the CSV in place (`--fresh` starts it anew).
    """
    rows = {}
    if os.path.exists(csv_path) and not args.fresh:
        rows = {configuration(row): row for row in read_rows(csv_path)}
    for level, model, mode, pass_ in selected_configurations(args):
        out_of_budget_at = None
        for length in sorted(args.lengths):
            row = {
                "device": device,
                "level": level,
                "model": model,
                "mode": mode,
                "pass": pass_,
                "length": length,
                "chunk_size": args.chunk_size or "",
                "jit_compile": args.jit,
                # How busy the machine was when this configuration started.
                "load_average": round(os.getloadavg()[0], 2),
                # The code measured: other agents may commit during a sweep.
                "keras_favor_commit": common.git_commit(),
            }
            if out_of_budget_at is not None:
                row.update(status="skipped", note=f"out of budget from L={out_of_budget_at}")
            else:
                started = time.monotonic()
                row.update(run_with_retries(args, level, model, mode, pass_, length))
                if row["status"] in OUT_OF_BUDGET:
                    out_of_budget_at = length
                print(
                    f"{level:5s} {model:8s} {mode:13s} {pass_:16s} "
                    f"L={length:6d} {row['status']:13s} "
                    f"median={row.get('median_s', '-')} s "
                    f"peak={row.get('peak_rss_mib', '-')} MiB "
                    f"({time.monotonic() - started:.0f} s)",
                    flush=True,
                )
            rows[configuration(row)] = row
            write_rows(csv_path, rows.values())


# --------------------------------------------------------------------------
# Reading the results: the targets, the crossover, the plots.


def read_rows(csv_path):
    with open(csv_path, newline="") as file:
        rows = list(csv.DictReader(file))
    for row in rows:
        row["length"] = int(row["length"])
        for key in ("median_s", "min_s", "peak_rss_mib", "baseline_rss_mib"):
            row[key] = float(row[key]) if row.get(key) else None
    return rows


def lookup(rows, level, model, mode, pass_, length, key="median_s"):
    for row in rows:
        if (row["level"], row["model"], row["mode"], row["pass"], row["length"]) == (
            level,
            model,
            mode,
            pass_,
            length,
        ) and row["status"] in ("ok", "over_time_cap"):
            return row[key]
    return None


def series(rows, level, model, mode, pass_, key="median_s"):
    """`(lengths, values)` of the measured points of one configuration."""
    points = sorted(
        (row["length"], row[key])
        for row in rows
        if (row["level"], row["model"], row["mode"], row["pass"]) == (level, model, mode, pass_)
        and row["status"] in ("ok", "over_time_cap")
        and row[key] is not None
    )
    return [p[0] for p in points], [p[1] for p in points]


def crossover_length(rows, mode, pass_):
    """Length from which FAVOR+ is faster than exact attention (layer level).

    Interpolated in log-log between the last length where exact attention
    is faster and the first where it is not; None if it never crosses in
    the measured range, the shortest length if FAVOR+ is always faster.
    """
    lengths, favor = series(rows, "layer", "favor", mode, pass_)
    favor = dict(zip(lengths, favor))
    exact = dict(zip(*series(rows, "layer", "exact", mode, pass_)))
    common_lengths = sorted(set(favor) & set(exact))
    previous = None
    for length in common_lengths:
        ratio = exact[length] / favor[length]
        if ratio >= 1:
            if previous is None:
                return length
            (l0, r0) = previous
            t = math.log(1 / r0) / math.log(ratio / r0)
            return round(math.exp(math.log(l0) + t * math.log(length / l0)))
        previous = (length, ratio)
    return None


def ratio(numerator, denominator):
    if numerator is None or denominator is None:
        return None
    return numerator / denominator


def log_slope(lengths, values):
    """Least-squares slope of log(values) against log(lengths)."""
    xs = [math.log(length) for length in lengths]
    ys = [math.log(value) for value in values]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    return covariance / sum((x - mean_x) ** 2 for x in xs)


def fmt(value, digits=2, suffix=""):
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def verdict(value, holds):
    return "n/a" if value is None else ("met" if holds(value) else "not met")


def summary(rows, target_length=8192, memory_length=65536):
    """The issue's targets as measured, one line each.

    Time ratios use the medians; the ratio of the fastest runs follows in
    brackets, as a check against other processes' load.
    """
    lines = []

    def time_ratio(slower, faster, pass_="forward_backward", length=target_length):
        by_median, by_min = (
            ratio(
                lookup(rows, *slower, pass_, length, key),
                lookup(rows, *faster, pass_, length, key),
            )
            for key in ("median_s", "min_s")
        )
        return by_median, f"{fmt(by_median, suffix='x')} (min: {fmt(by_min, suffix='x')})"

    value, text = time_ratio(("layer", "exact", "bidirectional"), ("layer", "favor", "bidirectional"))
    lines.append(
        f"layer, bidirectional, fwd+bwd, L={target_length}: exact / FAVOR+ = {text}; "
        f"target >= 10x: {verdict(value, lambda v: v >= 10)}"
    )
    for pass_ in PASSES:
        value, text = time_ratio(
            ("stack", "favor", "bidirectional"), ("stack", "identity", "bidirectional"), pass_
        )
        lines.append(
            f"stack, {pass_}, L={target_length}: FAVOR+ / identity = {text}; "
            f"target <= 2x: {verdict(value, lambda v: v <= 2)}"
        )
    for level in LEVELS:
        for pass_ in PASSES:
            for length in sorted({r["length"] for r in rows if r["length"] >= target_length}):
                value, text = time_ratio(
                    (level, "favor", "causal"), (level, "favor", "bidirectional"), pass_, length
                )
                if value is not None:
                    lines.append(
                        f"{level}, {pass_}, L={length}: causal / bidirectional = {text}; "
                        f"target <= 1.5x: {verdict(value, lambda v: v <= 1.5)}"
                    )
    for level in LEVELS:
        for mode in ("bidirectional", "causal"):
            peak = lookup(rows, level, "favor", mode, "forward_backward", memory_length, "peak_rss_mib")
            lengths, peaks = series(rows, level, "favor", mode, "forward_backward", "peak_rss_mib")
            _, bases = series(rows, level, "favor", mode, "forward_backward", "baseline_rss_mib")
            growth = [(n, p - b) for n, p, b in zip(lengths, peaks, bases) if n >= 4096 and p > b]
            slope = log_slope(*zip(*growth)) if len(growth) >= 2 else None
            lines.append(
                f"{level}, {mode}, fwd+bwd, L={memory_length}: peak RSS "
                f"{fmt(peak and peak * 2**20 / 1e9, 2, ' GB')} "
                f"({fmt(peak and peak / 1024, 2, ' GiB')}); target < 6 GB: "
                f"{verdict(peak, lambda v: v * 2**20 < 6e9)}; log-log slope of "
                f"(peak - baseline) over L >= 4096: {fmt(slope)} (1 = linear)"
            )
    for mode in ("bidirectional", "causal"):
        for pass_ in PASSES:
            length = crossover_length(rows, mode, pass_)
            lines.append(
                f"crossover, layer, {mode}, {pass_}: FAVOR+ faster than exact from "
                f"L ~ {length or 'n/a (not within the measured lengths)'}"
            )
    for level in LEVELS:
        for model, mode in MODELS[level]:
            stops = [
                r["length"]
                for r in rows
                if (r["level"], r["model"], r["mode"]) == (level, model, mode)
                and r["status"] in OUT_OF_BUDGET
            ]
            if stops:
                lines.append(f"{level}, {model} {mode}: out of budget from L={min(stops)}")
    return lines


STYLES = {
    ("favor", "bidirectional"): ("FAVOR+ bidirectional", "tab:blue", "-"),
    ("favor", "causal"): ("FAVOR+ causal", "tab:blue", "--"),
    ("exact", "bidirectional"): ("exact bidirectional", "tab:red", "-"),
    ("exact", "causal"): ("exact causal", "tab:red", "--"),
    ("identity", "bidirectional"): ("identity (X, lower bound)", "black", ":"),
}


def plot(rows, level, png_path, device_name):
    """Log-log time (forward, fwd+bwd) and memory against length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (
        ("forward", "median_s", "forward time (s)"),
        ("forward_backward", "median_s", "forward + backward time (s)"),
        ("forward_backward", "peak_rss_mib", "peak RSS, fwd + bwd (MiB)"),
    )
    for axis, (pass_, key, label) in zip(axes, panels):
        for model, mode in MODELS[level]:
            lengths, values = series(rows, level, model, mode, pass_, key)
            if not lengths:
                continue
            name, color, style = STYLES[(model, mode)]
            axis.plot(lengths, values, style, color=color, marker="o", markersize=3, label=name)
            stops = [
                r["length"]
                for r in rows
                if (r["level"], r["model"], r["mode"], r["pass"]) == (level, model, mode, pass_)
                and r["status"] in OUT_OF_BUDGET
            ]
            if stops:
                axis.axvline(min(stops), color=color, alpha=0.15)
        if key == "peak_rss_mib":
            axis.axhline(6e9 / 2**20, color="gray", linestyle=":", linewidth=1)
            axis.annotate("6 GB", (0.02, 6e9 / 2**20), xycoords=("axes fraction", "data"),
                          fontsize=7, color="gray", va="bottom")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length L")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    next(a for a in axes if a.get_legend_handles_labels()[0]).legend(fontsize=8)
    title = "attention layer alone" if level == "layer" else "two pre-norm blocks (hidden 512)"
    figure.suptitle(
        f"{title}, batch 1, 8 heads x 64, 256 features; {device_name} "
        "(shaded line: out of budget from there)",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(png_path, dpi=80)
    plt.close(figure)


def cell(rows, level, model, mode, pass_, length, key, scale=1.0, digits=3):
    """A table cell: the value, or the status that stopped the model."""
    for row in rows:
        if (row["level"], row["model"], row["mode"], row["pass"], row["length"]) == (
            level, model, mode, pass_, length
        ):
            if row["status"] in ("ok", "over_time_cap") and row[key] is not None:
                return f"{row[key] * scale:.{digits}f}"
            return {"out_of_memory": "OOM", "timeout": "timeout"}.get(row["status"], "-")
    return ""


def markdown_tables(rows, level):
    """Median seconds per pass and peak RSS (GiB) of fwd+bwd, one row per L."""
    configs = [c for c in MODELS[level] if any((r["level"], r["model"], r["mode"]) == (level,) + c for r in rows)]
    names = [
        model if model == "identity" else f"{model} {'bi' if mode == 'bidirectional' else mode}"
        for model, mode in configs
    ]
    lengths = sorted({r["length"] for r in rows if r["level"] == level})
    header = ["L"] + [f"{n}, fwd s" for n in names] + [f"{n}, fwd+bwd s" for n in names] + [
        f"{n}, fwd+bwd peak GiB" for n in names
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for length in lengths:
        values = [str(length)]
        for pass_ in PASSES:
            values += [cell(rows, level, *c, pass_, length, "median_s") for c in configs]
        values += [
            cell(rows, level, *c, "forward_backward", length, "peak_rss_mib", 1 / 1024, 2)
            for c in configs
        ]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def report(csv_path, device_name):
    rows = read_rows(csv_path)
    stem = csv_path[: -len(".csv")]
    for level in sorted({row["level"] for row in rows}):
        plot(rows, level, f"{stem}_{level}.png", device_name)
    with open(f"{stem}_tables.md", "w") as file:
        for level in sorted({row["level"] for row in rows}):
            file.write(f"### {level}\n\n{markdown_tables(rows, level)}\n\n")
    lines = summary(rows)
    with open(f"{stem}_summary.txt", "w") as file:
        file.write("\n".join(lines) + "\n")
    print("\n".join(lines))


# --------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", nargs="+", choices=LEVELS, default=list(LEVELS))
    parser.add_argument("--models", nargs="+", choices=("favor", "exact", "identity"), help="default: all")
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs at most")
    parser.add_argument("--min-repeats", type=int, default=3, help="timed runs at least")
    parser.add_argument(
        "--budget-s", type=float, default=20.0,
        help="stop timing once --min-repeats runs used this many seconds",
    )
    parser.add_argument("--time-cap-s", type=float, default=60.0, help="median step time cap")
    parser.add_argument("--memory-cap-gb", type=float, default=10.0, help="resident memory cap")
    parser.add_argument(
        "--reserve-gb", type=float, default=2.0,
        help="kill a worker when the machine has less memory available",
    )
    parser.add_argument("--timeout-s", type=float, default=900.0, help="hard cap per process")
    parser.add_argument("--chunk-size", type=int, help="FavorAttention chunk_size (default: the layer's)")
    parser.add_argument("--jit", action="store_true", help="compile the steps with XLA")
    parser.add_argument("--output-dir", default=common.RESULTS_DIR)
    parser.add_argument("--plot-only", action="store_true", help="redraw plots and summary from the CSV")
    parser.add_argument("--fresh", action="store_true", help="discard the CSV's earlier rows")
    parser.add_argument("--in-process", action="store_true", help="no subprocesses (smoke tests only)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--level", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--pass", dest="pass_", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main():
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    environment = common.describe() if args.in_process else common.environment()
    device = "gpu" if environment["gpu"] else "cpu"
    device_name = environment["gpu"] or environment["cpu"]
    os.makedirs(args.output_dir, exist_ok=True)
    csv_path = os.path.join(args.output_dir, f"speed_memory_{device}.csv")
    if not args.plot_only:
        common.write_environment(csv_path, environment, vars(args))
        sweep(args, device, csv_path)
    report(csv_path, device_name)


if __name__ == "__main__":
    main()
