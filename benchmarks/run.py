"""Runs named benchmark configurations, per commit, and compares two commits.

The configurations are those of `benchmarks/registry.py` (`--list` shows
them). Each measurement runs in a worker process of its own, with
keras_favor imported from the source under measurement; the harness (this
folder) is the checkout's for every revision.

    python -m benchmarks.run --list
    python -m benchmarks.run --configs favor_train_step_causal_8192
    python -m benchmarks.run --quick                  # the speed-and-memory set
    python -m benchmarks.run --compare ab2d3d6 HEAD --quick      # < 5 minutes
    python -m benchmarks.run --compare ab2d3d6 HEAD              # 5 rounds
    python -m benchmarks.run --compare ab2d3d6 worktree --configs \\
        recompute_custom_gradient_vs_remat
    python -m benchmarks.run --show ab2d3d6 HEAD      # stored results

`--configs` takes names and group names (`speed_memory_unchanged`,
`short_sequences`, `recompute_custom_gradient_vs_remat`). Without
`--compare` the working tree is measured (or `--revision REV`) and the
results go to `benchmarks/results/commits/<commit>.json` (`<commit>-dirty`
when keras_favor has uncommitted changes). `--compare A B` unpacks each
revision's `keras_favor/` (`git archive`) in a temporary folder (`worktree`
names the working tree) and runs the two alternately, configuration by
configuration, A, B, A, B, ... for `--rounds` rounds, so that the machine's
load falls on both alike; it appends both to their commit files and writes
the table to `benchmarks/results/comparisons/<A>_vs_<B>.md`.

A configuration's figure is the median over the rounds of each round's
figure (a worker's median step, or its peak memory); the range is the
rounds' lowest and highest. In a comparison, each round's B / A ratio is of
two neighbouring runs. The verdict says "B higher" or "B lower" only when
every round's ratio lies more than 2 % on the same side of 1 and the ratio
of the medians differs from 1 by more than either revision's rounds differ
among themselves ((max - min) / median); otherwise "within noise". A
comparison of a commit with itself shows the noise of the machine: under
load, two rounds of it have read 0.81x and 1.09x.
"""

import argparse
import contextlib
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import common
from benchmarks import registry

TOLERANCE = 0.02  # relative, added to the rounds' range in a verdict
WORKTREE = "worktree"
QUICK_REPEATS = 3  # timed steps per run at most, with --quick


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    add = parser.add_argument
    add(
        "--configs",
        nargs="+",
        help="configuration or group names (default: every "
        "configuration but the tiny one; with --quick, the quick set)",
    )
    add(
        "--quick",
        action="store_true",
        help="the quick set (unless --configs), 2 rounds and at most 3 timed steps per run",
    )
    add(
        "--compare",
        nargs=2,
        metavar=("REV_A", "REV_B"),
        help="measure two revisions alternately (`worktree`: the working tree)",
    )
    add(
        "--show",
        nargs=2,
        metavar=("REV_A", "REV_B"),
        help="print stored results side by side",
    )
    add(
        "--revision",
        default=WORKTREE,
        help="the revision measured without --compare",
    )
    add(
        "--rounds",
        type=int,
        help="runs of each configuration per revision (5; --quick: 2)",
    )
    add(
        "--repeats",
        type=int,
        help="timed steps per run (default: the configuration's)",
    )
    add(
        "--list", action="store_true", help="list the configurations and groups"
    )
    add("--output-dir", default=common.RESULTS_DIR)
    add(
        "--memory-cap-gb",
        type=float,
        default=16.0,
        help="kill a worker above this memory",
    )
    add(
        "--reserve-gb",
        type=float,
        default=1.0,
        help="kill a worker when the machine has less memory available",
    )
    add("--timeout-s", type=float, default=900.0, help="hard cap per worker")
    add("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    return args


# --------------------------------------------------------------- revisions --


def revision_label(revision):
    """The short commit of `revision`, or for `worktree` the checked-out
    commit with `-dirty` when keras_favor has uncommitted changes."""
    if revision == WORKTREE:
        dirty = common.git("status", "--porcelain", "--", "keras_favor")
        return common.git("rev-parse", "--short", "HEAD", check=True) + (
            "-dirty" if dirty else ""
        )
    try:
        return common.git(
            "rev-parse", "--short", f"{revision}^{{commit}}", check=True
        )
    except subprocess.CalledProcessError:
        raise ValueError(
            f"{revision!r} is not a commit of this repository."
        ) from None


@contextlib.contextmanager
def keras_favor_source(revision):
    """A folder holding `revision`'s `keras_favor/` (the working tree's for
    `worktree`): the directory a worker runs in."""
    if revision == WORKTREE:
        yield common.REPOSITORY_DIR
        return
    folder = tempfile.mkdtemp(prefix=f"keras_favor_{revision_label(revision)}_")
    try:
        archive = subprocess.run(
            ["git", "archive", revision, "keras_favor"],
            cwd=common.REPOSITORY_DIR,
            capture_output=True,
            check=True,
        )
        subprocess.run(
            ["tar", "-x", "-C", folder], input=archive.stdout, check=True
        )
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------- running --


def worker(name, parameters):
    """Runs one configuration in this process; prints `RESULT <json>`."""
    import keras_favor

    result = registry.get(name).function(**json.loads(parameters))
    result["keras_favor_dir"] = os.path.dirname(
        os.path.dirname(os.path.realpath(keras_favor.__file__))
    )
    print("RESULT " + json.dumps(result), flush=True)


def run_once(name, source, args):
    """One worker run of configuration `name` on the keras_favor in `source`."""
    configuration = registry.get(name)
    parameters = dict(configuration.parameters)
    if args.repeats:
        parameters["repeats"] = args.repeats
    elif args.quick:
        parameters["repeats"] = min(QUICK_REPEATS, parameters["repeats"])
    load = os.getloadavg()[0]
    started = time.perf_counter()
    result = common.run_worker(
        common.module_command("run", "--worker", name, json.dumps(parameters)),
        common.worker_env(TF_CPP_MIN_LOG_LEVEL="2"),
        args,
        cwd=source,
    )
    result.update(
        load_average=round(load, 2),
        wall_s=round(time.perf_counter() - started, 1),
    )
    found = result.get("keras_favor_dir")
    if found and found != os.path.realpath(source):
        result.update(
            status="error",
            note=f"measured the keras_favor of {found}, not {source}",
        )
    return result


def run_alternately(sources, names, args):
    """`[{name: [result per round]} per source]`: in each round each
    configuration runs once on each source folder, in the order of `sources`."""
    results = [{name: [] for name in names} for _ in sources]
    for round_ in range(args.rounds):
        for name in names:
            for index, (label, folder) in enumerate(sources):
                result = run_once(name, folder, args)
                results[index][name].append(result)
                print(
                    f"round {round_ + 1}/{args.rounds} {name} @ {label}: {result['status']}, "
                    f"median {result.get('median_s', '-')} s, peak "
                    f"{result.get('peak_rss_mib', '-')} MiB, load {result['load_average']}, "
                    f"{result['wall_s']} s",
                    flush=True,
                )
    return results


def summarize(name, rounds):
    """A configuration's figures over its rounds (see the module's docstring)."""
    configuration = registry.get(name)
    ok = [r for r in rounds if r.get("status") == "ok"]
    summary = {
        "description": configuration.description,
        "metric": configuration.metric,
        "parameters": configuration.parameters,
        "rounds": len(rounds),
        "status": "ok"
        if len(ok) == len(rounds)
        else f"{len(ok)} of {len(rounds)} rounds ok",
        "load_average": [r["load_average"] for r in rounds],
        "notes": sorted({r["note"] for r in rounds if r.get("note")}),
    }
    for field in ("median_s", "peak_rss_mib", "baseline_rss_mib"):
        values = [r[field] for r in ok if r.get(field) is not None]
        if values:
            summary[field] = round(statistics.median(values), 5)
            summary[f"rounds_{field}"] = values
    if ok:
        summary.update(
            min_s=min(r["min_s"] for r in ok),
            max_s=max(r["max_s"] for r in ok),
            timed_steps=sum(r["timed_runs"] for r in ok),
        )
    return summary


# ----------------------------------------------------------------- storing --


def commit_path(output_dir, label):
    return os.path.join(output_dir, "commits", f"{label}.json")


def append_run(output_dir, label, run):
    """Adds `run` to `commits/<label>.json` (made if missing)."""
    path = commit_path(output_dir, label)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    stored = {"commit": label, "runs": []}
    if os.path.exists(path):
        with open(path) as file:
            stored = json.load(file)
    stored["runs"].append(run)
    with open(path, "w") as file:
        file.write(json.dumps(stored, indent=1) + "\n")
    return path


def latest(output_dir, label, name):
    """The newest stored run of `label` that measured `name`: `(run, summary)`."""
    path = commit_path(output_dir, label)
    if not os.path.exists(path):
        raise ValueError(
            f"No results for {label}: {path} does not exist "
            "(run `python -m benchmarks.run` there first)."
        )
    with open(path) as file:
        runs = json.load(file)["runs"]
    for run in reversed(runs):
        if name in run["configurations"]:
            return run, run["configurations"][name]
    return None, None


# ---------------------------------------------------------------- printing --


def formatted(metric, value):
    if value is None:
        return "-"
    return f"{value:.4g} s" if metric == "median_s" else f"{value:.0f} MiB"


def with_range(summary, metric):
    values = summary.get(f"rounds_{metric}") if summary else None
    if not values:
        return summary["status"] if summary else "not measured"
    spread = f" ({formatted(metric, min(values))} - {formatted(metric, max(values))})"
    return formatted(metric, summary[metric]) + (
        spread if len(values) > 1 else ""
    )


def relative_range(values):
    """`(max - min) / median` of one revision's rounds: its own noise."""
    return (max(values) - min(values)) / statistics.median(values)


def verdict(ratio, ratios, values_a, values_b):
    """Whether B differs from A beyond noise: only when every round's B / A
    ratio lies more than `TOLERANCE` on one side of 1 and the ratio of the
    medians differs from 1 by more than either revision's rounds differ
    among themselves (`relative_range`)."""
    low, high = min(ratios), max(ratios)
    noise = max(TOLERANCE, relative_range(values_a), relative_range(values_b))
    if low - TOLERANCE <= 1 <= high + TOLERANCE or abs(ratio - 1) <= noise:
        return "within noise"
    return "B lower" if high < 1 else "B higher"


def comparison_rows(pairs, paired, metric=None):
    """Table rows for `(name, summary_a, summary_b)` triples; `paired`: whether
    round i of A and of B ran one after the other (their ratios then judge).
    `metric`: the field compared (by default each configuration's)."""
    rows = []
    for name, a, b in pairs:
        field = metric or registry.get(name).metric
        values = [(s or {}).get(f"rounds_{field}") or [] for s in (a, b)]
        if not all(values):
            rows.append(
                [
                    name,
                    field,
                    with_range(a, field),
                    with_range(b, field),
                    "-",
                    "-",
                ]
            )
            continue
        if paired and len(values[0]) == len(values[1]):
            ratios = [vb / va for va, vb in zip(*values)]
        else:  # ranges of unpaired runs: every B against every A
            ratios = [vb / va for va in values[0] for vb in values[1]]
        ratio = b[field] / a[field]
        rows.append(
            [
                name,
                field,
                with_range(a, field),
                with_range(b, field),
                f"{ratio:.3f}x ({min(ratios):.3f}-{max(ratios):.3f})",
                verdict(ratio, ratios, *values),
            ]
        )
    return rows


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + [
        "| " + " | ".join(str(cell) for cell in row) + " |" for row in rows
    ]


def table(label_a, label_b, pairs, paired, metric=None):
    headers = [
        "configuration",
        "metric",
        f"A: {label_a}",
        f"B: {label_b}",
        "B / A (rounds)",
        "verdict",
    ]
    return markdown_table(headers, comparison_rows(pairs, paired, metric))


def tables(label_a, label_b, pairs, paired):
    """The table of each configuration's own metric, then, where that is a
    time, the table of the same runs' peak memory."""
    timed = [
        pair for pair in pairs if registry.get(pair[0]).metric != "peak_rss_mib"
    ]
    lines = table(label_a, label_b, pairs, paired)
    if timed:
        lines += ["", "Peak resident memory of the timed runs:", ""] + table(
            label_a, label_b, timed, paired, "peak_rss_mib"
        )
    return lines


def environment_line(environment):
    return (
        f"{environment['date_utc']}, {environment['cpu']} ({environment['cores']} cores), "
        f"GPU {environment['gpu']}, backend {environment['backend']}, keras "
        f"{environment['keras']}, "
        + ", ".join(
            f"{k} {environment[k]}"
            for k in ("tensorflow", "jax")
            if k in environment
        )
    )


# -------------------------------------------------------------------- main --


def selected_names(args):
    if args.configs:
        return registry.expand(args.configs)
    if args.quick:
        return registry.quick_names()
    return [name for name in registry.names() if not name.startswith("tiny_")]


def measure(args, revisions):
    """Runs the selected configurations on `revisions` alternately and stores
    each revision's run (a revision compared with itself: two runs).

    Returns:
        `(labels, summaries, environment)`: the revisions' short commits, for
        each revision `{name: summary}`, and the machine.
    """
    names = selected_names(args)
    labels = [revision_label(revision) for revision in revisions]
    environment = common.environment()
    environment.pop("keras_favor_commit", None)
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    with contextlib.ExitStack() as stack:
        sources = [
            (label, stack.enter_context(keras_favor_source(revision)))
            for label, revision in zip(labels, revisions)
        ]
        results = run_alternately(sources, names, args)
    summaries = [
        {name: summarize(name, rounds) for name, rounds in by_name.items()}
        for by_name in results
    ]
    for index, label in enumerate(labels):
        run = {
            "run_id": started,
            "environment": environment,
            "load_average_after": os.getloadavg(),
            "rounds": args.rounds,
            "alternated_with": labels[1 - index] if len(labels) == 2 else None,
            "quick": args.quick,
            "configurations": summaries[index],
        }
        print("wrote", append_run(args.output_dir, label, run))
    return labels, summaries, environment


def print_pairs(summaries):
    """The registry's pairs measured in one run, side by side."""
    pairs = [
        (b, summaries[a], summaries[b])
        for a, b in registry.PAIRS
        if a in summaries and b in summaries
    ]
    if pairs:
        print(
            "\nPairs: A = the pair's first configuration, B = its second (named)\n"
        )
        print("\n".join(tables("first", "second", pairs, paired=True)))


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return
    if args.list:
        for name in registry.names():
            configuration = registry.get(name)
            quick = " [quick]" if configuration.quick else ""
            print(f"{name}{quick}: {configuration.description}")
        for group, members in registry.GROUPS.items():
            print(f"group {group}: {' '.join(members)}")
        return
    if args.show:
        labels = [revision_label(revision) for revision in args.show]
        names = (
            registry.expand(args.configs) if args.configs else registry.names()
        )
        pairs, paired = [], True
        for name in names:
            (run_a, a), (run_b, b) = (
                latest(args.output_dir, label, name) for label in labels
            )
            if a or b:
                pairs.append((name, a, b))
                paired = (
                    paired
                    and run_a is not None
                    and run_b is not None
                    and (run_a["run_id"] == run_b["run_id"])
                )
        print("\n".join(tables(*labels, pairs, paired)))
        return
    if args.compare:
        labels, summaries, environment = measure(args, args.compare)
        pairs = [
            (name, summaries[0][name], summaries[1][name])
            for name in summaries[0]
        ]
        lines = [
            f"# {labels[0]} (A) against {labels[1]} (B)",
            "",
            environment_line(environment)
            + f"; {args.rounds} rounds, alternating A, B; "
            f"load average before: {[round(x, 2) for x in environment['load_average']]}, after: "
            f"{[round(x, 2) for x in os.getloadavg()]}",
            "",
        ] + tables(*labels, pairs, True)
        path = os.path.join(
            args.output_dir, "comparisons", f"{labels[0]}_vs_{labels[1]}.md"
        )
        os.makedirs(os.path.dirname(path), exist_ok=True)
        common.write_lines(path, lines)
        return
    [label], [summaries], _ = measure(args, [args.revision])
    rows = [
        [
            name,
            registry.get(name).metric,
            with_range(summary, registry.get(name).metric),
            summary["status"],
        ]
        for name, summary in summaries.items()
    ]
    print(
        "\n".join(
            markdown_table(["configuration", "metric", label, "status"], rows)
        )
    )
    print_pairs(summaries)


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        sys.exit(f"error: {error}")
