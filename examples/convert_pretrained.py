"""Convert a trained softmax language model to FAVOR+ and finetune it.

Trains a small byte-level Transformer language model with exact softmax
attention (`keras.layers.MultiHeadAttention`) on the Python standard
library's source files, converts it with `keras_favor.convert.performerize`
and finetunes the converted model, reporting validation bits per byte:

- (a) the exact model before conversion;
- (b) the converted model right after the swap;
- (c) after N finetuning steps, for several N, without and with attention
  transfer first (`attention_transfer.transfer_attention`, beside this
  file: each FavorAttention trained on its softmax layer's outputs), with
  the time each stage took, so the two can be compared at equal compute;
- (d) a Performer with the same attention settings trained from scratch on
  the same batches, after the teacher's steps and after as many steps as
  the teacher and the finetuning together.

Each attention variant (`--variants`) is converted and trained from scratch
on its own: plain FAVOR+ (`favor`) and FAVOR+ with an exact local window
(`window`, `--local-window` positions). Writes `convert_pretrained.csv` and
`convert_pretrained.png` (the recovery curves) into `--output-dir` and prints
a table. `--full` trains the teacher for 1200 steps instead of 400. On 2 CPU
cores shared with other jobs (load average 9-16) the defaults took 18-23
minutes and `--full` 35; an idle machine takes a fraction of that.
"""

import argparse
import csv
import math
import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# example_utils first: it imports TensorFlow without its start-up messages.
from examples import example_utils
from examples.example_utils import StepTimer
from examples.example_utils import print_table

# isort: split
import keras

import keras_favor
from examples.attention_transfer import transfer_attention
from examples.corpus import VOCABULARY_SIZE
from examples.corpus import load_corpus
from examples.corpus import next_token_pairs
from examples.corpus import random_windows
from keras_favor import convert

DEFAULT_OUTPUT_DIR = os.path.join("benchmarks", "results", "tmp")
# What --full changes: the teacher's steps and the validation set.
FULL = {"steps": 1200, "validation_windows": 256}
VARIANTS = ("favor", "window")


def compiled(model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate),
        loss=keras_favor.models.language_model_loss(),
    )
    return model


def bits_per_byte(model, validation, batch_size):
    """Validation cross-entropy in bits per byte (one token is one byte,
    and no target is padding)."""
    loss = model.evaluate(*validation, batch_size=batch_size, verbose=0)
    return loss / math.log(2.0)


def train_to(model, train, first_step, boundaries, args, verbose=0):
    """Fits `model` on the training batches from `first_step`, evaluating
    after each number of steps in `boundaries`.

    Returns:
        `[(steps, seconds, bits per byte)]`, the steps and training seconds
        (compilation included, evaluation left out) since `first_step`,
        and the median seconds of one step (compilation left out).
    """
    points, done, seconds = [], 0, 0.0
    timer = StepTimer()
    for boundary in boundaries:
        if boundary > done:
            begin = (first_step + done) * args.batch_size
            end = (first_step + boundary) * args.batch_size
            start = time.perf_counter()
            model.fit(
                train[0][begin:end],
                train[1][begin:end],
                batch_size=args.batch_size,
                epochs=1,
                shuffle=False,
                verbose=verbose,
                callbacks=[timer],
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
    return points, timer.median()


def build(args, attention, local_window=0):
    keras.utils.set_random_seed(args.seed)
    return keras_favor.build_performer(
        vocabulary_size=VOCABULARY_SIZE,
        max_length=args.max_length,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        hidden_dim=args.hidden_dim,
        intermediate_dim=args.intermediate_dim,
        num_features=args.num_features,
        seed=args.seed,
        task="language_model",
        attention=attention,
        local_window=local_window,
    )


def favor_arguments(args, variant):
    return {
        "num_features": args.num_features,
        "seed": args.seed,
        "local_window": args.local_window if variant == "window" else 0,
    }


def variant_name(args, variant):
    if variant == "window":
        return f"FAVOR+, window {args.local_window}"
    return "FAVOR+"


def convert_and_finetune(teacher, args, train, variant, transfer):
    """Converts `teacher`, optionally runs attention transfer, then
    finetunes, evaluating after each of `args.finetune_steps` steps (and,
    without transfer, after `args.transfer_steps` more, so that the curve
    reaches the compute of every point with transfer).

    Returns:
        `[(steps, seconds, compute, bits per byte)]` from the conversion on
        (0 steps: right after the conversion, or after the transfer), and
        `transfer_attention`'s result (None without transfer).
        Seconds are wall-clock, the transfer's and every compilation
        included. Compute is in finetuning steps: the steps, plus the
        transfer's time (recording, and its steps times their median time)
        divided by the median finetuning step time of the same run, so
        that compilation, which a long run pays once, and the machine's
        load over the run, cancel.
    """
    student = convert.performerize(teacher, **favor_arguments(args, variant))
    compiled(student, args.finetune_learning_rate)
    seconds = transfer_seconds = 0.0
    boundaries = [0] + args.finetune_steps
    if transfer:
        # The teacher's inputs: the first training batches after its own.
        begin = args.steps * args.batch_size
        sample = train[0][begin : begin + args.transfer_sequences]
        result = transfer_attention(
            teacher,
            student,
            sample,
            steps=args.transfer_steps,
            batch_size=args.batch_size,
            learning_rate=args.transfer_learning_rate,
        )
        seconds = result["seconds"]
        transfer_seconds = (
            result["record_seconds"] + result["steps"] * result["step_seconds"]
        )
        print(
            f"  transfer: {result['steps']} steps, "
            f"{1000 * result['step_seconds']:.0f} ms/step, recording "
            f"{result['record_seconds']:.1f} s"
        )
        for path, before in result["mse_before"].items():
            print(
                f"  {path}: MSE against the teacher {before:.4g} -> "
                f"{result['mse_after'][path]:.4g}"
            )
    elif args.transfer_steps:
        boundaries.append(args.finetune_steps[-1] + args.transfer_steps)
    points, step_seconds = train_to(
        student, train, args.steps, boundaries, args
    )
    offset = transfer_seconds / step_seconds if transfer else 0.0
    print(
        f"  finetuning: {1000 * step_seconds:.0f} ms/step"
        + (
            f"; the transfer took as long as {offset:.1f} finetuning steps"
            if transfer
            else ""
        )
    )
    points = [(n, seconds + s, offset + n, bpb) for n, s, bpb in points]
    for n, s, c, bpb in points:
        print(
            f"  {n:5d} finetuning steps ({c:6.1f} steps of compute), "
            f"{s:6.1f} s: {bpb:.4f} bits/byte"
        )
    return points, result if transfer else None


def at_compute(points, compute):
    """The bits per byte of a recovery curve at `compute` (in finetuning
    steps), interpolated linearly between its points (None outside
    them)."""
    times = [c for _, _, c, _ in points]
    if not times[0] <= compute <= times[-1]:
        return None
    return float(np.interp(compute, times, [b for *_, b in points]))


def plot(rows, path, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    exact = next(r["bits_per_byte"] for r in rows if r["method"] == "exact")
    colors = dict(zip(VARIANTS, ("tab:blue", "tab:orange")))
    for axis, x_key, x_label in (
        (axes[0], "finetune_steps", "finetuning steps after conversion"),
        (
            axes[1],
            "compute_steps",
            "compute after conversion (finetuning steps, transfer included)",
        ),
    ):
        for variant in args.variants:
            color = colors[variant]
            name = variant_name(args, variant)
            for method, style, label in (
                ("converted", "-o", "converted, finetuned"),
                ("converted+transfer", "--s", "converted, transfer, finetuned"),
            ):
                points = [
                    r
                    for r in rows
                    if r["variant"] == variant and r["method"] == method
                ]
                if points:
                    axis.plot(
                        [r[x_key] for r in points],
                        [r["bits_per_byte"] for r in points],
                        style,
                        color=color,
                        label=f"{name}: {label}",
                        alpha=1.0 if method == "converted" else 0.7,
                    )
            scratch = next(
                r["bits_per_byte"]
                for r in rows
                if r["variant"] == variant
                and r["method"] == "scratch"
                and r["finetune_steps"] == 0
            )
            axis.axhline(
                scratch,
                color=color,
                linestyle=":",
                label=f"{name} from scratch, {args.steps} steps",
            )
        axis.axhline(
            exact,
            color="black",
            linestyle="-.",
            label=f"exact softmax, {args.steps} steps",
        )
        axis.axhline(
            1.05 * exact,
            color="gray",
            linestyle=":",
            linewidth=1,
            label="exact + 5 %",
        )
        axis.axvline(
            0.1 * args.steps,
            color="gray",
            linestyle="--",
            linewidth=1,
            label="10 % of the teacher's steps",
        )
        axis.set_xlabel(x_label)
        axis.set_ylabel("validation bits per byte")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(
        "Recovery of a converted byte-level language model (Python stdlib "
        f"source, context {args.max_length})"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows the defaults, except an unset one (its help says what unset
    means) and a switch's."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    add = parser.add_argument
    add(
        "--steps",
        type=int,
        default=400,
        help="training steps of the exact teacher (and of the Performers "
        "trained from scratch before their extra steps)",
    )
    add(
        "--finetune-steps",
        default=None,
        help="comma-separated finetuning step counts to evaluate at; "
        "unset: 1, 2.5, 5 and 10 %% of --steps",
    )
    add(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated attention variants: favor (plain FAVOR+), "
        "window (FAVOR+ with an exact local window)",
    )
    add(
        "--local-window",
        type=int,
        default=16,
        help="the window variant's local_window",
    )
    add(
        "--transfer-steps",
        type=int,
        default=None,
        help="attention transfer steps (unset: 5 %% of --steps; 0 skips "
        "the transfer)",
    )
    add(
        "--transfer-sequences",
        type=int,
        default=128,
        help="training sequences the teacher's attention is recorded on",
    )
    add(
        "--transfer-learning-rate",
        type=float,
        default=1e-3,
        help="Adam learning rate of the attention transfer",
    )
    add(
        "--full",
        action="store_true",
        help=f"the full size: {FULL['steps']} teacher steps and "
        f"{FULL['validation_windows']} validation windows, unless given",
    )
    example_utils.add_conversion_arguments(
        parser, DEFAULT_OUTPUT_DIR, intermediate_dim=128
    )
    args = parser.parse_args(argv)
    if args.full:
        example_utils.apply_full_size(args, argv, FULL)
    if args.finetune_steps is None:
        args.finetune_steps = sorted(
            {max(1, round(args.steps * f)) for f in (0.01, 0.025, 0.05, 0.1)}
        )
    else:
        args.finetune_steps = sorted(
            {int(n) for n in args.finetune_steps.split(",")}
        )
    if args.finetune_steps[0] < 1:
        parser.error("--finetune-steps must be positive")
    if args.transfer_steps is None:
        args.transfer_steps = max(1, round(args.steps / 20))
    args.variants = [v for v in args.variants.split(",") if v]
    for variant in args.variants:
        if variant not in VARIANTS:
            parser.error(
                f"--variants: {variant!r} is not one of {list(VARIANTS)}"
            )
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    os.makedirs(args.output_dir, exist_ok=True)
    train_tokens, validation_tokens, _ = load_corpus(
        args.corpus_bytes, args.validation_every, args.seed
    )
    rng = np.random.default_rng(args.seed)
    total_steps = args.steps + args.finetune_steps[-1]
    # Finetuning without transfer runs `transfer_steps` further.
    train = next_token_pairs(
        random_windows(
            train_tokens,
            (total_steps + args.transfer_steps) * args.batch_size,
            args.max_length + 1,
            rng,
        )
    )
    args.validation = next_token_pairs(
        random_windows(
            validation_tokens, args.validation_windows, args.max_length + 1, rng
        )
    )
    print(
        f"Corpus: {len(train_tokens):,} training and "
        f"{len(validation_tokens):,} validation bytes of stdlib source. "
        f"Load average {os.getloadavg()[0]:.1f}."
    )
    rows = []

    def add(variant, method, steps, seconds, compute, bpb, total):
        # Compute in finetuning steps (see convert_and_finetune).
        rows.append(
            {
                "variant": variant,
                "method": method,
                "finetune_steps": steps,
                "total_steps": total,
                "seconds": round(seconds, 2),
                "compute_steps": round(compute, 2),
                "bits_per_byte": round(bpb, 4),
            }
        )

    print(f"\nExact softmax teacher, {args.steps} steps:")
    teacher = compiled(build(args, "exact"), args.learning_rate)
    [(_, seconds, exact)], step_seconds = train_to(
        teacher, train, 0, [args.steps], args, verbose=1
    )
    print(
        f"  (a) before conversion: {exact:.4f} bits/byte ({seconds:.0f} s, "
        f"{1000 * step_seconds:.0f} ms/step)"
    )
    add("exact", "exact", 0, seconds, args.steps, exact, args.steps)
    curves, transfers = {}, {}
    for variant in args.variants:
        name = variant_name(args, variant)
        methods = [("converted", False)]
        if args.transfer_steps:
            methods.append(("converted+transfer", True))
        for method, transfer in methods:
            print(f"\n{name}: {method}")
            points, result = convert_and_finetune(
                teacher, args, train, variant, transfer
            )
            curves[variant, method] = points
            if result:
                transfers[variant] = result
            for n, s, c, bpb in points:
                add(variant, method, n, s, c, bpb, args.steps + n)
        print(f"\n{name} from scratch, {total_steps} steps:")
        scratch = compiled(
            build(
                args, "favor", favor_arguments(args, variant)["local_window"]
            ),
            args.learning_rate,
        )
        points, step_seconds = train_to(
            scratch,
            train,
            0,
            [args.steps] + [args.steps + n for n in args.finetune_steps],
            args,
            verbose=1,
        )
        print(f"  {1000 * step_seconds:.0f} ms/step")
        for n, s, bpb in points:
            print(f"  {n:5d} steps: {bpb:.4f} bits/byte")
            add(variant, "scratch", n - args.steps, s, n, bpb, n)

    csv_path = os.path.join(args.output_dir, "convert_pretrained.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    png_path = os.path.join(args.output_dir, "convert_pretrained.png")
    plot(rows, png_path, args)
    summary = summarize(args, rows, curves, exact)
    print(f"\nWrote {csv_path} and {png_path}.")
    print(
        f"Total time: {time.perf_counter() - start:.0f} s, load average "
        f"{os.getloadavg()[0]:.1f}."
    )
    return {
        "rows": rows,
        "summary": summary,
        "transfers": transfers,
        "teacher": teacher,
        "validation": args.validation,
        "csv": csv_path,
        "png": png_path,
    }


def summarize(args, rows, curves, exact):
    """Prints the table of bits per byte and the checks of the targets."""

    def bpb(variant, method, steps):
        return next(
            (
                r["bits_per_byte"]
                for r in rows
                if r["variant"] == variant
                and r["method"] == method
                and r["finetune_steps"] == steps
            ),
            None,
        )

    def compute_of(variant, method, steps):
        return next(
            r["compute_steps"]
            for r in rows
            if r["variant"] == variant
            and r["method"] == method
            and r["finetune_steps"] == steps
        )

    print(
        f"\nValidation bits per byte (lower is better). (a) exact softmax "
        f"after {args.steps} steps: {exact:.4f}. Finetuning steps N after "
        "the conversion; compute: since the conversion, in finetuning "
        "steps (the transfer's time over the median finetuning step time "
        f"of its run); from scratch: the same settings after {args.steps} "
        "+ N steps; 'plain at equal compute': finetuning without transfer "
        "at the compute of the transfer row, interpolated."
    )
    headers = [
        "variant",
        "N",
        "finetuned",
        "transfer+finetuned",
        "compute",
        "plain at equal compute",
        "from scratch",
        "finetuned vs exact",
    ]
    table = []
    summary = {}
    for variant in args.variants:
        plain = curves[variant, "converted"]
        transferred = curves.get((variant, "converted+transfer"))
        for n in [0] + args.finetune_steps:
            row = [
                variant_name(args, variant),
                str(n),
                f"{bpb(variant, 'converted', n):.4f}",
            ]
            if transferred:
                compute = compute_of(variant, "converted+transfer", n)
                equal = at_compute(plain, compute)
                row += [
                    f"{bpb(variant, 'converted+transfer', n):.4f}",
                    f"{compute:.1f}",
                    "-" if equal is None else f"{equal:.4f}",
                ]
            else:
                row += ["-", "-", "-"]
            scratch = bpb(variant, "scratch", n)
            row += [
                f"{scratch:.4f}",
                f"{bpb(variant, 'converted', n) / exact - 1:+.1%}",
            ]
            table.append(row)
        scratch = bpb(variant, "scratch", 0)
        reached = [
            n
            for n in args.finetune_steps
            if bpb(variant, "converted", n) <= scratch
        ]
        final = bpb(variant, "converted", args.finetune_steps[-1])
        compared = []
        if transferred:
            for n, _, c, t_bpb in transferred:
                equal = at_compute(plain, c)
                if equal is not None:
                    compared.append((n, t_bpb, equal))
        summary[variant] = {
            "transfer_vs_plain": compared,
            "right_after": bpb(variant, "converted", 0),
            "final": final,
            "scratch": scratch,
            "first_n_at_scratch": reached[0] if reached else None,
            "final_vs_exact": final / exact - 1,
        }
    print_table(headers, table)
    for variant, s in summary.items():
        name = variant_name(args, variant)
        if s["transfer_vs_plain"]:
            better = sum(t < p for _, t, p in s["transfer_vs_plain"])
            print(
                f"{name}: with transfer lower than without at equal compute "
                f"at {better} of {len(s['transfer_vs_plain'])} points "
                "("
                + ", ".join(
                    f"N={n}: {t:.4f} vs {p:.4f}"
                    for n, t, p in s["transfer_vs_plain"]
                )
                + ")."
            )
        print(
            f"{name}: after {args.finetune_steps[-1]} finetuning steps "
            f"({args.finetune_steps[-1] / args.steps:.0%} of the teacher's): "
            f"{s['final']:.4f}, {s['final_vs_exact']:+.1%} against exact "
            f"(target within +5 %: "
            f"{'met' if s['final_vs_exact'] <= 0.05 else 'not met'}); "
            f"from scratch after {args.steps} steps {s['scratch']:.4f}, "
            "reached after "
            + (
                f"{s['first_n_at_scratch']} steps"
                if s["first_n_at_scratch"]
                else "none of the measured steps"
            )
            + "."
        )
    return summary


if __name__ == "__main__":
    main()
