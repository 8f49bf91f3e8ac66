"""Protein language models and a protein classifier: Performer variants
against exact attention on real sequences.

The sequences are the labelled protein sets that `aaanalysis` ships
(SEQ_SOLUBLE, SEQ_CAPSID, SEQ_TAIL; `pip install keras-favor[data]`), one
token per amino acid. Each distinct sequence goes to one split, by a hash of
the sequence, so no sequence is in two splits; the numbers are on the
validation split, which no model trains on. Three tasks, as in the
Performer paper's protein experiments (Choromanski et al., 2021, on
TrEMBL):

- `mlm`: a bidirectional masked language model. 15 % of each sequence's
  residues are replaced by a mask token; the model predicts them. Reported:
  accuracy and perplexity on the masked residues.
- `causal`: a unidirectional language model. Reported: next-residue
  accuracy and perplexity.
- `classify`: a bidirectional sequence classifier on one labelled set
  (default `capsid`: capsid proteins against others) at the sequences' full
  length (up to 2,512 residues), against exact attention.

Every attention of `--attentions` trains the same model (same weights at
the start, same batches) for the same steps, for each seed: `exact`
(softmax `MultiHeadAttention`), `softmax` (FAVOR+), `relu` (Performer-ReLU),
`favor++` (FAVOR++) and `window` (FAVOR+ with exact softmax attention over
the `--window` nearest positions). Each model is evaluated at `--eval-points`
evenly spaced steps. The equal-steps table reads the last evaluation; the
equal-time table reads every model of a task and seed at the training time
of its fastest model, interpolated between evaluations. Training time is the
wall clock of the training steps after the first (which traces the step);
the evaluations are left out.

Batches group sequences of similar length and are padded to their longest;
language-model sequences are cut to `--max-length` residues.

The defaults take 14 minutes on 2 idle CPU cores (837 s measured), and are
far too short for the language models to learn more than residue
frequencies (the classifiers do learn);
`--full` trains larger models for 4,000 steps on 3 seeds (many hours on a
CPU; meant for an accelerator).
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
    "softmax": ("FAVOR+ (softmax)", dict(feature_map="softmax")),
    "relu": ("Performer-ReLU", dict(feature_map="relu")),
    "favor++": ("FAVOR++", dict(feature_map="favor++")),
    "window": ("FAVOR+ + exact window", dict(feature_map="softmax")),
}
TASKS = ("mlm", "causal", "classify")
TASK_NAMES = {
    "mlm": "masked LM",
    "causal": "causal LM",
    "classify": "classification",
}
VOCABULARY_SIZE = len(bio_data.PROTEIN_VOCABULARY)
FULL = dict(
    steps=4000,
    num_layers=4,
    num_heads=8,
    hidden_dim=256,
    intermediate_dim=1024,
    num_features=128,
    batch_size=32,
    seeds=[0, 1, 2],
    eval_sequences=2000,
    classify_steps=3000,
)


def split_sequences(sets):
    """Every distinct sequence of the protein sets `sets`, by split.

    Returns:
        A dict from split name to `(sequences, labels)`, labels an int32
        array (the label of a sequence's first row).
    """
    splits = {name: ([], []) for name in ("train", "validation", "test")}
    seen = set()
    for name in sets:
        sequences, labels = bio_data.load_proteins(name)
        for sequence, label in zip(sequences, labels):
            if sequence in seen:
                continue
            seen.add(sequence)
            split = splits[bio_data.sequence_split(sequence)]
            split[0].append(sequence)
            split[1].append(label)
    return {
        name: (sequences, np.asarray(labels, np.int32))
        for name, (sequences, labels) in splits.items()
    }


def length_batches(lengths, batch_size, rng):
    """Index batches of sequences of similar length, in random order."""
    order = np.lexsort((rng.random(len(lengths)), lengths))
    batches = [
        order[start : start + batch_size]
        for start in range(0, len(order), batch_size)
    ]
    rng.shuffle(batches)
    return batches


def pad(token_lists, multiple=8):
    """`(N, T)` int32 token ids padded with 0, T a multiple of `multiple`."""
    width = max(len(tokens) for tokens in token_lists)
    width = -(-width // multiple) * multiple
    out = np.zeros((len(token_lists), width), np.int32)
    for row, tokens in enumerate(token_lists):
        out[row, : len(tokens)] = tokens
    return out


def mask_residues(tokens, rate, rng):
    """The masked language model's `(inputs, targets)` of padded tokens.

    Each residue is picked with probability `rate` (at least one per
    sequence) and replaced by the mask token; the targets are the picked
    residues, and 0 (ignored by the loss) everywhere else.
    """
    residues = tokens != bio_data.PAD
    picked = (rng.random(tokens.shape) < rate) & residues
    # A sequence with nothing picked gets its first residue picked.
    picked[~picked.any(axis=1), 0] = True
    inputs = np.where(picked, bio_data.MASK, tokens).astype(np.int32)
    targets = np.where(picked, tokens, 0).astype(np.int32)
    return inputs, targets


def make_batch(task, token_lists, labels, rate, rng):
    """The `(inputs, targets)` of one batch for `task`."""
    tokens = pad(token_lists)
    if task == "mlm":
        return mask_residues(tokens, rate, rng)
    if task == "causal":
        return tokens[:, :-1], tokens[:, 1:]
    return tokens, labels


def task_data(task, split, args):
    """Token lists and labels of a split, cut to the task's length."""
    sequences, labels = split
    if task == "classify":
        limit = args.classify_max_length or None
    else:
        # The causal model reads max_length residues and predicts the next.
        limit = args.max_length + (task == "causal")
    return [bio_data.encode_protein(s)[:limit] for s in sequences], labels


def training_data(task, tokens, labels, args, seed):
    """Endless training batches, the same for every attention of a seed."""

    def batches():
        rng = np.random.default_rng([seed, TASKS.index(task)])
        lengths = np.array([len(t) for t in tokens])
        while True:
            for batch in length_batches(lengths, args.batch_size, rng):
                yield make_batch(
                    task,
                    [tokens[i] for i in batch],
                    labels[batch],
                    args.mask_rate,
                    rng,
                )

    spec = tf.TensorSpec((None, None), tf.int32)
    label_spec = tf.TensorSpec((None,), tf.int32)
    return tf.data.Dataset.from_generator(
        batches,
        output_signature=(spec, label_spec if task == "classify" else spec),
    ).prefetch(2)


def evaluation_batches(task, tokens, labels, args):
    """Fixed validation batches (fixed masks), sorted by length."""
    rng = np.random.default_rng(12345)
    count = min(args.eval_sequences, len(tokens))
    chosen = np.sort(rng.choice(len(tokens), count, replace=False))
    chosen = chosen[np.argsort([len(tokens[i]) for i in chosen], kind="stable")]
    return [
        make_batch(
            task, [tokens[i] for i in batch], labels[batch], args.mask_rate, rng
        )
        for batch in np.array_split(
            chosen, max(1, math.ceil(count / args.batch_size))
        )
    ]


def predictor(model):
    """`model`'s inference on token batches of any shape, traced once:
    `predict_on_batch` traces again for the second shape it sees, which
    costs seconds for a causal or windowed model."""
    return tf.function(
        lambda tokens: model(tokens, training=False),
        input_signature=[tf.TensorSpec((None, None), tf.int32)],
    )


def evaluate(predict, batches):
    """Accuracy and perplexity of the predictions whose target is not 0;
    for a classifier, the accuracy of the labels. `predict`: from token
    ids to logits."""
    correct = total = 0
    nats = 0.0
    for inputs, targets in batches:
        logits = np.asarray(predict(inputs), np.float64)
        if targets.ndim == 1:
            correct += int(np.sum(logits.argmax(-1) == targets))
            total += len(targets)
            continue
        logits = logits - logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(logits).sum(axis=-1))
        picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
        scored = targets != 0
        nats += float(np.sum((log_norm - picked)[scored]))
        correct += int(np.sum((logits.argmax(-1) == targets)[scored]))
        total += int(scored.sum())
    numbers = {"accuracy": correct / total}
    if batches[0][1].ndim > 1:
        numbers["perplexity"] = math.exp(nats / total)
    return numbers


def build(task, attention, args, max_length):
    """The model of `task` with `attention` (a key of ATTENTIONS)."""
    kwargs = {"attention": "favor", **ATTENTIONS[attention][1]}
    if attention == "window":
        kwargs["local_window"] = args.window
    if task == "causal":
        return build_model(
            args,
            vocabulary_size=VOCABULARY_SIZE,
            max_length=max_length,
            task="language_model",
            **kwargs,
        )
    if task == "classify":
        return build_model(
            args,
            vocabulary_size=VOCABULARY_SIZE,
            max_length=max_length,
            task="classification",
            num_classes=2,
            **kwargs,
        )
    encoder = build_model(
        args,
        vocabulary_size=VOCABULARY_SIZE,
        max_length=max_length,
        task="encoder",
        **kwargs,
    )
    logits = keras.layers.Dense(VOCABULARY_SIZE, name="residue_logits")(
        encoder.output
    )
    return keras.Model(encoder.input, logits)


def train_one(task, attention, seed, data, args):
    """Trains one model and returns its evaluations (one dict each)."""
    run_args = argparse.Namespace(**{**vars(args), "seed": seed})
    train_tokens, train_labels, batches, max_length = data
    label = f"{TASK_NAMES[task]}, {ATTENTIONS[attention][0]}, seed {seed}"
    model = build(task, attention, run_args, max_length)
    if task == "classify":
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        steps = args.classify_steps
        learning_rate = args.classify_learning_rate
    else:
        # Cross-entropy of the predictions whose target is not 0.
        loss = keras_favor.models.language_model_loss()
        steps = args.steps
        learning_rate = args.learning_rate
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate), loss=loss)
    predict = predictor(model)
    clock = TrainingClock(
        lambda m: evaluate(predict, batches),
        every_steps=max(1, steps // args.eval_points),
        evaluate_first=True,
        label=label,
    )
    model.fit(
        training_data(task, train_tokens, train_labels, args, seed),
        epochs=1,
        steps_per_epoch=steps,
        callbacks=[clock],
        verbose=0,
        # The batches are shuffled already; `fit` warns that it cannot.
        shuffle=False,
    )
    ms_per_step = 1000 * clock.median_step_s()
    return [
        {
            "task": task,
            "attention": attention,
            "seed": seed,
            **point,
            "ms_per_step": ms_per_step,
            "parameters": model.count_params(),
        }
        for point in clock.history
    ]


def at_time(points, seconds, key):
    """`key` at `seconds` of training, interpolated between evaluations;
    None before the first evaluation."""
    times = [p["seconds"] for p in points]
    if seconds < times[0]:
        return None
    return float(np.interp(seconds, times, [p[key] for p in points]))


def mean_spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.ptp(values) / 2:.3f}"


def summaries(rows, args):
    """The equal-steps and equal-time tables, as lists of dicts."""
    runs = {}
    for row in rows:
        key = (row["task"], row["attention"], row["seed"])
        runs.setdefault(key, []).append(row)
    tasks = [t for t in TASKS if any(k[0] == t for k in runs)]
    steps_table, time_table = [], []
    for task in tasks:
        seeds = sorted({k[2] for k in runs if k[0] == task})
        attentions = [a for a in ATTENTIONS if (task, a, seeds[0]) in runs]
        budget = {
            seed: min(runs[(task, a, seed)][-1]["seconds"] for a in attentions)
            for seed in seeds
        }
        for attention in attentions:
            finals = [runs[(task, attention, s)][-1] for s in seeds]
            name = ATTENTIONS[attention][0]
            steps_row = {
                "task": TASK_NAMES[task],
                "attention": name,
                "steps": finals[0]["step"],
                "accuracy": mean_spread([f["accuracy"] for f in finals]),
                "perplexity": mean_spread(
                    [f.get("perplexity") for f in finals]
                ),
                "ms/step": f"{np.mean([f['ms_per_step'] for f in finals]):.0f}",
                "train s": f"{np.mean([f['seconds'] for f in finals]):.0f}",
            }
            steps_table.append(steps_row)
            time_row = {
                "task": TASK_NAMES[task],
                "attention": name,
                "budget s": f"{np.mean(list(budget.values())):.0f}",
                "steps": mean_spread(
                    [
                        at_time(runs[(task, attention, s)], budget[s], "step")
                        for s in seeds
                    ]
                ).split(".")[0],
            }
            for key in ("accuracy", "perplexity"):
                if key in finals[0]:
                    time_row[key] = mean_spread(
                        [
                            at_time(runs[(task, attention, s)], budget[s], key)
                            for s in seeds
                        ]
                    )
                else:
                    time_row[key] = "-"
            time_table.append(time_row)
    return steps_table, time_table


def verdict(rows, args):
    """Plain sentences: does Performer-ReLU lead, does FAVOR+ match exact
    attention (within the seed-to-seed spread), per language model task."""
    lines = []
    for task in ("mlm", "causal"):
        finals = {}
        for row in rows:
            if row["task"] == task:
                finals.setdefault(row["attention"], {})[row["seed"]] = row
        if not finals:
            continue
        accuracy = {
            a: [r["accuracy"] for r in by_seed.values()]
            for a, by_seed in finals.items()
        }
        mean = {a: float(np.mean(v)) for a, v in accuracy.items()}
        spread = max(float(np.ptp(v)) for v in accuracy.values())
        name = TASK_NAMES[task]
        linear = [a for a in ("softmax", "relu", "favor++") if a in mean]
        noise = max(spread, 0.005)
        if "relu" in mean and len(linear) > 1:
            best = max(linear, key=mean.get)
            margin = mean["relu"] - max(mean[a] for a in linear if a != "relu")
            if best != "relu":
                lead = "does not lead"
            elif margin > noise:
                lead = "leads"
            else:
                lead = (
                    f"is ahead by {margin:.3f}, within the noise "
                    f"({noise:.3f}): no clear lead over"
                )
            lines.append(
                f"{name}: Performer-ReLU {lead}"
                + " the random-feature models at equal steps ("
                + ", ".join(f"{ATTENTIONS[a][0]} {mean[a]:.3f}" for a in linear)
                + ")."
            )
        if "softmax" in mean and "exact" in mean:
            gap = mean["softmax"] - mean["exact"]
            matches = abs(gap) <= noise
            lines.append(
                f"{name}: FAVOR+ {'matches' if matches else 'does not match'} "
                f"exact attention at equal steps: {mean['softmax']:.3f} "
                f"against {mean['exact']:.3f} ({gap:+.3f}; largest "
                f"seed-to-seed range {spread:.3f}; noise floor "
                f"{noise:.3f})."
            )
    return lines


def plot(rows, path, load):
    """Validation accuracy against steps and against training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    figure, axes = plt.subplots(
        2, len(tasks), figsize=(4.5 * len(tasks), 7), squeeze=False
    )
    for column, task in enumerate(tasks):
        for attention, (name, _) in ATTENTIONS.items():
            points = [
                r
                for r in rows
                if r["task"] == task and r["attention"] == attention
            ]
            if not points:
                continue
            for seed in sorted({r["seed"] for r in points}):
                mine = [r for r in points if r["seed"] == seed]
                style = dict(
                    color=f"C{list(ATTENTIONS).index(attention)}",
                    marker="o",
                    markersize=3,
                    label=name if seed == points[0]["seed"] else None,
                    alpha=1.0 if seed == points[0]["seed"] else 0.5,
                )
                for row, key in enumerate(("step", "seconds")):
                    axes[row][column].plot(
                        [r[key] for r in mine],
                        [r["accuracy"] for r in mine],
                        **style,
                    )
        axes[0][column].set_title(TASK_NAMES[task])
        axes[0][column].set_xlabel("training steps")
        axes[1][column].set_xlabel(f"training seconds ({load})")
        for row in range(2):
            axes[row][column].set_ylabel("validation accuracy")
            axes[row][column].grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


CSV_FIELDS = (
    "task",
    "attention",
    "seed",
    "step",
    "seconds",
    "accuracy",
    "perplexity",
    "ms_per_step",
    "parameters",
)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(
        parser,
        steps=150,
        epochs=None,
        seed=None,
        batch_size=8,
        num_features=32,
        hidden_dim=64,
        intermediate_dim=128,
        num_heads=4,
        num_layers=2,
        learning_rate=3e-3,
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1],
        help="seeds of the weights, projections and batches",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=TASKS,
        default=list(TASKS),
        help="tasks to train",
    )
    parser.add_argument(
        "--attentions",
        nargs="+",
        choices=list(ATTENTIONS),
        default=list(ATTENTIONS),
        help="attentions of the language models",
    )
    parser.add_argument(
        "--causal-attentions",
        nargs="+",
        choices=list(ATTENTIONS),
        default=None,
        help="attentions of the causal language model; none given: those "
        "of --attentions",
    )
    parser.add_argument(
        "--classify-attentions",
        nargs="+",
        choices=list(ATTENTIONS),
        default=["exact", "softmax"],
        help="attentions of the classifier",
    )
    parser.add_argument(
        "--lm-sets",
        nargs="+",
        choices=list(bio_data.PROTEIN_SETS),
        default=list(bio_data.PROTEIN_SETS),
        help="aaanalysis sets the language models learn",
    )
    parser.add_argument(
        "--classify-set",
        choices=list(bio_data.PROTEIN_SETS),
        default="capsid",
        help="aaanalysis set to classify",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=1024,
        help="residues per language-model sequence (longer ones are cut)",
    )
    parser.add_argument(
        "--classify-max-length",
        type=int,
        default=0,
        help="residues per classified sequence; 0: the "
        "longest sequence, none cut",
    )
    parser.add_argument(
        "--classify-steps",
        type=int,
        default=150,
        help="training steps of each classifier",
    )
    parser.add_argument(
        "--classify-learning-rate",
        type=float,
        default=3e-4,
        help="AdamW learning rate of the classifiers (the language models "
        "take --learning-rate, at which a classifier stays at the majority "
        "class)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=16,
        help="exact-attention window of the `window` model",
    )
    parser.add_argument(
        "--mask-rate",
        type=float,
        default=0.15,
        help="share of residues the masked LM predicts",
    )
    parser.add_argument(
        "--eval-points", type=int, default=3, help="evaluations per training"
    )
    parser.add_argument(
        "--eval-sequences",
        type=int,
        default=96,
        help="validation sequences evaluated",
    )
    parser.add_argument(
        "--train-sequences",
        type=int,
        default=0,
        help="training sequences used; 0: all",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="the size worth publishing: "
        + ", ".join(f"{k}={v}" for k, v in FULL.items()),
    )
    parser.add_argument(
        "--csv", default=None, help="write every evaluation to this CSV file"
    )
    parser.add_argument(
        "--plot",
        default=None,
        help="draw the accuracy curves to this PNG file (needs matplotlib)",
    )
    args = parser.parse_args(argv)
    if args.full:
        for key, value in FULL.items():
            setattr(args, key, value)
    if not 0 < args.mask_rate < 1:
        parser.error("--mask-rate must be between 0 and 1")
    if args.max_length < 2:
        parser.error("--max-length must be at least 2")
    return args


def subset(split, count, seed):
    """At most `count` (0: all) sequences of a split, chosen at random."""
    sequences, labels = split
    if not count or count >= len(sequences):
        return split
    chosen = np.sort(
        np.random.default_rng(seed).choice(len(sequences), count, replace=False)
    )
    return [sequences[i] for i in chosen], labels[chosen]


def main(argv=None):
    args = parse_args(argv)
    load = load_note()
    start = time.perf_counter()
    rows = []
    for task in args.tasks:
        sets = [args.classify_set] if task == "classify" else args.lm_sets
        splits = split_sequences(sets)
        train = subset(splits["train"], args.train_sequences, 0)
        train_tokens, train_labels = task_data(task, train, args)
        val_tokens, val_labels = task_data(task, splits["validation"], args)
        batches = evaluation_batches(task, val_tokens, val_labels, args)
        # Batches are padded to a multiple of 8 tokens (see `pad`).
        max_length = -(-max(len(t) for t in train_tokens + val_tokens) // 8) * 8
        lengths = [len(s) for s in splits["train"][0]]
        print(
            f"\n{TASK_NAMES[task]} on {'+'.join(sets)}: "
            f"{len(train_tokens)} training sequences (median "
            f"{np.median(lengths):.0f}, longest {max(lengths)} residues), "
            f"{sum(len(b[0]) for b in batches)} validation sequences; "
            f"model length {max_length}.",
            flush=True,
        )
        if task == "classify":
            majority = np.bincount(train_labels).argmax()
            chance = float(
                np.mean(np.concatenate([b[1] for b in batches]) == majority)
            )
            print(f"  chance (majority class): {chance:.3f}")
        else:
            counts = np.bincount(
                np.concatenate(train_tokens), minlength=VOCABULARY_SIZE
            )
            print(
                f"  most frequent residue: {counts.max() / counts.sum():.3f}"
                " of the training residues"
            )
        data = (train_tokens, train_labels, batches, max_length)
        attentions = {
            "classify": args.classify_attentions,
            "causal": args.causal_attentions or args.attentions,
        }.get(task, args.attentions)
        for seed in args.seeds:
            for attention in attentions:
                rows += train_one(task, attention, seed, data, args)
    steps_table, time_table = summaries(rows, args)
    print("\nEqual steps (validation; mean ± half the range over seeds)")
    print_table(list(steps_table[0]), [list(r.values()) for r in steps_table])
    print(
        "\nEqual time: each model at the training time of the fastest of "
        f"its task and seed (interpolated; {load})"
    )
    print_table(list(time_table[0]), [list(r.values()) for r in time_table])
    finals = [
        r
        for r in rows
        if r
        is max(
            (
                q
                for q in rows
                if (q["task"], q["attention"], q["seed"])
                == (r["task"], r["attention"], r["seed"])
            ),
            key=lambda q: q["step"],
        )
    ]
    lines = verdict(finals, args)
    print("\n" + "\n".join(lines))
    print(f"Total time: {time.perf_counter() - start:.0f} s")
    if args.csv:
        with open(args.csv, "w", newline="") as file:
            writer = csv.DictWriter(file, CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    if args.plot:
        plot(rows, args.plot, load)
    return {
        "rows": rows,
        "equal_steps": steps_table,
        "equal_time": time_table,
        "verdict": lines,
    }


if __name__ == "__main__":
    main()
