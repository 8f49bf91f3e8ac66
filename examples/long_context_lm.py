"""The Performer against exact attention on long byte sequences.

A byte-level causal language model learns the Python standard library's
source at 2048 bytes of context, built twice by `keras_favor.build_performer`:
once with FAVOR+ attention (the Performer) and once with exact softmax
attention, the same model otherwise. Each trains for the same wall-clock
budget on the same batches: exact attention in a process of its own, then
the Performer in the main process, where nothing has trained before, so that
each process's peak resident memory is its model's. The script reports the
steps each model took, its time per step, its peak memory and its
validation bits per byte on held-out files; saves the Performer, exports it
as a SavedModel with `serve` and `generate` endpoints
(`keras_favor.generation.export_language_model`) and generates text with its
recurrent cache (`keras_favor.generate`); times a few training steps of both
models at lengths from 128 to 2048 (where exact attention stops being the
faster one); and ends with a plain summary of what won, by how much, and the
caveats.

The budget counts the training steps' wall clock from the end of the first
step (which traces and compiles the step) to the last. The validation passes
are left out of it, for both models alike. The Performer trains with
`keras_favor.FeatureRedraw`, a new random projection every
`--redraw-interval` steps (the default run stops before the first).

Everything goes into `--output-dir` (default `demo_output/` in the
repository): `model.keras` (the Performer), `saved_model/`, `demo.png` (the
validation curves and the time per step against length) and `demo.csv`
(every number printed).

Run `make demo`, or `python -m examples.long_context_lm --help` for the
flags (from the repository root). The defaults take 4 to 5 minutes on 2
busy CPU cores; `--budget 900` compares 15 minutes of training per model.
"""

import argparse
import csv
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

# example_utils first: it imports TensorFlow without its start-up messages.
from examples.example_utils import ATTENTION_NAMES
from examples.example_utils import StepTimer
from examples.example_utils import add_model_arguments
from examples.example_utils import build_model
from examples.example_utils import print_table

# isort: split

import keras
import tensorflow as tf

import keras_favor
from examples.corpus import VOCABULARY_SIZE
from examples.corpus import bits_per_byte
from examples.corpus import load_corpus
from examples.corpus import next_token_pairs
from examples.corpus import random_windows

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT_DIR = os.path.join(REPOSITORY_ROOT, "demo_output")
# `fit` runs one epoch of this many steps at most; the budget stops it.
MAX_STEPS = 1_000_000


def compile_model(model, args):
    model.compile(
        optimizer=keras.optimizers.AdamW(args.learning_rate),
        # The next-token cross-entropy over the non-padding targets.
        loss=keras_favor.models.language_model_loss(),
        metrics=[bits_per_byte],
    )


def peak_memory_mib():
    """This process's peak resident memory so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def validation_bits_per_byte(model, inputs, targets, batch_size):
    """Mean cross-entropy in bits of the next-byte predictions."""
    total = 0.0
    for start in range(0, len(inputs), batch_size):
        logits = model.predict_on_batch(inputs[start : start + batch_size])
        logits = logits - logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(logits).sum(axis=-1))
        picked = np.take_along_axis(
            logits, targets[start : start + batch_size, :, None], axis=-1
        )[..., 0]
        total += float(np.sum(log_norm - picked))
    return total / targets.size / math.log(2.0)


class WallClockBudget(keras.callbacks.Callback):
    """Stops `fit` after `seconds` of training and validates at evenly
    spaced points of that time.

    The clock starts when the first training step ends (that step traces
    and compiles the model's training step) and runs to the end of each
    later step. The time of each validation pass is taken off the clock.

    Args:
        seconds: number > 0, the training time.
        validation: `(inputs, targets)` arrays of held-out windows.
        points: int >= 1, validations at `k * seconds / points` for
            `k = 1 .. points` (the last when training stops).
        batch_size: int, the validation batch size.
        label: str, the model's name in the progress lines.
    """

    def __init__(self, seconds, validation, points, batch_size, label):
        super().__init__()
        self.seconds = seconds
        self.validation = validation
        self.points = points
        self.batch_size = batch_size
        self.label = label
        self.first_step_s = None
        self.step_s = []
        self.history = []
        self.validation_s = 0.0
        self._clock_start = None
        self._batch_start = None
        self._next_point = seconds / points

    def elapsed(self, now):
        return now - self._clock_start - self.validation_s

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if self.first_step_s is None:
            self.first_step_s = now - self._batch_start
            self._clock_start = now
            print(
                f"  [{self.label}] first step (tracing): "
                f"{self.first_step_s:.1f} s, not counted",
                flush=True,
            )
            return
        self.step_s.append(now - self._batch_start)
        elapsed = self.elapsed(now)
        done = elapsed >= self.seconds
        if done or elapsed >= self._next_point:
            self.validate(elapsed)
            self._next_point += self.seconds / self.points
        if done:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        # `fit` ran out of steps before the budget: validate at the end.
        steps = len(self.step_s) + 1
        validated = self.history and self.history[-1]["steps"] == steps
        if self.step_s and not validated:
            self.validate(self.elapsed(time.perf_counter()))

    def validate(self, elapsed):
        start = time.perf_counter()
        bits = validation_bits_per_byte(
            self.model, *self.validation, self.batch_size
        )
        self.validation_s += time.perf_counter() - start
        steps = len(self.step_s) + 1
        self.history.append(
            {"seconds": elapsed, "steps": steps, "bits_per_byte": bits}
        )
        print(
            f"  [{self.label}] {elapsed:5.1f} s: step {steps:4d}, "
            f"{1000 * np.median(self.step_s):6.0f} ms/step, "
            f"validation {bits:.3f} bits/byte",
            flush=True,
        )


def training_data(tokens, length, batch_size, seed):
    """Endless `(inputs, targets)` batches of random windows of `length + 1`
    tokens, the same sequence for every model with the same seed.

    The dataset's shapes are `(None, None)`, so the training step that
    `fit` traces for one length serves every length and batch size.
    """

    def batches():
        rng = np.random.default_rng([1, seed, length])
        while True:
            yield next_token_pairs(
                random_windows(tokens, batch_size, length + 1, rng)
            )

    spec = tf.TensorSpec((None, None), tf.int32)
    return tf.data.Dataset.from_generator(
        batches, output_signature=(spec, spec)
    ).prefetch(2)


def step_times(model, tokens, args, label):
    """Milliseconds per training step of `model` at each of `args.lengths`:
    the fastest of `args.timed_steps` steps after one warm-up step (the
    least disturbed by other work on the machine), on
    batches of `args.timing_batch_size` training windows. (The steps train
    the model further; run it after saving the model.)"""
    times = {}
    for length in args.lengths:
        timer = StepTimer()
        model.fit(
            training_data(
                tokens, length, args.timing_batch_size, args.seed + 1
            ),
            epochs=1,
            steps_per_epoch=1 + args.timed_steps,
            callbacks=[timer],
            shuffle=False,
            verbose=0,
        )
        times[length] = 1000 * min(timer.seconds[1:])
        print(
            f"  [{label}] length {length:5d}: {times[length]:7.0f} ms/step",
            flush=True,
        )
    return times


def train_for_budget(attention, args, corpus_path, after_training=None):
    """Builds one model, trains it for `args.budget` seconds, times its
    step at `args.lengths` and returns its numbers.

    `after_training(model)`, if given, runs between the training and the
    step timing (which trains the model further), after the peak memory of
    the training was read; what it returns is the result's `"extra"`."""
    corpus = np.load(corpus_path)
    validation = (corpus["validation_inputs"], corpus["validation_targets"])
    model = build_model(
        args,
        attention,
        vocabulary_size=VOCABULARY_SIZE,
        max_length=args.max_length,
        task="language_model",
        local_window=args.local_window if attention == "favor" else 0,
    )
    # No metrics: the validation passes compute bits per byte themselves,
    # and the saved model loads with nothing but keras_favor imported.
    model.compile(
        optimizer=keras.optimizers.AdamW(args.learning_rate),
        loss=keras_favor.models.language_model_loss(),
    )
    label = ATTENTION_NAMES[attention]
    budget = WallClockBudget(
        args.budget, validation, args.validation_points, args.batch_size, label
    )
    callbacks = [budget]
    if attention == "favor" and args.redraw_interval:
        callbacks.append(
            keras_favor.FeatureRedraw(
                interval=args.redraw_interval, seed=args.seed
            )
        )
    memory_before = peak_memory_mib()
    model.fit(
        training_data(
            corpus["train"], args.max_length, args.batch_size, args.seed
        ),
        epochs=1,
        steps_per_epoch=MAX_STEPS,
        callbacks=callbacks,
        shuffle=False,
        verbose=0,
    )
    memory_peak = peak_memory_mib()
    extra = after_training(model) if after_training else None
    times = step_times(model, corpus["train"], args, label)
    last = budget.history[-1]
    return {
        "attention": attention,
        "model": label,
        "parameters": model.count_params(),
        "steps": last["steps"],
        "seconds": last["seconds"],
        "first_step_s": budget.first_step_s,
        "ms_per_step": 1000 * float(np.median(budget.step_s)),
        "bits_per_byte": last["bits_per_byte"],
        "peak_memory_mib": memory_peak,
        "memory_before_training_mib": memory_before,
        "history": budget.history,
        # JSON keys are strings.
        "times": {str(length): ms for length, ms in times.items()},
        "extra": extra,
    }


def training_process(config_path):
    """The body of a training process: reads its settings from the JSON
    file `config_path`, trains, and writes the results beside them."""
    with open(config_path) as file:
        config = json.load(file)
    args = argparse.Namespace(**config["args"])
    result = train_for_budget(config["attention"], args, config["corpus_path"])
    with open(config["result_path"], "w") as file:
        json.dump(result, file)


def train_in_process(attention, args, corpus_path, work_dir):
    """Runs `train_for_budget` in a fresh Python process; returns its
    results."""
    config_path = os.path.join(work_dir, f"{attention}_config.json")
    result_path = os.path.join(work_dir, f"{attention}_result.json")
    with open(config_path, "w") as file:
        json.dump(
            {
                "args": vars(args),
                "attention": attention,
                "corpus_path": corpus_path,
                "result_path": result_path,
            },
            file,
        )
    sys.stdout.flush()
    # The child runs this module as `python -m`, from the repository root.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "examples.long_context_lm",
            "--training-process",
            config_path,
        ],
        check=True,
        cwd=REPOSITORY_ROOT,
    )
    with open(result_path) as file:
        return json.load(file)


def prompt_tokens(prompt):
    """`prompt` as a `(1, length)` batch of byte tokens (byte + 1)."""
    return (np.frombuffer(prompt.encode("utf-8"), np.uint8) + 1)[None].astype(
        np.int32
    )


def continuation_text(tokens, prompt_length):
    """The generated bytes of `(1, length)` tokens as printable text."""
    generated = bytes(max(int(t) - 1, 0) for t in tokens[0, prompt_length:])
    return printable(generated.decode("utf-8", errors="replace"))


def printable(text):
    """`text` with control characters other than newline and tab as `?`."""
    return "".join(c if c.isprintable() or c in "\n\t" else "?" for c in text)


def export_and_check(model, export_dir, check_inputs, temperature):
    """Exports `model` as a SavedModel that serves logits and generates
    (`keras_favor.generation.export_language_model`), reloads it and
    compares its logits with the model's.

    Returns:
        The largest absolute difference between the SavedModel's logits and
        the model's on `check_inputs`.
    """
    keras_favor.generation.export_language_model(
        model, export_dir, sampler="random", temperature=temperature
    )
    reloaded = tf.saved_model.load(export_dir)
    served = reloaded.serve(tf.constant(check_inputs)).numpy()
    # An eager call: `predict` would trace the model once more.
    expected = keras.ops.convert_to_numpy(model(check_inputs))
    return float(np.max(np.abs(served - expected)))


def plot(results, times, path):
    """Writes the two panels: validation bits per byte against training
    seconds, and time per step against length."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (curves, scaling) = pyplot.subplots(1, 2, figsize=(11, 4.2))
    for result in results:
        history = result["history"]
        curves.plot(
            [point["seconds"] for point in history],
            [point["bits_per_byte"] for point in history],
            marker="o",
            label=f"{result['model']} ({result['steps']} steps)",
        )
    curves.set_xlabel("training wall clock (s)")
    curves.set_ylabel("validation bits per byte")
    curves.set_title("Same wall-clock budget (lower is better)")
    curves.legend()
    curves.grid(alpha=0.3)
    for attention, by_length in times.items():
        lengths = sorted(by_length)
        scaling.plot(
            lengths,
            [by_length[n] for n in lengths],
            marker="o",
            label=ATTENTION_NAMES[attention],
        )
    scaling.set_xscale("log", base=2)
    scaling.set_yscale("log")
    lengths = sorted({n for by_length in times.values() for n in by_length})
    scaling.set_xticks(lengths, [str(n) for n in lengths])
    scaling.minorticks_off()
    scaling.set_xlabel("sequence length (bytes)")
    scaling.set_ylabel("time per training step (ms)")
    scaling.set_title("Time per step against length")
    scaling.legend()
    scaling.grid(alpha=0.3, which="both")
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    pyplot.close(figure)


CSV_FIELDS = (
    "kind",
    "model",
    "length",
    "steps",
    "seconds",
    "ms_per_step",
    "val_bits_per_byte",
    "peak_memory_mib",
    "memory_before_training_mib",
)


def write_csv(results, times, args, path):
    """One `result` row per model, a `validation` row per validation
    point, a `step_time` row per model and length."""
    rows = []
    for result in results:
        rows.append(
            {
                "kind": "result",
                "model": result["model"],
                "length": args.max_length,
                "steps": result["steps"],
                "seconds": round(result["seconds"], 2),
                "ms_per_step": round(result["ms_per_step"], 1),
                "val_bits_per_byte": round(result["bits_per_byte"], 4),
                "peak_memory_mib": round(result["peak_memory_mib"]),
                "memory_before_training_mib": round(
                    result["memory_before_training_mib"]
                ),
            }
        )
        for point in result["history"]:
            rows.append(
                {
                    "kind": "validation",
                    "model": result["model"],
                    "length": args.max_length,
                    "steps": point["steps"],
                    "seconds": round(point["seconds"], 2),
                    "val_bits_per_byte": round(point["bits_per_byte"], 4),
                }
            )
    for attention, by_length in times.items():
        for length, ms in sorted(by_length.items()):
            rows.append(
                {
                    "kind": "step_time",
                    "model": ATTENTION_NAMES[attention],
                    "length": length,
                    "steps": args.timed_steps,
                    "ms_per_step": round(ms, 1),
                }
            )
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def crossover_length(times):
    """The shortest measured length from which FAVOR+'s step is faster than
    exact attention's at every longer measured length, or None."""
    lengths = sorted(times["favor"])
    for index, length in enumerate(lengths):
        if all(times["favor"][n] < times["exact"][n] for n in lengths[index:]):
            return length
    return None


def summary_lines(results, times, args, load):
    """The closing summary, in plain words, from the measured numbers."""
    favor, exact = (
        next(r for r in results if r["attention"] == a)
        for a in ("favor", "exact")
    )
    performer = "the Performer"
    window = (
        f" and an exact window over the {args.local_window} latest bytes"
        if args.local_window
        else ""
    )
    lines = [
        "What was compared: one byte-level language model of the Python "
        f"standard library ({args.num_layers} block(s), width "
        f"{args.hidden_dim}, {args.num_heads} heads), {args.max_length} bytes "
        f"of context, batch {args.batch_size}, built twice: with FAVOR+ "
        f"attention ({performer}, {args.num_features} random features"
        f"{window}) and with exact softmax attention. Each trained for "
        f"{args.budget:g} s of wall clock on the same batches, "
        + (
            "both in this process"
            if args.in_process
            else "exact attention in a process of its own, then the Performer in "
            "the main one"
        )
        + " (the first step, which traces the model, and the validation "
        "passes are outside the budget)."
    ]
    step_ratio = favor["steps"] / exact["steps"]
    speed_ratio = exact["ms_per_step"] / favor["ms_per_step"]
    gap = exact["bits_per_byte"] - favor["bits_per_byte"]
    if gap > 0:
        verdict = (
            f"The Performer won: in the same time it took {favor['steps']} "
            f"steps to exact attention's {exact['steps']} ({step_ratio:.1f}x "
            f"as many; {favor['ms_per_step']:.0f} against "
            f"{exact['ms_per_step']:.0f} ms per step, {speed_ratio:.1f}x "
            f"faster) and reached {favor['bits_per_byte']:.2f} bits per byte "
            f"against {exact['bits_per_byte']:.2f}: {gap:.2f} bits, "
            f"{100 * gap / exact['bits_per_byte']:.0f} % lower."
        )
    else:
        verdict = (
            f"Exact attention did at least as well: {exact['steps']} steps "
            f"to the Performer's {favor['steps']} "
            f"({exact['ms_per_step']:.0f} against "
            f"{favor['ms_per_step']:.0f} ms per step), "
            f"{exact['bits_per_byte']:.2f} bits per byte against "
            f"{favor['bits_per_byte']:.2f}."
        )
    lines.append(verdict)
    memory = (
        f"{favor['peak_memory_mib']:,.0f} MiB for the Performer "
        f"({favor['memory_before_training_mib']:,.0f} before its training), "
        f"{exact['peak_memory_mib']:,.0f} MiB for exact attention "
        f"({exact['memory_before_training_mib']:,.0f} before)"
    )
    if args.in_process:
        lines.append(
            f"Peak resident memory of this process after training: {memory}. "
            "One process trained both, exact attention first, so the "
            "Performer's figure is not its own."
        )
    else:
        added = [
            r["peak_memory_mib"] - r["memory_before_training_mib"]
            for r in (favor, exact)
        ]
        lines.append(
            f"Peak resident memory of each training process: {memory}; "
            "before training each held TensorFlow, the data and the model. "
            f"Training added {added[0]:,.0f} MiB for the Performer and "
            f"{added[1]:,.0f} MiB for exact attention."
        )
    crossover = crossover_length(times)
    longest, shortest = max(times["favor"]), min(times["favor"])
    growth = (
        f"From {shortest} to {longest} bytes ({longest // shortest}x the "
        f"length) exact attention's step grew "
        f"{times['exact'][longest] / times['exact'][shortest]:.0f}x and "
        f"FAVOR+'s {times['favor'][longest] / times['favor'][shortest]:.0f}x "
        f"(batch {args.timing_batch_size}, the fastest of "
        f"{args.timed_steps} steps). "
    )
    if crossover is None:
        scaling = (
            f"{growth}Exact attention's step was not slower at the longer "
            "measured lengths."
        )
    else:
        ratio = times["exact"][longest] / times["favor"][longest]
        scaling = (
            f"{growth}FAVOR+'s step was the faster one from {crossover} "
            f"bytes on, {ratio:.1f}x faster at {longest}."
        )
    lines.append(scaling)
    lines.append("Caveats:")
    short_favor = times["favor"][shortest]
    short_exact = times["exact"][shortest]
    if short_exact < short_favor:
        lines.append(
            f"- On short sequences exact attention is faster: at {shortest} "
            f"bytes its step took {short_exact:.0f} ms against the "
            f"Performer's {short_favor:.0f} ms. Below a few hundred tokens "
            "FAVOR+ saves nothing."
        )
    else:
        lines.append(
            f"- FAVOR+'s step was not slower even at {shortest} bytes here "
            f"({short_favor:.0f} against {short_exact:.0f} ms, batch "
            f"{args.timing_batch_size}), with {args.num_features} features "
            f"and heads of {args.hidden_dim // args.num_heads}. With more "
            "features or larger heads exact attention is the faster layer "
            "below a crossover length: for the training step of one causal "
            "layer of 8 heads, 512 tokens with 64 features and 1024-2048 "
            "with 256 (BENCHMARKS.md, the crossover table)."
        )
    lines += [
        f"- {args.budget:g} s of training make rough text: both models are "
        "far from converged, so the generated text above is byte-level "
        "Python-like noise, not working code.",
        "- The win is speed: for equal steps FAVOR+ was within about 1 % of "
        "exact attention in bits per byte at this context (a 2-block model "
        "after 300 steps, benchmarks/results/local_window.md), not better.",
        f"- Bits per byte on {args.validation_windows} held-out windows "
        f"({args.validation_windows * args.max_length:,} bytes): differences "
        "of a few hundredths are noise.",
        "- One seed and one short run on a shared machine (1-minute load "
        f"average {load:.1f} on {os.cpu_count()} cores): times drift 10-20 % "
        "between runs on a quiet machine and more on a busy one; the step "
        f"timing keeps the fastest of {args.timed_steps} steps to limit that.",
    ]
    return lines


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(
        parser,
        num_layers=1,
        hidden_dim=128,
        intermediate_dim=256,
        batch_size=2,
        steps=None,
        epochs=None,
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=2048,
        help="bytes of context per training sequence",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=40.0,
        help="seconds of training per model (wall clock)",
    )
    parser.add_argument(
        "--validation-points",
        type=int,
        default=4,
        help="validations per model, evenly spread over the budget",
    )
    parser.add_argument(
        "--validation-windows",
        type=int,
        default=4,
        help="held-out sequences to validate on",
    )
    parser.add_argument(
        "--corpus-bytes",
        type=int,
        default=4_000_000,
        help="how much of the stdlib to read",
    )
    parser.add_argument(
        "--validation-every",
        type=int,
        default=10,
        help="every n-th file is held out for validation",
    )
    parser.add_argument(
        "--local-window",
        type=int,
        default=0,
        help="exact attention over this many latest "
        "positions inside the Performer's attention "
        "(FavorAttention's local_window; 0: none)",
    )
    parser.add_argument(
        "--redraw-interval",
        type=int,
        default=300,
        help="FeatureRedraw interval, in training steps (0: no redraws)",
    )
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=None,
        help="sequence lengths of the step timing, each at "
        "most --max-length; None: the powers of 2 from 128 "
        "to --max-length",
    )
    parser.add_argument(
        "--timed-steps",
        type=int,
        default=3,
        help="timed steps per length, after one warm-up step",
    )
    parser.add_argument(
        "--timing-batch-size",
        type=int,
        default=1,
        help="sequences per step in the step timing",
    )
    parser.add_argument(
        "--output-dir",
        default=DEFAULT_OUTPUT_DIR,
        help="where to write model.keras, saved_model/, demo.png and demo.csv",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="train both models in this process instead of "
        "one process each: quicker to start, but the second "
        "model's peak memory then includes the first's",
    )
    # The body of the training process that `train_in_process` starts.
    parser.add_argument(
        "--training-process", metavar="CONFIG", help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--prompt", default="def ", help="text the generated bytes continue"
    )
    parser.add_argument(
        "--generate-bytes",
        type=int,
        default=200,
        help="bytes to generate (at most --max-length minus "
        "the prompt's bytes)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.9,
        help="sampling temperature of the generated bytes",
    )
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget must be > 0. Received: {args.budget}")
    if args.validation_points < 1:
        parser.error(
            f"--validation-points must be >= 1. Received: "
            f"{args.validation_points}"
        )
    if args.lengths is None:
        args.lengths = [
            2**k for k in range(7, 30) if 2**k <= args.max_length
        ] or [args.max_length]
    if max(args.lengths) > args.max_length or min(args.lengths) < 1:
        parser.error(
            "--lengths must be between 1 and --max-length (the model's "
            f"positions). Received: --lengths {args.lengths} --max-length "
            f"{args.max_length}"
        )
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.training_process:
        return training_process(args.training_process)
    start = time.perf_counter()
    os.makedirs(args.output_dir, exist_ok=True)
    train_tokens, validation_tokens, num_files = load_corpus(
        args.corpus_bytes, args.validation_every, args.seed
    )
    validation_inputs, validation_targets = next_token_pairs(
        random_windows(
            validation_tokens,
            args.validation_windows,
            args.max_length + 1,
            np.random.default_rng([2, args.seed]),
        )
    )
    print(
        f"Corpus: {num_files} stdlib files, {len(train_tokens):,} training "
        f"and {len(validation_tokens):,} validation bytes; "
        f"{args.max_length}-byte sequences, {args.budget:g} s of training "
        "per model."
    )
    model_path = os.path.join(args.output_dir, "model.keras")
    export_dir = os.path.join(args.output_dir, "saved_model")

    def save_export_and_generate(performer):
        performer.save(model_path)
        export_start = time.perf_counter()
        difference = export_and_check(
            performer, export_dir, validation_inputs[:1, :256], args.temperature
        )
        print(
            f"  Saved the Performer to {model_path} and exported it to "
            f"{export_dir} ({time.perf_counter() - export_start:.0f} s); "
            f"its serve endpoint matches the model to {difference:.1e}.",
            flush=True,
        )
        prompt = prompt_tokens(args.prompt)
        num_bytes = min(args.generate_bytes, args.max_length - prompt.shape[1])
        generate_start = time.perf_counter()
        tokens = keras_favor.generate(
            performer,
            prompt,
            num_bytes,
            sampler="random",
            temperature=args.temperature,
            seed=args.seed,
        )
        print(
            f"  Generated {num_bytes} bytes after {args.prompt!r} with its "
            "recurrent cache (keras_favor.generate) in "
            f"{time.perf_counter() - generate_start:.1f} s.",
            flush=True,
        )
        return {
            "max_diff": difference,
            "num_bytes": num_bytes,
            "continuation": continuation_text(tokens, prompt.shape[1]),
        }

    results = []
    with tempfile.TemporaryDirectory() as work_dir:
        corpus_path = os.path.join(work_dir, "corpus.npz")
        np.savez(
            corpus_path,
            train=train_tokens,
            validation_inputs=validation_inputs,
            validation_targets=validation_targets,
        )
        # Exact attention in a process of its own, then the Performer here,
        # where nothing has trained yet: each process's peak memory is its
        # model's. With --in-process both train here.
        where = "this" if args.in_process else "its own"
        print(
            f"\n{ATTENTION_NAMES['exact']} attention, in {where} process: "
            f"training for {args.budget:g} s, then the time per step at "
            f"lengths {args.lengths} (batch {args.timing_batch_size})",
            flush=True,
        )
        if args.in_process:
            results.append(train_for_budget("exact", args, corpus_path))
        else:
            results.append(
                train_in_process("exact", args, corpus_path, work_dir)
            )
        print(
            f"\n{ATTENTION_NAMES['favor']} attention, in this process: "
            f"training for {args.budget:g} s, saving, exporting and "
            "generating, then the time per step at the same lengths",
            flush=True,
        )
        results.append(
            train_for_budget(
                "favor", args, corpus_path, save_export_and_generate
            )
        )
    times = {
        result["attention"]: {
            int(length): ms for length, ms in result["times"].items()
        }
        for result in results
    }
    generated = results[1]["extra"]
    print(
        f"\nThe Performer's continuation of {args.prompt!r} "
        f"({generated['num_bytes']} bytes sampled at temperature "
        f"{args.temperature}):\n{args.prompt}{generated['continuation']}"
    )

    plot_path = os.path.join(args.output_dir, "demo.png")
    csv_path = os.path.join(args.output_dir, "demo.csv")
    plot(results, times, plot_path)
    rows = write_csv(results, times, args, csv_path)

    print(
        f"\nSummary ({args.max_length}-byte sequences, {args.budget:g} s "
        "of training each; bits per byte: lower is better)"
    )
    print_table(
        [
            "model",
            "parameters",
            "steps",
            "ms/step",
            "peak memory MiB",
            "val bits/byte",
        ],
        [
            [
                r["model"],
                f"{r['parameters']:,}",
                str(r["steps"]),
                f"{r['ms_per_step']:.0f}",
                f"{r['peak_memory_mib']:,.0f}",
                f"{r['bits_per_byte']:.3f}",
            ]
            for r in results
        ],
    )
    print()
    lengths = sorted(times["favor"])
    print_table(
        ["length"] + [str(n) for n in lengths],
        [
            [f"{ATTENTION_NAMES[a]} ms/step"]
            + [f"{times[a][n]:.0f}" for n in lengths]
            for a in ("exact", "favor")
        ],
    )
    print()
    for line in summary_lines(results, times, args, os.getloadavg()[0]):
        print(line)
    print(
        f"\nWritten to {args.output_dir}: model.keras, saved_model/, "
        f"demo.png, demo.csv. Total time: "
        f"{time.perf_counter() - start:.0f} s."
    )
    return {
        "results": results,
        "times": times,
        "rows": rows,
        "max_diff": generated["max_diff"],
        "continuation": generated["continuation"],
        "output_dir": args.output_dir,
    }


if __name__ == "__main__":
    main()
