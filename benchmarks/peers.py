"""keras_favor's FavorAttention beside other attention implementations, across lengths.

One self-attention layer, batch 1, 8 heads of 64 channels (model width 512),
256 random features, float32 on the CPU, timed forward and forward +
backward (the gradients of the layer's weights), bidirectional and causal
where the implementation has a causal form:

- `keras_favor`: `FavorAttention` (FAVOR+, `feature_map="softmax"`), and
  `keras_favor_plusplus` (`feature_map="favor++"`, bidirectional), in a
  `tf.function` on TensorFlow.
- `performer_pytorch`: performer-pytorch's `SelfAttention` (same heads,
  head size and features), eager PyTorch. Its causal form on a CPU is its
  own non-CUDA path (prefix sums of per-position key-value products).
- `kernel_attention_exp`, `kernel_attention_expplus`: TF Model Garden's
  `KernelAttention` (tf-keras) with `feature_transform="exp"` (FAVOR+) and
  `"expplus"` (FAVOR++, bidirectional only), in a `tf.function`. Its causal
  form is `use_causal_windowed=True` with chunks of one position and a
  window of all of them, which is exact causal linear attention.
- `keras_mha`: exact attention, `keras.layers.MultiHeadAttention`, in a
  `tf.function`.
- `torch_sdpa`: exact attention with PyTorch's fused
  `torch.nn.functional.scaled_dot_product_attention` between the same four
  dense projections, eager PyTorch.

Each (implementation, mode, pass, length) runs in a worker process of its
own, with `--threads` threads for every framework (TensorFlow intra- and
inter-op, PyTorch intra- and inter-op, and `OMP_NUM_THREADS`); TensorFlow
runs with `TF_ENABLE_ONEDNN_OPTS=0` unless the environment sets it. Within
each length the implementations alternate (in the opposite order in every
other round), so drift in the machine's load reaches all of them. A worker
makes the input, builds the layer, calls the step once (tracing), warms up
once (below L = 16384), then times it; it reports the median, min and max
seconds and its peak resident memory (`ru_maxrss`), beside its baseline
(after the imports and the input). `peers_runs.csv` has one row per round;
`peers.csv` the median over rounds of the per-round medians (`--append` adds
rounds to an earlier run's). A watchdog
kills a worker over `--memory-cap-gb` or `--timeout-s`; a configuration
whose step took over `--time-cap-s`, or would take longer at the next
length (its median scaled by the length ratio, squared for exact
attention), is not run at longer lengths. Implementations whose packages
are absent get `not_installed` rows.

Install the implementations beside keras_favor in a virtual environment of
their own (tf-models-official pins another TensorFlow, so it comes without
its dependencies; the extra lists the few its kernel attention imports):

    python3 -m venv ../peers-venv
    ../peers-venv/bin/pip install -e ".[peers]"
    ../peers-venv/bin/pip install --no-deps tf-models-official==2.20.0

    ../peers-venv/bin/python -m benchmarks.peers          # the full sweep
    ../peers-venv/bin/python -m benchmarks.peers --lengths 1024 4096 \\
        --implementations keras_favor performer_pytorch --rounds 1
    ../peers-venv/bin/python -m benchmarks.peers --plot-only
"""

import argparse
import csv
import importlib.metadata
import importlib.util
import json
import os
import statistics

from benchmarks import common

NUM_HEADS, KEY_DIM, NUM_FEATURES = 8, 64, 256
HIDDEN = NUM_HEADS * KEY_DIM
MODES, PASSES = ("bidirectional", "causal"), ("forward", "forward_backward")
LENGTHS = [512, 1024, 2048, 4096, 8192, 16384, 65536]

# name: (framework, modes, time growth with L, modules needed, label, linear)
IMPLEMENTATIONS = {
    "keras_favor": (
        "keras",
        MODES,
        1,
        ("keras_favor",),
        "keras_favor FAVOR+",
        True,
    ),
    "keras_favor_plusplus": (
        "keras",
        ("bidirectional",),
        1,
        ("keras_favor",),
        "keras_favor FAVOR++",
        True,
    ),
    "performer_pytorch": (
        "torch",
        MODES,
        1,
        ("torch", "performer_pytorch"),
        "performer-pytorch SelfAttention",
        True,
    ),
    "kernel_attention_exp": (
        "tf_keras",
        MODES,
        1,
        ("tf_keras", "official"),
        "Model Garden KernelAttention exp",
        True,
    ),
    "kernel_attention_expplus": (
        "tf_keras",
        ("bidirectional",),
        1,
        ("tf_keras", "official"),
        "Model Garden KernelAttention expplus",
        True,
    ),
    "keras_mha": (
        "keras",
        MODES,
        2,
        ("keras",),
        "Keras MultiHeadAttention (exact)",
        False,
    ),
    "torch_sdpa": (
        "torch",
        MODES,
        2,
        ("torch",),
        "PyTorch scaled_dot_product_attention (exact)",
        False,
    ),
}
# The distributions whose versions the environment records.
DISTRIBUTIONS = (
    "torch",
    "performer-pytorch",
    "tf-models-official",
    "tf-keras",
    "tensorflow",
    "keras",
    "einops",
)
CONFIGURATION = ("implementation", "mode", "pass", "length")
RUN_FIELDS = CONFIGURATION + (
    "round",
    "framework",
    "status",
    "median_s",
    "min_s",
    "max_s",
    "timed_runs",
    "first_call_s",
    "baseline_rss_mib",
    "peak_rss_mib",
    "threads",
    "load_average",
    "keras_favor_commit",
    "note",
)
FIELDS = CONFIGURATION + (
    "framework",
    "status",
    "median_s",
    "min_s",
    "max_s",
    "rounds",
    "timed_runs",
    "baseline_rss_mib",
    "peak_rss_mib",
    "threads",
    "load_average",
    "keras_favor_commit",
    "note",
)
MEASURED = ("ok", "over_time_cap")
OUT_OF_BUDGET = ("over_time_cap", "out_of_memory", "timeout")


def missing_modules(implementation):
    """The modules `implementation` needs that this environment lacks."""
    return [
        name
        for name in IMPLEMENTATIONS[implementation][3]
        if importlib.util.find_spec(name) is None
    ]


def versions():
    """`{distribution: version}` of `DISTRIBUTIONS`, "not installed" for the absent."""
    found = {}
    for name in DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def random_inputs(length, seed=0):
    """The `(1, length, HIDDEN)` float32 NumPy input every implementation gets."""
    import numpy

    values = numpy.random.default_rng(seed).standard_normal((1, length, HIDDEN))
    return values.astype(numpy.float32)


def tensorflow_step(layer_call, variables, pass_):
    """A `tf.function` of `x`: the sum of `layer_call(x)` (`"forward"`), or of
    its gradients with respect to `variables` (`"forward_backward"`)."""
    import tensorflow as tf

    def step(x):
        if pass_ == "forward":
            return tf.reduce_sum(layer_call(x))
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer_call(x))
        return tf.add_n(
            [tf.reduce_sum(g) for g in tape.gradient(loss, variables)]
        )

    return tf.function(step)


def keras_step(implementation, causal, length, pass_):
    """`(step, x)` of a Keras 3 layer on TensorFlow: FavorAttention or
    MultiHeadAttention."""
    import keras
    import tensorflow as tf

    import keras_favor

    shape = (1, length, HIDDEN)
    if implementation == "keras_mha":
        layer = keras.layers.MultiHeadAttention(NUM_HEADS, KEY_DIM)
    else:
        feature_map = (
            "favor++" if implementation == "keras_favor_plusplus" else "softmax"
        )
        layer = keras_favor.FavorAttention(
            NUM_HEADS,
            KEY_DIM,
            num_features=NUM_FEATURES,
            feature_map=feature_map,
            seed=0,
        )
    layer.build(shape, shape)
    step = tensorflow_step(
        lambda x: layer(x, x, use_causal_mask=causal),
        layer.trainable_variables,
        pass_,
    )
    return step, tf.constant(random_inputs(length))


def kernel_attention_step(implementation, causal, length, pass_):
    """`(step, x)` of Model Garden's KernelAttention (tf-keras)."""
    import tensorflow as tf
    from official.nlp.modeling.layers.kernel_attention import KernelAttention

    transform = implementation.rsplit("_", 1)[1]
    options = (
        dict(
            use_causal_windowed=True,
            causal_chunk_length=1,
            causal_window_length=length,
        )
        if causal
        else {}
    )
    layer = KernelAttention(
        num_heads=NUM_HEADS,
        key_dim=KEY_DIM,
        feature_transform=transform,
        num_random_features=NUM_FEATURES,
        seed=0,
        **options,
    )
    x = tf.constant(random_inputs(length))
    layer(x[:, :8], x[:, :8])  # builds the weights
    step = tensorflow_step(
        lambda x: layer(x, x), layer.trainable_variables, pass_
    )
    return step, x


def torch_step(implementation, causal, length, pass_):
    """`(step, x)` of an eager PyTorch module: performer-pytorch's
    SelfAttention, or `scaled_dot_product_attention` between dense projections.
    The step returns a Python float, so it waits for the whole computation."""
    import torch

    torch.manual_seed(0)
    if implementation == "performer_pytorch":
        from performer_pytorch import SelfAttention

        module = SelfAttention(
            dim=HIDDEN,
            heads=NUM_HEADS,
            dim_head=KEY_DIM,
            nb_features=NUM_FEATURES,
            causal=causal,
        )
    else:
        module = ExactTorchAttention(causal)
    x = torch.from_numpy(random_inputs(length))
    parameters = list(module.parameters())

    def step(x):
        if pass_ == "forward":
            with torch.no_grad():
                return module(x).sum().item()
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()
        return sum(p.grad.sum() for p in parameters).item()

    return step, x


def ExactTorchAttention(causal):
    """A PyTorch module: query, key, value and output projections of width
    `HIDDEN` around `scaled_dot_product_attention` with `NUM_HEADS` heads."""
    import torch

    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value, self.output = (
                torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(4)
            )

        def forward(self, x):
            def heads(t):
                return t.unflatten(-1, (NUM_HEADS, KEY_DIM)).transpose(1, 2)

            mixed = torch.nn.functional.scaled_dot_product_attention(
                heads(self.query(x)),
                heads(self.key(x)),
                heads(self.value(x)),
                is_causal=causal,
            )
            return self.output(mixed.transpose(1, 2).flatten(-2))

    return Module()


def set_threads(framework, threads):
    """Gives the framework `threads` intra-op and inter-op threads."""
    if framework == "torch":
        import torch

        torch.set_num_threads(threads)
        torch.set_num_interop_threads(threads)
    else:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def measure(job):
    """Times one configuration in this process and returns its CSV columns."""
    framework = IMPLEMENTATIONS[job["implementation"]][0]
    set_threads(framework, job["threads"])
    build = {
        "keras": keras_step,
        "tf_keras": kernel_attention_step,
        "torch": torch_step,
    }[framework]
    step, x = build(
        job["implementation"],
        job["mode"] == "causal",
        job["length"],
        job["pass"],
    )
    result = {"baseline_rss_mib": round(common.peak_rss_mib(), 1)}
    try:
        first, times = common.time_calls(
            step,
            [x],
            job["repeats"],
            warmup=1 if job["length"] < 16384 else 0,
            budget_s=job["budget_s"],
            min_repeats=min(job["min_repeats"], job["repeats"]),
        )
    except Exception as error:
        text = getattr(error, "message", None) or str(error)
        if not any(
            word in type(error).__name__ + text
            for word in (
                "ResourceExhausted",
                "RESOURCE_EXHAUSTED",
                "OutOfMemory",
                "not enough memory",
                "Cannot allocate",
                "bad_alloc",
            )
        ):
            raise
        result.update(
            status="out_of_memory", note=text.strip().splitlines()[0][:120]
        )
    else:
        result.update(common.timing_fields(times, first, job["time_cap_s"]))
    result["peak_rss_mib"] = round(common.peak_rss_mib(), 1)
    return result


def run_isolated(args, configuration):
    """Runs one configuration in a worker process: its result, or what stopped it.

    A watchdog kills the worker when its resident memory passes
    `--memory-cap-gb`, when the machine has less than `--reserve-gb` left
    (status `machine_busy`), or after `--timeout-s`; an address-space limit
    backs it up.
    """
    job = dict(configuration, **vars(args))
    limit = int((2 * args.memory_cap_gb + 8) * 2**30)
    threads = str(args.threads)
    # OpenMP threads that wait for work by sleeping, not spinning: on a machine
    # shared with other processes spinning made PyTorch's steps up to 50x slower.
    env = common.worker_env(
        TF_CPP_MIN_LOG_LEVEL="2",
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        OMP_WAIT_POLICY="PASSIVE",
    )
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    if IMPLEMENTATIONS[configuration["implementation"]][0] == "tf_keras":
        env["TF_USE_LEGACY_KERAS"] = (
            "1"  # Model Garden's layers are tf-keras (Keras 2)
        )
    return common.run_worker(
        common.module_command("peers", "--worker", json.dumps(job)),
        env,
        args,
        limit,
    )


def configurations(args):
    """The selected `(implementation, mode, pass)` triples the implementation has."""
    return [
        (name, mode, pass_)
        for name in args.implementations
        for mode in args.modes
        for pass_ in args.passes
        if mode in IMPLEMENTATIONS[name][1]
    ]


def skip_reason(args, stops, measured_at, name, mode, pass_, length):
    """Why `(name, mode, pass_)` is not run at `length`, or None."""
    key = (name, mode, pass_)
    if length >= stops.get(key, float("inf")):
        return f"out of budget from L={stops[key]}"
    if key in measured_at:
        previous, seconds = measured_at[key]
        estimate = seconds * (length / previous) ** IMPLEMENTATIONS[name][2]
        if estimate > args.time_cap_s:
            return (
                f"estimated {estimate:.0f} s a step (from L={previous}), over the "
                f"{args.time_cap_s:.0f} s cap"
            )
    return None


def record(row, stops, measured_at):
    """Notes a run's result: the length it went out of budget at, or the longest
    length it was measured at and its median."""
    key, length = (
        (row["implementation"], row["mode"], row["pass"]),
        int(row["length"]),
    )
    if row["status"] in OUT_OF_BUDGET:
        stops[key] = min(length, stops.get(key, length))
    elif row["status"] == "ok":
        measured_at[key] = max(
            measured_at.get(key, (0, 0)), (length, float(row["median_s"]))
        )


def sweep(args, runs_path):
    """Runs every round: lengths in order, implementations alternating within
    each length. Returns the per-round rows (also written to `runs_path`);
    with `--append`, after the rows already there, numbering its rounds on
    from theirs and not running what they found out of budget."""
    chosen = configurations(args)
    rows, stops, measured_at = [], {}, {}
    if args.append and os.path.exists(runs_path):
        with open(runs_path, newline="") as file:
            rows = list(csv.DictReader(file))
        for row in rows:
            record(row, stops, measured_at)
    first = max((int(row["round"]) for row in rows), default=0) + 1
    commit = common.git_commit()
    for round_ in range(first, first + args.rounds):
        for length in sorted(args.lengths):
            order = chosen if round_ % 2 else chosen[::-1]
            for name, mode, pass_ in order:
                row = {
                    "implementation": name,
                    "mode": mode,
                    "pass": pass_,
                    "length": length,
                    "round": round_,
                    "framework": IMPLEMENTATIONS[name][0],
                    "threads": args.threads,
                    "load_average": round(os.getloadavg()[0], 2),
                    "keras_favor_commit": commit,
                }
                missing = missing_modules(name)
                reason = skip_reason(
                    args, stops, measured_at, name, mode, pass_, length
                )
                if missing:
                    row.update(
                        status="not_installed",
                        note="missing "
                        + ", ".join(missing)
                        + ': pip install -e ".[peers]"'
                        + (
                            " and --no-deps tf-models-official"
                            if "official" in missing
                            else ""
                        ),
                    )
                elif reason:
                    row.update(status="skipped", note=reason)
                else:
                    row.update(run_isolated(args, row))
                    record(row, stops, measured_at)
                print(
                    f"round {round_} {name} {mode} {pass_} L={length}: {row['status']}, median "
                    f"{row.get('median_s', '-')} s, peak {row.get('peak_rss_mib', '-')} MiB"
                    + (f" ({row['note']})" if row.get("note") else ""),
                    flush=True,
                )
                rows.append(row)
                common.write_csv(runs_path, RUN_FIELDS, rows)
    return rows


def combine(runs):
    """One row per configuration: the median over rounds of the measured
    rounds' medians, their min and max, and the largest peak; a configuration
    measured in no round keeps its first round's status and note."""
    groups = {}
    for row in runs:
        groups.setdefault(
            tuple(str(row[name]) for name in CONFIGURATION), []
        ).append(row)
    combined = []
    for group in groups.values():
        done = [
            r
            for r in group
            if r["status"] in MEASURED and r.get("median_s") not in ("", None)
        ]
        row = dict(group[0] if not done else done[0])
        if done:
            medians = [float(r["median_s"]) for r in done]
            row.update(
                median_s=round(statistics.median(medians), 5),
                min_s=round(min(float(r["min_s"]) for r in done), 5),
                max_s=round(max(float(r["max_s"]) for r in done), 5),
                timed_runs=sum(int(r["timed_runs"]) for r in done),
                status="ok"
                if any(r["status"] == "ok" for r in done)
                else "over_time_cap",
                note="; ".join(
                    sorted({r["note"] for r in group if r.get("note")})
                ),
            )
            for name in ("baseline_rss_mib", "peak_rss_mib"):
                row[name] = max(float(r[name]) for r in done)
            row["load_average"] = round(
                statistics.mean(float(r["load_average"]) for r in done), 2
            )
        row["rounds"] = len(done)
        combined.append(row)

    def order(r):
        return (
            list(IMPLEMENTATIONS).index(r["implementation"]),
            MODES.index(r["mode"]),
            PASSES.index(r["pass"]),
            int(r["length"]),
        )

    return sorted(combined, key=order)


def read_rows(csv_path):
    """The CSV's rows, with lengths as ints and times and memory as floats (or None)."""
    with open(csv_path, newline="") as file:
        rows = list(csv.DictReader(file))
    for row in rows:
        row["length"] = int(row["length"])
        for name in (
            "median_s",
            "min_s",
            "max_s",
            "peak_rss_mib",
            "baseline_rss_mib",
        ):
            row[name] = (
                float(row[name]) if row.get(name) not in ("", None) else None
            )
    return rows


def measured(rows, name, mode, pass_, field="median_s"):
    """`{length: value}` of one configuration's measured rows."""
    return {
        r["length"]: r[field]
        for r in rows
        if r["status"] in MEASURED
        and r[field] is not None
        and (r["implementation"], r["mode"], r["pass"]) == (name, mode, pass_)
    }


def cell(rows, name, mode, pass_, length):
    """A table cell: seconds and the memory the step added, or the status."""
    for r in rows:
        if (r["implementation"], r["mode"], r["pass"], r["length"]) == (
            name,
            mode,
            pass_,
            length,
        ):
            if r["status"] in MEASURED and r["median_s"] is not None:
                added = r["peak_rss_mib"] - r["baseline_rss_mib"]
                return f"{r['median_s']:.3g} s, {added:.0f} MiB"
            if r["status"] == "skipped" and r["note"].startswith("estimated"):
                return f"not run (est. {r['note'].split()[1]} s)"
            return {
                "out_of_memory": "out of memory",
                "timeout": "over time limit",
                "skipped": "not run",
                "not_installed": "not installed",
            }.get(r["status"], r["status"])
    return ""


def table(rows):
    """Markdown tables, one per (mode, pass): implementations by length."""
    lengths = sorted({r["length"] for r in rows})
    lines = []
    for mode in MODES:
        for pass_ in PASSES:
            names = [
                n
                for n in IMPLEMENTATIONS
                if any(
                    (r["implementation"], r["mode"], r["pass"])
                    == (n, mode, pass_)
                    for r in rows
                )
            ]
            if not names:
                continue
            lines += [
                "",
                f"**{mode}, {pass_.replace('_', ' + ')}** (median seconds a step, "
                "and peak minus baseline resident memory)",
                "",
                "| implementation | "
                + " | ".join(f"L={n}" for n in lengths)
                + " |",
                "|---|" + "---|" * len(lengths),
            ]
            lines += [
                f"| {IMPLEMENTATIONS[n][4]} | "
                + " | ".join(
                    cell(rows, n, mode, pass_, length) for length in lengths
                )
                + " |"
                for n in names
            ]
    return lines[1:]


def targets(rows, from_length=1024, exact_from=2048):
    """The targets, one line per comparison and pass: keras_favor's FAVOR+
    against every other linear attention from `from_length` in both modes,
    and against PyTorch's fused exact attention causal from `exact_from`."""
    lines = []

    def compare(name, mode, pass_, start):
        ours, theirs = (
            measured(rows, n, mode, pass_) for n in ("keras_favor", name)
        )
        fastest = [
            measured(rows, n, mode, pass_, "min_s")
            for n in ("keras_favor", name)
        ]
        lengths = sorted(n for n in set(ours) & set(theirs) if n >= start)
        if not lengths:
            return
        missed = [n for n in lengths if ours[n] >= theirs[n]]
        ratios = ", ".join(
            f"{n}: {theirs[n] / ours[n]:.2f}x "
            f"(min {fastest[1][n] / fastest[0][n]:.2f}x)"
            for n in lengths
        )
        unmeasured = sorted(n for n in set(ours) - set(theirs) if n >= start)
        lines.append(
            f"{mode}, {pass_}: keras_favor vs {name} from L={start}: "
            f"{'met' if not missed else 'not met at L=' + ', '.join(map(str, missed))} "
            f"(their median time / keras_favor's, and of the fastest runs: {ratios})"
            + (
                f"; {name} not measured at L={', '.join(map(str, unmeasured))}"
                if unmeasured
                else ""
            )
        )

    for mode in MODES:
        for pass_ in PASSES:
            for name, spec in IMPLEMENTATIONS.items():
                if (
                    spec[5]
                    and not name.startswith("keras_favor")
                    and mode in spec[1]
                ):
                    compare(name, mode, pass_, from_length)
    for pass_ in PASSES:
        compare("torch_sdpa", "causal", pass_, exact_from)
    for pass_ in PASSES:
        pp, expplus = (
            measured(rows, n, "bidirectional", pass_)
            for n in ("keras_favor_plusplus", "kernel_attention_expplus")
        )
        common_lengths = sorted(set(pp) & set(expplus))
        if common_lengths:
            lines.append(
                f"bidirectional, {pass_}: kernel_attention_expplus / keras_favor_plusplus"
                " time: "
                + ", ".join(
                    f"{n}: {expplus[n] / pp[n]:.2f}x" for n in common_lengths
                )
            )
    return lines


def plot(rows, png_path, title):
    """Log-log time against L: one panel per (pass, mode), one line per
    implementation; a marker x at the last length run when a longer one was
    out of memory or time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 8.5), sharex=True)
    colors = dict(
        zip(
            IMPLEMENTATIONS,
            (
                "tab:blue",
                "tab:cyan",
                "tab:orange",
                "tab:green",
                "tab:olive",
                "tab:red",
                "tab:purple",
            ),
        )
    )
    for row_axes, pass_ in zip(axes, PASSES[::-1]):
        for axis, mode in zip(row_axes, MODES):
            for name, spec in IMPLEMENTATIONS.items():
                points = sorted(measured(rows, name, mode, pass_).items())
                if points:
                    axis.plot(
                        [n for n, _ in points],
                        [s for _, s in points],
                        "-" if spec[5] else "--",
                        color=colors[name],
                        marker="o",
                        markersize=3,
                        label=spec[4],
                    )
            axis.set_xscale("log", base=2)
            axis.set(
                yscale="log",
                xlabel="sequence length L (positions)",
                ylabel="seconds per step (median)",
                title=f"{mode}, {pass_.replace('_', ' + ')}",
            )
            axis.grid(True, which="both", alpha=0.3)
            axis.xaxis.set_tick_params(labelbottom=True)
    handles = {}
    for axis in axes.flat:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    figure.legend(
        handles.values(),
        handles.keys(),
        loc="lower center",
        ncol=3,
        fontsize=8,
        frameon=False,
    )
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.07, 1, 0.97))
    figure.savefig(png_path, dpi=130)
    plt.close(figure)


def parse_args(argv=None):
    return common.parse_args(
        __doc__,
        argv,
        implementations=list(IMPLEMENTATIONS),
        modes=list(MODES),
        passes=list(PASSES),
        lengths=LENGTHS,
        rounds=(2, "rounds over all configurations"),
        threads=(2, "threads for every framework"),
        repeats=(5, "timed runs at most"),
        min_repeats=(2, "timed runs at least"),
        budget_s=(
            3.0,
            "stop timing once --min-repeats runs used this many seconds",
        ),
        time_cap_s=(
            12.0,
            "median step time cap: not run at longer lengths past it",
        ),
        memory_cap_gb=(8.0, "resident memory cap per worker"),
        reserve_gb=(
            2.0,
            "kill a worker when the machine has less memory available",
        ),
        timeout_s=(150.0, "hard cap per worker process"),
        plot_only=(
            False,
            "redraw peers.csv, the plot, the table and the targets from "
            "peers_runs.csv",
        ),
        append=(
            False,
            "add rounds to the rows of peers_runs.csv already there",
        ),
        worker=("", argparse.SUPPRESS),
    )


def main():
    args = parse_args()
    if args.worker:
        print(
            "RESULT " + json.dumps(measure(json.loads(args.worker))), flush=True
        )
        return
    stem = os.path.join(args.output_dir, "peers")
    if not args.plot_only:
        environment = dict(
            common.environment(),
            versions=versions(),
            threads=args.threads,
            TF_ENABLE_ONEDNN_OPTS=os.environ.get("TF_ENABLE_ONEDNN_OPTS", "0"),
        )
        common.write_environment(
            stem + ".json", environment, vars(args), args.append
        )
        sweep(args, stem + "_runs.csv")
    # From the per-round rows, so that a partial run's rows can be drawn too.
    with open(stem + "_runs.csv", newline="") as file:
        common.write_csv(
            stem + ".csv", FIELDS, combine(list(csv.DictReader(file)))
        )
    rows = read_rows(stem + ".csv")
    with open(stem + ".json") as file:
        environment = json.load(file)["runs"][-1]["environment"]
    title = (
        f"one self-attention layer, batch 1, {NUM_HEADS} heads x {KEY_DIM}, {NUM_FEATURES} "
        f"features, float32; {environment['cpu']}, {environment['threads']} threads"
    )
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
    else:
        plot(rows, stem + ".png", title)
    common.write_lines(stem + "_table.md", table(rows))
    common.write_lines(stem + "_targets.txt", targets(rows))


if __name__ == "__main__":
    main()
