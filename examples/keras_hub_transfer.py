"""Convert a trained keras-hub GPT-2 to FAVOR+ and finetune it.

The Performer paper's backward-compatibility claim, on a keras-hub model:
a small `keras_hub.models.GPT2CausalLM`, built from a config (byte-level
vocabulary, no preprocessor) with exact softmax attention, is trained on
the Python standard library's source (`examples.corpus`), converted with
`keras_favor.convert.performerize` and finetuned for up to 10 % of its
training steps. Arms, all from the same seed, on the same batches and
validation windows:

- `teacher`: the exact GPT-2 after `--steps` steps, and trained on for
  as many steps as the finetuning (the reference at equal steps);
- `converted FAVOR+` and `converted FAVOR+ window W` (`local_window=W`):
  the teacher converted, right after the conversion (0 steps) and after
  finetuning;
- `scratch FAVOR+` and `scratch FAVOR+ window W`: the same GPT-2,
  converted before any training and trained from scratch for the
  teacher's steps and for as many steps as the teacher and the
  finetuning together.

Reports validation bits per byte: prints a table, and writes
`keras_hub_transfer.csv`, `keras_hub_transfer.json` and
`keras_hub_transfer.png` into `--output-dir`. `--full` runs the full size.

    python -m examples.keras_hub_transfer            # a few minutes
    python -m examples.keras_hub_transfer --full
"""

import argparse
import csv
import json
import math
import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# example_utils first: it imports TensorFlow without its start-up messages.
from examples import example_utils
from examples.example_utils import print_table

# isort: split
import keras
import keras_hub

import keras_favor.keras_hub  # noqa: F401 (registers the converted tasks)
from examples import corpus
from keras_favor import convert

DEFAULT_OUTPUT_DIR = os.path.join("benchmarks", "results", "tmp")
# What --full changes (unless given on the command line).
FULL = {
    "steps": 2000,
    "num_layers": 4,
    "hidden_dim": 128,
    "intermediate_dim": 512,
    "num_features": 128,
    "max_length": 256,
    "validation_windows": 256,
}
FINETUNE_FRACTIONS = (0.025, 0.05, 0.1)
TARGET = 0.02  # within 2 % of the teacher, with the window


def gpt2(args):
    """A byte-level GPT-2 causal LM with exact attention, from a config."""
    keras.utils.set_random_seed(args.seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=corpus.VOCABULARY_SIZE,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        hidden_dim=args.hidden_dim,
        intermediate_dim=args.intermediate_dim,
        dropout=0.0,
        max_sequence_length=args.max_length,
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def performer(model, args, local_window):
    return convert.performerize(
        model,
        num_features=args.num_features,
        seed=args.seed,
        local_window=local_window,
    )


def compiled(model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    return model


def as_inputs(token_ids):
    """keras-hub's input dict; the windows are cut from the corpus, so no
    position is padding."""
    return {
        "token_ids": token_ids,
        "padding_mask": np.ones(token_ids.shape, bool),
    }


def bits_per_byte(model, validation, batch_size):
    """Validation cross-entropy in bits (one token is one byte)."""
    loss = model.evaluate(
        as_inputs(validation[0]),
        validation[1],
        batch_size=batch_size,
        verbose=0,
    )
    return float(loss) / math.log(2.0)


def train_to(model, train, first_step, boundaries, args):
    """Fits `model` on the training batches from `first_step` on and
    evaluates it at each number of steps in `boundaries`.

    Returns:
        `[(steps, seconds, bits per byte)]`: the steps since `first_step`,
        and the training seconds (compilation included, evaluation left
        out).
    """
    points, done, seconds = [], 0, 0.0
    for boundary in boundaries:
        if boundary > done:
            begin = (first_step + done) * args.batch_size
            end = (first_step + boundary) * args.batch_size
            start = time.perf_counter()
            model.fit(
                as_inputs(train[0][begin:end]),
                train[1][begin:end],
                batch_size=args.batch_size,
                epochs=1,
                shuffle=False,
                verbose=0,
            )
            seconds += time.perf_counter() - start
            done = boundary
        points.append(
            (
                done,
                seconds,
                bits_per_byte(model, args.validation, args.batch_size),
            )
        )
    return points


def variants(args):
    """`(name, local_window)` of the converted attention variants."""
    return [
        ("FAVOR+", 0),
        (f"FAVOR+ window {args.local_window}", args.local_window),
    ]


def run_arms(args, train):
    """Trains and evaluates every arm; returns the rows of the table."""
    rows = []

    def add(arm, local_window, first_step, points):
        # finetune_steps: the steps beyond the teacher's.
        for steps, seconds, bpb in points:
            total = first_step + steps
            rows.append(
                {
                    "arm": arm,
                    "local_window": local_window,
                    "finetune_steps": total - args.steps,
                    "total_steps": total,
                    "seconds": round(seconds, 2),
                    "bits_per_byte": bpb,
                }
            )
            print(
                f"  {arm}: {total} steps, {seconds:.0f} s: {bpb:.4f} bits/byte"
            )

    teacher = compiled(gpt2(args), args.learning_rate)
    add("teacher", 0, 0, train_to(teacher, train, 0, [args.steps], args))
    students = {
        name: performer(teacher, args, local_window)
        for name, local_window in variants(args)
    }
    changes = logit_changes(teacher, students, args.validation[0])
    # The teacher trained on for as many steps as the finetuning: the
    # reference at equal steps.
    points = train_to(
        teacher, train, args.steps, [args.finetune_steps[-1]], args
    )
    add("teacher", 0, args.steps, points)
    for name, local_window in variants(args):
        student = compiled(students[name], args.finetune_learning_rate)
        add(
            f"converted {name}",
            local_window,
            args.steps,
            train_to(
                student, train, args.steps, [0] + args.finetune_steps, args
            ),
        )
    for name, local_window in variants(args):
        scratch = compiled(
            performer(gpt2(args), args, local_window), args.learning_rate
        )
        add(
            f"scratch {name}",
            local_window,
            0,
            train_to(scratch, train, 0, [args.steps, args.total_steps], args),
        )
    return rows, teacher, changes


def logit_changes(teacher, students, token_ids):
    """How far each conversion moved the outputs: the largest absolute
    change of a validation logit, right after the conversion."""
    want = teacher.predict(as_inputs(token_ids), verbose=0)
    changes = {}
    for name, student in students.items():
        got = student.predict(as_inputs(token_ids), verbose=0)
        changes[name] = float(np.max(np.abs(got - want)))
        print(
            f"  converted {name}: the largest logit change {changes[name]:.3g}"
        )
    return changes


def summarize(rows, args):
    """The table (teacher, each arm right after conversion and at the end)
    and the check of the target."""
    exact, exact_on = (
        r["bits_per_byte"] for r in rows if r["arm"] == "teacher"
    )
    headers = ["arm", "steps", "finetune steps", "bits/byte", "vs teacher"]
    table = [
        [
            r["arm"],
            str(r["total_steps"]),
            str(r["finetune_steps"])
            if r["arm"].startswith("converted")
            else "-",
            f"{r['bits_per_byte']:.4f}",
            f"{r['bits_per_byte'] / exact - 1:+.2%}",
        ]
        for r in rows
    ]
    print(
        f"\nValidation bits per byte ({len(args.validation[0])} windows "
        f"of {args.max_length} bytes; lower is better):"
    )
    print_table(headers, table)
    window = [
        r
        for r in rows
        if r["arm"] == f"converted FAVOR+ window {args.local_window}"
    ][-1]
    gap = window["bits_per_byte"] / exact - 1
    gap_on = window["bits_per_byte"] / exact_on - 1
    print(
        f"Window {args.local_window} after {window['finetune_steps']} "
        f"finetuning steps ({window['finetune_steps'] / args.steps:.1%} of "
        f"the teacher's): {gap:+.2%} against the teacher (target within "
        f"{TARGET:.0%}: {'met' if gap <= TARGET else 'not met'}); "
        f"{gap_on:+.2%} against the teacher trained as many steps more."
    )
    return {
        "teacher": exact,
        "teacher_equal_steps": exact_on,
        "window_gap": gap,
        "window_gap_equal_steps": gap_on,
        "target_met": gap <= TARGET,
    }


def plot(rows, path, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    exact, exact_on = (
        r["bits_per_byte"] for r in rows if r["arm"] == "teacher"
    )
    for (name, _), color in zip(variants(args), ("tab:blue", "tab:orange")):
        points = [r for r in rows if r["arm"] == f"converted {name}"]
        axis.plot(
            [r["finetune_steps"] for r in points],
            [r["bits_per_byte"] for r in points],
            "-o",
            color=color,
            label=f"converted {name}, finetuned",
        )
        scratch = [r for r in rows if r["arm"] == f"scratch {name}"][-1]
        axis.axhline(
            scratch["bits_per_byte"],
            color=color,
            linestyle=":",
            label=f"{name} from scratch, {scratch['total_steps']} steps",
        )
    axis.axhline(
        exact,
        color="black",
        linestyle="-.",
        label=f"exact teacher, {args.steps} steps",
    )
    axis.axhline(
        exact_on,
        color="black",
        linestyle=":",
        label=f"exact teacher, {args.total_steps} steps",
    )
    axis.axhline(
        (1 + TARGET) * exact,
        color="gray",
        linestyle=":",
        linewidth=1,
        label=f"teacher + {TARGET:.0%}",
    )
    axis.set_xlabel("finetuning steps after the conversion")
    axis.set_ylabel("validation bits per byte")
    axis.set_title(
        f"keras-hub GPT-2 ({args.num_layers} layers, width "
        f"{args.hidden_dim}) converted to FAVOR+, stdlib source"
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--full",
        action="store_true",
        help="the full size: "
        + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in FULL.items())
        + ", unless given",
    )
    add(
        "--steps",
        type=int,
        default=400,
        help="training steps of the exact teacher",
    )
    add(
        "--finetune-steps",
        default=None,
        help="comma-separated finetuning step counts to evaluate at "
        "(unset: 2.5, 5 and 10 %% of --steps)",
    )
    add(
        "--local-window",
        type=int,
        default=16,
        help="the window variant's local_window",
    )
    example_utils.add_conversion_arguments(
        parser, DEFAULT_OUTPUT_DIR, intermediate_dim=256
    )
    args = parser.parse_args(argv)
    if args.full:
        example_utils.apply_full_size(args, argv, FULL)
    if args.finetune_steps is None:
        args.finetune_steps = sorted(
            {max(1, round(args.steps * f)) for f in FINETUNE_FRACTIONS}
        )
    else:
        args.finetune_steps = sorted(
            {int(n) for n in args.finetune_steps.split(",")}
        )
    if args.finetune_steps[0] < 1:
        parser.error("--finetune-steps must be positive")
    if args.finetune_steps[-1] > 0.1 * args.steps:
        parser.error("--finetune-steps: at most 10 % of --steps")
    args.total_steps = args.steps + args.finetune_steps[-1]
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    os.makedirs(args.output_dir, exist_ok=True)
    train_tokens, validation_tokens, _ = corpus.load_corpus(
        args.corpus_bytes, args.validation_every, args.seed
    )
    rng = np.random.default_rng(args.seed)
    train = corpus.next_token_pairs(
        corpus.random_windows(
            train_tokens,
            args.total_steps * args.batch_size,
            args.max_length + 1,
            rng,
        )
    )
    args.validation = corpus.next_token_pairs(
        corpus.random_windows(
            validation_tokens, args.validation_windows, args.max_length + 1, rng
        )
    )
    load_before = os.getloadavg()[0]
    print(
        f"Corpus: {len(train_tokens):,} training and "
        f"{len(validation_tokens):,} validation bytes. Load average "
        f"{load_before:.1f}."
    )
    rows, teacher, changes = run_arms(args, train)
    summary = summarize(rows, args)
    summary.update(
        largest_logit_change=changes,
        seconds=round(time.perf_counter() - start, 1),
        load_before=load_before,
        load_after=os.getloadavg()[0],
        arguments={k: v for k, v in vars(args).items() if k != "validation"},
    )
    paths = {
        ext: os.path.join(args.output_dir, f"keras_hub_transfer.{ext}")
        for ext in ("csv", "json", "png")
    }
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(paths["json"], "w") as f:
        json.dump({"summary": summary, "rows": rows}, f, indent=1)
    plot(rows, paths["png"], args)
    print(
        f"Wrote {', '.join(paths.values())}. Total "
        f"{summary['seconds']:.0f} s, load average "
        f"{summary['load_after']:.1f}."
    )
    return {
        "rows": rows,
        "summary": summary,
        "teacher": teacher,
        "validation": args.validation,
        "paths": paths,
    }


if __name__ == "__main__":
    main()
