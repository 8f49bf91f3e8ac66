"""A bacterial chromosome as a causal nucleotide language model, at contexts
from 1,024 to 65,536 bases and beyond.

The chromosome of *Corynebacterium diphtheriae* NCTC 11397 (2,463,666
bases, shipped by `pyrodigal`; `pip install keras-favor[data]`) is read one
token per base. Its last `--validation-fraction` is held out; the models
train on random windows of the rest and are scored on the first
`--validation-bases` bases of the held-out region, cut into windows of the
model's context: the same bases for every context, in bits per base (2 bits
is a uniform guess over A, C, G, T).

At every context of `--contexts`, each attention trains for the same
wall-clock budget (`--budget` seconds, from the end of the first step, which
traces the step) on batches of the same number of bases
(`--tokens-per-batch`, so fewer windows per batch at longer contexts):

- `favor`: FAVOR+ (the Performer), linear in the context;
- `window`: FAVOR+ with exact softmax attention over the `--window` nearest
  bases;
- `exact`: softmax `MultiHeadAttention`, quadratic in the context, only
  where its attention matrices fit in `--exact-memory-gib` (an estimate
  printed for every context); the table marks where it stops.

For scale, the script also scores order-k Markov models (base counts after
every k-base context, add-one smoothing) fitted on the training region.

The defaults (one seed, 10 models of 60 s each) are sized for about 15
minutes on 2 idle CPU cores; on a shared machine at load 6 to 9 they took 28
minutes. `--full` trains a larger model for 10 minutes per context, to
131,072 bases, on two seeds (over 4 hours).
"""

import argparse
import csv
import math
import time

import numpy as np

# example_utils first: it imports TensorFlow without its start-up messages.
from examples.example_utils import TrainingClock
from examples.example_utils import add_model_arguments
from examples.example_utils import build_model
from examples.example_utils import load_note
from examples.example_utils import print_table

# isort: split

import keras
import tensorflow as tf

import keras_favor
from examples import bio_data

ATTENTIONS = {
    "exact": ("Exact softmax", dict(attention="exact")),
    "favor": ("FAVOR+", dict(attention="favor")),
    "window": ("FAVOR+ + exact window", dict(attention="favor")),
}
VOCABULARY_SIZE = len(bio_data.NUCLEOTIDE_VOCABULARY)
# Bytes of one attention-matrix entry kept per layer for training: the
# scores, their softmax and its gradient, float32.
EXACT_BYTES_PER_ENTRY = 3 * 4
MARKOV_ORDERS = (3, 6, 9)
FULL = dict(
    contexts=[1024, 4096, 16384, 65536, 131072],
    budget=600.0,
    num_layers=4,
    num_heads=4,
    hidden_dim=128,
    intermediate_dim=512,
    num_features=128,
    tokens_per_batch=65536,
    seeds=[0, 1],
    validation_bases=262144,
)


def exact_memory_gib(context, args):
    """Estimated memory of exact attention's matrices in one training step."""
    windows = max(1, args.tokens_per_batch // context)
    entries = windows * args.num_heads * context**2 * args.num_layers
    return entries * EXACT_BYTES_PER_ENTRY / 2**30


def split_chromosome(tokens, validation_fraction):
    """`(train, held_out)`: the chromosome before and after the cut."""
    cut = int(len(tokens) * (1 - validation_fraction))
    return tokens[:cut], tokens[cut:]


def training_data(train, context, args, seed):
    """Endless `(inputs, targets)` batches of random windows of the
    training region, the same for every attention of a seed and context."""
    windows = max(1, args.tokens_per_batch // context)

    def batches():
        rng = np.random.default_rng([seed, context])
        while True:
            starts = rng.integers(0, len(train) - context - 1, size=windows)
            chunk = np.stack([train[s : s + context + 1] for s in starts])
            yield chunk[:, :-1], chunk[:, 1:]

    spec = tf.TensorSpec((None, None), tf.int32)
    return tf.data.Dataset.from_generator(
        batches, output_signature=(spec, spec)
    ).prefetch(2)


def validation_windows(held_out, context, bases):
    """`(inputs, targets)`: the first `bases` held-out bases (a multiple of
    `context`) in consecutive windows of `context`."""
    count = bases // context
    inputs = held_out[: count * context].reshape(count, context)
    targets = held_out[1 : count * context + 1].reshape(count, context)
    return inputs, targets


def bits_per_base(model, inputs, targets, batch_size):
    """Mean cross-entropy of the next-base predictions, in bits."""
    total = 0.0
    for start in range(0, len(inputs), batch_size):
        logits = np.asarray(
            model.predict_on_batch(inputs[start : start + batch_size]),
            np.float64,
        )
        logits = logits - logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(logits).sum(axis=-1))
        picked = np.take_along_axis(
            logits, targets[start : start + batch_size, :, None], axis=-1
        )[..., 0]
        total += float(np.sum(log_norm - picked))
    return total / targets.size / math.log(2.0)


def markov_bits_per_base(train, held_out, order, bases):
    """Bits per base of an order-`order` Markov model with add-one
    smoothing, fitted on `train`, on the first `bases` held-out bases after
    the first `order` (non-ACGT letters count as T)."""

    def codes(tokens):
        digits = np.clip(tokens - 1, 0, 3).astype(np.int64)
        index = np.zeros(len(digits) - order, np.int64)
        for k in range(order + 1):
            index = index * 4 + digits[k : len(digits) - order + k]
        return index

    counts = np.bincount(codes(train), minlength=4 ** (order + 1))
    counts = counts.reshape(-1, 4) + 1.0
    probabilities = counts / counts.sum(axis=1, keepdims=True)
    test = codes(held_out[: bases + 1])
    return float(-np.mean(np.log2(probabilities.reshape(-1)[test])))


def train_one(attention, context, seed, train, held_out, args):
    """Trains one model for the budget; returns its row."""
    run_args = argparse.Namespace(**{**vars(args), "seed": seed})
    name = ATTENTIONS[attention][0]
    kwargs = dict(ATTENTIONS[attention][1])
    if attention == "window":
        kwargs["local_window"] = args.window
    memory_gib = exact_memory_gib(context, args)
    row = {
        "context": context,
        "attention": name,
        "seed": seed,
        "exact_memory_gib": round(memory_gib, 3),
    }
    if attention == "exact" and memory_gib > args.exact_memory_gib:
        print(
            f"  [{name}, context {context}] not trained: its attention "
            f"matrices need about {memory_gib:.1f} GiB, over "
            f"--exact-memory-gib {args.exact_memory_gib:g}",
            flush=True,
        )
        return {**row, "status": "does not fit"}
    model = build_model(
        run_args,
        vocabulary_size=VOCABULARY_SIZE,
        max_length=context,
        task="language_model",
        **kwargs,
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(args.learning_rate),
        loss=keras_favor.models.language_model_loss(),
    )
    validation = validation_windows(held_out, context, args.validation_bases)
    batch_size = max(1, args.tokens_per_batch // context)
    clock = TrainingClock(
        lambda m: {"bits_per_base": bits_per_base(m, *validation, batch_size)},
        budget_s=args.budget,
        label=f"{name}, context {context}, seed {seed}",
    )
    model.fit(
        training_data(train, context, args, seed),
        epochs=1,
        steps_per_epoch=args.max_steps,
        callbacks=[clock],
        verbose=0,
        # The windows are drawn at random already; `fit` warns that it
        # cannot shuffle a dataset.
        shuffle=False,
    )
    final = clock.history[-1]
    return {
        **row,
        "status": "trained",
        "steps": final["step"],
        "seconds": round(final["seconds"], 1),
        "first_step_s": round(clock.first_step_s, 1),
        "ms_per_step": round(1000 * clock.median_step_s(), 1),
        "bits_per_base": round(final["bits_per_base"], 4),
        "parameters": model.count_params(),
    }


def table(rows, args):
    """Bits per base by attention (rows) and context (columns)."""
    headers = ["attention"] + [f"{c:,}" for c in args.contexts]
    lines = []
    for attention in args.attentions:
        name = ATTENTIONS[attention][0]
        cells = [name]
        for context in args.contexts:
            mine = [
                r
                for r in rows
                if r["attention"] == name and r["context"] == context
            ]
            trained = [r["bits_per_base"] for r in mine if "bits_per_base" in r]
            if trained:
                steps = int(np.mean([r["steps"] for r in mine]))
                spread = (
                    f" ± {np.ptp(trained) / 2:.3f}" if len(trained) > 1 else ""
                )
                cells.append(f"{np.mean(trained):.3f}{spread} ({steps} st)")
            else:
                cells.append(
                    f"does not fit (~{mine[0]['exact_memory_gib']:.1f} GiB)"
                    if mine
                    else "-"
                )
        lines.append(cells)
    return headers, lines


def plot(rows, markov, path, load):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for index, (name, _) in enumerate(ATTENTIONS.values()):
        points = {}
        for row in rows:
            if row["attention"] == name and "bits_per_base" in row:
                points.setdefault(row["context"], []).append(
                    row["bits_per_base"]
                )
        if not points:
            continue
        contexts = sorted(points)
        axis.plot(
            contexts,
            [np.mean(points[c]) for c in contexts],
            marker="o",
            color=f"C{index}",
            label=name,
        )
        missing = sorted(
            r["context"]
            for r in rows
            if r["attention"] == name and r.get("status") == "does not fit"
        )
        if missing:
            axis.axvline(
                missing[0],
                color=f"C{index}",
                linestyle=":",
                label=f"{name}: does not fit from {missing[0]:,}",
            )
    for order, bits in markov.items():
        axis.axhline(bits, color="grey", linestyle="--", linewidth=0.8)
        axis.text(
            0.01,
            bits,
            f"order-{order} Markov",
            fontsize=7,
            color="grey",
            va="bottom",
            transform=axis.get_yaxis_transform(),
        )
    axis.set_xscale("log", base=2)
    axis.set_xlabel("context (bases)")
    axis.set_ylabel("held-out bits per base")
    axis.set_title(
        f"C. diphtheriae chromosome, equal training time per model\n({load})",
        fontsize=9,
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


CSV_FIELDS = (
    "context",
    "attention",
    "seed",
    "status",
    "steps",
    "seconds",
    "first_step_s",
    "ms_per_step",
    "bits_per_base",
    "exact_memory_gib",
    "parameters",
)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(
        parser,
        steps=None,
        epochs=None,
        seed=None,
        batch_size=None,
        num_layers=2,
        num_heads=2,
        hidden_dim=64,
        intermediate_dim=128,
        num_features=32,
        learning_rate=2e-3,
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="seeds of the weights, projections and windows",
    )
    parser.add_argument(
        "--contexts",
        type=int,
        nargs="+",
        default=[1024, 4096, 16384, 65536],
        help="context lengths in bases",
    )
    parser.add_argument(
        "--attentions",
        nargs="+",
        choices=list(ATTENTIONS),
        default=list(ATTENTIONS),
        help="attentions to train",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=60.0,
        help="training seconds per model and context",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=1_000_000,
        help="most training steps per model, whatever the budget",
    )
    parser.add_argument(
        "--tokens-per-batch",
        type=int,
        default=4096,
        help="bases per training batch (windows per batch: "
        "this over the context, at least 1)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=64,
        help="exact-attention window of the `window` model",
    )
    parser.add_argument(
        "--exact-memory-gib",
        type=float,
        default=4.0,
        help="train exact attention only where its "
        "attention matrices need at most this much memory",
    )
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=0.1,
        help="share of the chromosome held out, at its end",
    )
    parser.add_argument(
        "--validation-bases",
        type=int,
        default=65536,
        help="held-out bases scored (at least the longest context)",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="the size worth publishing: "
        + ", ".join(f"{k}={v}" for k, v in FULL.items()),
    )
    parser.add_argument(
        "--csv", default=None, help="write one row per model and context here"
    )
    parser.add_argument(
        "--plot",
        default=None,
        help="draw bits per base against context to this "
        "PNG file (needs matplotlib)",
    )
    args = parser.parse_args(argv)
    if args.full:
        for key, value in FULL.items():
            setattr(args, key, value)
    if not 0 < args.validation_fraction < 1:
        parser.error("--validation-fraction must be between 0 and 1")
    if args.validation_bases < max(args.contexts):
        parser.error("--validation-bases must be at least the longest context")
    if min(args.contexts) < 2:
        parser.error("--contexts must be at least 2")
    return args


def main(argv=None):
    args = parse_args(argv)
    load = load_note()
    start = time.perf_counter()
    tokens, description = bio_data.load_chromosome()
    train, held_out = split_chromosome(tokens, args.validation_fraction)
    if len(held_out) <= args.validation_bases:
        raise ValueError(
            f"--validation-bases ({args.validation_bases}) must be below the "
            f"held-out region's {len(held_out)} bases."
        )
    print(
        f"{description}: {len(tokens):,} bases; training on the first "
        f"{len(train):,}, scoring {args.validation_bases:,} of the last "
        f"{len(held_out):,}.",
        flush=True,
    )
    markov = {
        order: markov_bits_per_base(
            train, held_out, order, args.validation_bases
        )
        for order in MARKOV_ORDERS
    }
    print(
        "Order-k Markov models: "
        + ", ".join(f"k={k}: {bits:.3f}" for k, bits in markov.items())
        + " bits per base"
    )
    rows = []
    for seed in args.seeds:
        for context in args.contexts:
            for attention in args.attentions:
                rows.append(
                    train_one(attention, context, seed, train, held_out, args)
                )
    headers, lines = table(rows, args)
    print(
        f"\nHeld-out bits per base after {args.budget:g} s of training per "
        f"model (steps taken in brackets; {load}), "
        f"{args.tokens_per_batch:,} bases per batch"
    )
    print_table(headers, lines)
    print(f"Total time: {time.perf_counter() - start:.0f} s")
    if args.csv:
        with open(args.csv, "w", newline="") as file:
            writer = csv.DictWriter(file, CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    if args.plot:
        plot(rows, markov, args.plot, load)
    return {"rows": rows, "markov": markov, "table": (headers, lines)}


if __name__ == "__main__":
    main()
