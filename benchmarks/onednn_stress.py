"""Does oneDNN's batch matmul crash under keras_favor? Crash counts per kind.

TensorFlow 2.21 runs batched matrix products on x86 CPUs through oneDNN, whose
broadcasting batch matmul can corrupt the heap (tensorflow/tensorflow#117700,
#123109; uxlfoundation/oneDNN#4396; README, "Known issue"). This script runs
each kind of workload in fresh subprocesses with `TF_ENABLE_ONEDNN_OPTS=1` and
counts the runs that die (a signal or an abort's exit status) apart from those
that finish, raise a Python error, or run past the time limit:

- `favor_bidirectional`, `favor_causal`: a few training steps (graph mode,
  then one eager step) of small `FavorAttention` models with padding masks,
  over several shapes: batch 1 and 2, lengths off the chunk size, cross
  attention, each feature map.
- `favor_feature_einsum`: only the feature maps' projection
  `einsum("...d,md->...m")` of `(B, H, L, d)` heads with `(m, d)` weights
  and its gradient, which TensorFlow runs as a broadcasting batch matmul
  `B x H x L x 1 x d @ 1 x 1 x 1 x d x m`.
- `mha`: the same training steps with `keras.layers.MultiHeadAttention`, the
  control from Keras itself (its `EinsumDense` projections are broadcasting
  batch matmuls `B x L x E @ 1 x E x F` too).
- `raw_broadcast`: `tf.matmul` of `2x1x40x20 @ 1x1x20x40` (oneDNN#4396).
- `raw_rank_mismatch`: `tf.matmul` of `13x1x3x4 @ 4x16` (tensorflow#117700).

    python -m benchmarks.onednn_stress                  # 20 runs per kind
    python -m benchmarks.onednn_stress --runs 5 --kinds favor_causal mha
    python -m benchmarks.onednn_stress --verbose        # keep the oneDNN
        # primitives (ONEDNN_VERBOSE=1) before each crash in the log

It prints one line per run and a table; `--output FILE` writes the table,
with the machine and the stderr tail of every run that did not finish, to
FILE.
"""

import argparse
import collections
import os
import platform
import signal
import subprocess
import sys
import time

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
REPOSITORY_DIR = os.path.dirname(BENCHMARKS_DIR)
KINDS = (
    "favor_bidirectional",
    "favor_causal",
    "favor_feature_einsum",
    "mha",
    "raw_broadcast",
    "raw_rank_mismatch",
)
FEATURE_MAPS = ("softmax", "softmax_hyperbolic", "softmax_trig", "relu", "elu")
# (batch, query length, key length, num_heads, key_dim, num_features,
# chunk_size): batch 1 and 2, lengths off the chunk size, cross attention.
SHAPES = (
    (2, 40, 40, 2, 8, 16, 8),
    (1, 37, 37, 1, 20, 40, 16),
    (2, 23, 31, 4, 16, 8, 4),
    (3, 64, 64, 2, 32, 32, 64),
)
# Exit statuses of an abort or a fault that the C runtime or Python's
# faulthandler turned into an exit code rather than a signal.
CRASH_STATUSES = {134, 139, 136, 135}


# ---------------------------------------------------------------- children --


def _model(attention, shape, causal, cross, eager=True):
    import keras

    batch, length, key_length, heads, key_dim, _, _ = shape
    key_length = key_length if cross else length
    width = heads * key_dim
    query = keras.Input((length, width))
    value = keras.Input((key_length, width)) if cross else query
    mask = keras.Input((key_length,), dtype="bool")
    outputs = attention(query, value, value_mask=mask, use_causal_mask=causal)
    outputs = keras.layers.Dense(1)(outputs)
    inputs = [query, value, mask] if cross else [query, mask]
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-3), "mse", run_eagerly=eager)
    return model


def _data(shape, cross, rng):
    import numpy as np

    batch, length, key_length, heads, key_dim, _, _ = shape
    key_length = key_length if cross else length
    width = heads * key_dim
    query = rng.normal(size=(batch, length, width)).astype("float32")
    # Right padding: row b keeps the first key_length - 3 * b keys.
    valid = np.maximum(key_length - 3 * np.arange(batch), 1)
    mask = np.arange(key_length)[None, :] < valid[:, None]
    target = rng.normal(size=(batch, length, 1)).astype("float32")
    if cross:
        value = rng.normal(size=(batch, key_length, width)).astype("float32")
        return [query, value, mask], target
    return [query, mask], target


def _train(make_attention, causal, steps):
    """`steps` eager training steps per shape (and cross attention for the
    bidirectional kind); the first shape's model trains in graph mode too,
    where grappler may fuse oneDNN ops."""
    import numpy as np

    rng = np.random.default_rng(0)
    for index, shape in enumerate(SHAPES):
        for cross in (False,) if causal else (False, True):
            if cross and shape[1] == shape[2]:
                continue
            for eager in (True, False) if index == 0 else (True,):
                model = _model(
                    make_attention(index, shape), shape, causal, cross, eager
                )
                inputs, target = _data(shape, cross, rng)
                for _ in range(steps):
                    model.train_on_batch(inputs, target)


def child_favor(causal, steps):
    import numpy as np

    import keras_favor

    def make(index, shape):
        _, _, _, heads, key_dim, features, chunk = shape
        return keras_favor.FavorAttention(
            num_heads=heads,
            key_dim=key_dim,
            num_features=features,
            chunk_size=chunk,
            feature_map=FEATURE_MAPS[index % len(FEATURE_MAPS)],
            seed=index,
        )

    _train(make, causal, steps)
    # Every feature map once more on the first shape.
    for index in range(len(SHAPES), len(FEATURE_MAPS)):
        model = _model(make(index, SHAPES[0]), SHAPES[0], causal, False)
        inputs, target = _data(SHAPES[0], False, np.random.default_rng(1))
        for _ in range(steps):
            model.train_on_batch(inputs, target)


def child_mha(steps):
    import keras

    def make(index, shape):
        _, _, _, heads, key_dim, _, _ = shape
        return keras.layers.MultiHeadAttention(num_heads=heads, key_dim=key_dim)

    _train(make, False, steps)
    _train(make, True, steps)


def child_feature_einsum(steps):
    import tensorflow as tf

    for index, (batch, length, _, heads, key_dim, features, _) in enumerate(
        SHAPES
    ):
        x = tf.random.normal((batch, heads, length, key_dim), seed=index)
        projection = tf.random.normal((features, key_dim), seed=index + 1)
        for _ in range(steps):
            with tf.GradientTape() as tape:
                tape.watch([x, projection])
                y = tf.einsum("...d,md->...m", x, projection)
                loss = tf.reduce_sum(tf.exp(-tf.square(y)))
            tape.gradient(loss, [x, projection])


def child_raw(lhs_shape, rhs_shape, steps):
    import tensorflow as tf

    tf.random.set_seed(0)
    for _ in range(steps * 20):
        tf.matmul(tf.random.normal(lhs_shape), tf.random.normal(rhs_shape))


def child(kind, steps):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if kind == "favor_bidirectional":
        child_favor(False, steps)
    elif kind == "favor_causal":
        child_favor(True, steps)
    elif kind == "favor_feature_einsum":
        child_feature_einsum(steps)
    elif kind == "mha":
        child_mha(steps)
    elif kind == "raw_broadcast":
        child_raw((2, 1, 40, 20), (1, 1, 20, 40), steps)
    elif kind == "raw_rank_mismatch":
        child_raw((13, 1, 3, 4), (4, 16), steps)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    print("finished")


# ------------------------------------------------------------------ parent --


def outcome(returncode):
    """`finished`, `crashed` (a signal or an abort's status) or `error`."""
    if returncode == 0:
        return "finished"
    if returncode < 0 or returncode in CRASH_STATUSES:
        return "crashed"
    return "error"


def describe_status(returncode):
    if returncode is None:
        return "timeout"
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit {returncode}"


def cpu_name():
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def versions():
    output = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os; import tensorflow as tf, keras, keras_favor; "
            "print(tf.__version__, keras.__version__, 'keras_favor from', "
            "os.path.dirname(os.path.dirname(keras_favor.__file__)))",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        cwd=REPOSITORY_DIR,  # the children's first path entry: this checkout
    )
    return output.stdout.strip() or "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", type=int, default=20, help="subprocesses per kind"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=5,
        help="training steps per model in each subprocess",
    )
    parser.add_argument(
        "--kinds", nargs="+", choices=KINDS, default=list(KINDS)
    )
    parser.add_argument(
        "--timeout-s", type=float, default=120.0, help="limit per subprocess"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=float("inf"),
        help="start no round of runs after this many seconds",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="run the children with ONEDNN_VERBOSE=1",
    )
    parser.add_argument(
        "--output",
        help="also write the table and the "
        "stderr tails of the runs that did not finish here",
    )
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps)
        return

    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="1", TF_CPP_MIN_LOG_LEVEL="2")
    if args.verbose:
        env["ONEDNN_VERBOSE"] = "1"
    counts = {kind: collections.Counter() for kind in args.kinds}
    statuses = {kind: collections.Counter() for kind in args.kinds}
    seconds = collections.defaultdict(float)
    crash_logs = []
    began = time.perf_counter()
    # Kinds interleaved, so that a change in the machine's load spreads over
    # all of them.
    for run in range(args.runs):
        if time.perf_counter() - began > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent after {run} rounds")
            break
        for kind in args.kinds:
            start = time.perf_counter()
            try:
                result = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.onednn_stress",
                        "--child",
                        kind,
                        "--steps",
                        str(args.steps),
                    ],
                    capture_output=True,
                    text=True,
                    env=env,
                    cwd=REPOSITORY_DIR,
                    timeout=args.timeout_s,
                )
                returncode, stderr = result.returncode, result.stderr
                kind_outcome = outcome(returncode)
            except subprocess.TimeoutExpired as expired:
                returncode, kind_outcome = None, "timeout"
                stderr = (expired.stderr or b"").decode(errors="replace")
            seconds[kind] += time.perf_counter() - start
            counts[kind][kind_outcome] += 1
            statuses[kind][describe_status(returncode)] += 1
            if kind_outcome != "finished":
                tail = "\n".join(stderr.strip().splitlines()[-25:])
                crash_logs.append(
                    f"--- {kind}, run {run + 1}: {describe_status(returncode)}\n{tail}"
                )
            print(
                f"run {run + 1:3d} {kind:22s} {describe_status(returncode)}",
                flush=True,
            )

    header = (
        f"oneDNN stress: up to {args.runs} subprocesses per kind, {args.steps} steps, "
        f"TF_ENABLE_ONEDNN_OPTS=1\nmachine: {cpu_name()}, {os.cpu_count()} cores; "
        f"python {platform.python_version()}; tensorflow, keras: {versions()}\n"
    )
    table = [
        "| kind | runs | crashed | error | timeout | exit statuses | s per run |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in args.kinds:
        c = counts[kind]
        runs = sum(c.values())
        table.append(
            f"| {kind} | {runs} | {c['crashed']} | {c['error']} | {c['timeout']} | "
            + ", ".join(f"{k}: {v}" for k, v in sorted(statuses[kind].items()))
            + f" | {seconds[kind] / max(runs, 1):.1f} |"
        )
    report = header + "\n" + "\n".join(table) + "\n"
    print("\n" + report)
    if args.output is None:
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as file:
        file.write(report)
        if crash_logs:
            file.write("\nstderr of the runs that did not finish:\n\n")
            file.write("\n\n".join(crash_logs) + "\n")


if __name__ == "__main__":
    main()
