"""Quality and speed of the long-context language model, by configuration.

The byte-level language model of `examples/long_context_lm.py` (the standard
library's source, held-out files for validation, AdamW, the loss
`keras_favor.models.language_model_loss()`), built by
`keras_favor.build_performer`, is trained once per configuration of CONFIGS
and seed: for a seed every configuration starts from the same weights and
sees the same batches, and all are evaluated on the same held-out windows.
The steps are split over `--epochs` epochs of `fit`, as in examples/long_context_lm.py.

`ms_per_step` is the median wall time between the ends of consecutive
training batches, after the first `WARMUP_STEPS` (tracing); `train_s` is the
whole `fit`, tracing included. `redraw_steps` lists the steps after which
FeatureRedraw redrew the projections.

Writes `quality.csv` (one row per configuration and seed) and `quality.json`
(machine, versions, settings) to `--output-dir`, and prints the mean over
seeds of each configuration with its change against `--baseline`.

    python -m benchmarks.quality                        # 1,200 steps, 2 seeds
    python -m benchmarks.quality --configs favor favor_redraw --seeds 0 1 2
"""

import argparse
import dataclasses
import os
import statistics
import sys
import time

import keras
import numpy as np
import tensorflow as tf

import keras_favor
from benchmarks import common
from examples import corpus
from examples import example_utils
from examples import long_context_lm
from keras_favor.callbacks import feature_redraw

WARMUP_STEPS = 10


@dataclasses.dataclass(frozen=True)
class Config:
    """One model to train: `build_performer` arguments, and the arguments of
    a `FeatureRedraw` (its `interval` defaults to `--redraw-interval`), or
    None for no redraws."""

    description: str
    build: dict = dataclasses.field(default_factory=dict)
    redraw: dict = None


CONFIGS = {
    "exact": Config("exact softmax attention", {"attention": "exact"}),
    "favor": Config("FAVOR+, the initial projection throughout"),
    "favor_redraw": Config(
        "FAVOR+, FeatureRedraw, none in the last interval", redraw={}
    ),
    **{
        f"favor_window{w}": Config(
            f"FAVOR+, exact softmax over the last {w} positions",
            {"local_window": w},
        )
        for w in (16, 32, 64)
    },
    "favor_redraw_to_end": Config(
        "FAVOR+, FeatureRedraw(final_window=0): redraws up to the end",
        redraw={"final_window": 0},
    ),
}
FIELDS = (
    "config",
    "description",
    "seed",
    "steps",
    "context",
    "batch_size",
    "num_features",
    "parameters",
    "val_bits_per_byte",
    "ms_per_step",
    "train_s",
    "redraw_steps",
)


class StepRecorder(keras.callbacks.Callback):
    """Records the time after every training batch, and the steps after
    which the first FavorAttention's redraw count went up."""

    def __init__(self):
        super().__init__()
        self.times = []
        self.redraw_steps = []
        self._layer = None
        self._count = 0

    def on_train_begin(self, logs=None):
        layers = feature_redraw.favor_attention_layers(self.model)
        self._layer = next(iter(layers.values()), None)

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())
        if self._layer is None:
            return
        count = int(keras.ops.convert_to_numpy(self._layer.redraw_count))
        if count > self._count:
            step = keras.ops.convert_to_numpy(self.model.optimizer.iterations)
            self.redraw_steps.append(int(step))
        self._count = count

    def median_step_s(self):
        """The median time between batch ends after the warm-up steps (the
        first half of the steps in runs shorter than twice those)."""
        warmup = min(WARMUP_STEPS, len(self.times) // 2)
        gaps = np.diff(self.times[warmup:])
        return float(np.median(gaps)) if len(gaps) else float("nan")


def load_corpus(args):
    """The training and held-out byte tokens: the long-context example's split of the
    standard library by file, the same for every seed."""
    train_tokens, validation_tokens, num_files = corpus.load_corpus(
        args.corpus_bytes, args.validation_every, seed=0
    )
    print(
        f"Corpus: {num_files} stdlib files, {len(train_tokens):,} training "
        f"and {len(validation_tokens):,} validation bytes."
    )
    return train_tokens, validation_tokens


def training_data(tokens, seed, args):
    """`args.steps` batches of `(inputs, next tokens)` at random offsets."""
    windows = corpus.random_windows(
        tokens,
        args.steps * args.batch_size,
        args.context + 1,
        np.random.default_rng([1, seed]),
    )
    return (
        tf.data.Dataset.from_tensor_slices(corpus.next_token_pairs(windows))
        .batch(args.batch_size, drop_remainder=True)
        .repeat()
    )


def validation_data(tokens, args):
    """The held-out windows, the same for every seed and configuration."""
    windows = corpus.random_windows(
        tokens,
        args.validation_windows,
        args.context + 1,
        np.random.default_rng([2]),
    )
    return tf.data.Dataset.from_tensor_slices(
        corpus.next_token_pairs(windows)
    ).batch(args.batch_size)


def build(config, seed, args):
    """The compiled language model of `config`, its weights from `seed`."""
    build_kwargs = dict(config.build)
    attention = build_kwargs.pop("attention", "favor")
    model = example_utils.build_model(
        argparse.Namespace(**vars(args), seed=seed, dropout=0.0),
        attention,
        vocabulary_size=corpus.VOCABULARY_SIZE,
        max_length=args.context,
        task="language_model",
        **build_kwargs,
    )
    long_context_lm.compile_model(model, args)
    return model


def redraw_callbacks(config, seed, args):
    if config.redraw is None:
        return []
    redraw = dict({"interval": args.redraw_interval}, **config.redraw)
    return [keras_favor.FeatureRedraw(seed=seed, **redraw)]


def train_and_evaluate(name, seed, train, validation, args):
    """Trains configuration `name` from `seed`; returns its CSV row."""
    config = CONFIGS[name]
    model = build(config, seed, args)
    recorder = StepRecorder()
    start = time.perf_counter()
    model.fit(
        train,
        epochs=args.epochs,
        steps_per_epoch=args.steps // args.epochs,
        callbacks=redraw_callbacks(config, seed, args) + [recorder],
        shuffle=False,
        verbose=0,
    )
    train_s = time.perf_counter() - start
    results = model.evaluate(validation, verbose=0, return_dict=True)
    row = {
        "config": name,
        "description": config.description,
        "seed": seed,
        "steps": args.steps,
        "context": args.context,
        "batch_size": args.batch_size,
        "num_features": args.num_features,
        "parameters": model.count_params(),
        "val_bits_per_byte": round(results["bits_per_byte"], 4),
        "ms_per_step": round(1000 * recorder.median_step_s(), 1),
        "train_s": round(train_s, 1),
        "redraw_steps": " ".join(map(str, recorder.redraw_steps)),
    }
    print(
        f"{name:<20} seed {seed}: {row['val_bits_per_byte']:.3f} bits/byte, "
        f"{row['ms_per_step']} ms/step, redraws after steps "
        f"[{row['redraw_steps']}]",
        flush=True,
    )
    return row


def summary(rows, baseline):
    """A line per configuration: the mean over seeds and the mean change
    against `baseline` on the same seeds."""
    by_config = {}
    for row in rows:
        by_config.setdefault(row["config"], {})[row["seed"]] = row
    reference = by_config.get(baseline, {})
    table = []
    for name, runs in by_config.items():
        values = [r["val_bits_per_byte"] for r in runs.values()]
        changes = [
            100
            * (
                run["val_bits_per_byte"] / reference[seed]["val_bits_per_byte"]
                - 1
            )
            for seed, run in runs.items()
            if seed in reference
        ]
        ms_per_step = statistics.median(r["ms_per_step"] for r in runs.values())
        table.append(
            [
                name,
                f"{statistics.mean(values):.3f}",
                " ".join(f"{v:.3f}" for v in values),
                f"{statistics.mean(changes):+.1f} %" if changes else "",
                f"{ms_per_step:.0f}",
                next(iter(runs.values()))["redraw_steps"] or "-",
            ]
        )
    return table


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    flags = {
        "configs": (list(CONFIGS), "configurations to train (of CONFIGS)"),
        "seeds": (
            [0, 1],
            "seeds of the weights, projections, redraws and "
            "training batches; one run per configuration and seed",
        ),
        "steps": (1200, "training steps per run"),
        "epochs": (
            4,
            "epochs of `fit` the steps are split over (must divide --steps)",
        ),
        "context": (128, "bytes per training and validation sequence"),
        "batch_size": (16, "sequences per training step"),
        "num_layers": (2, "number of Performer blocks"),
        "num_heads": (4, "attention heads per block"),
        "hidden_dim": (128, "width of the embeddings and blocks"),
        "intermediate_dim": (128, "width of the feed-forward layers"),
        "num_features": (64, "random features per FAVOR+ attention"),
        "learning_rate": (1e-3, "AdamW learning rate"),
        "redraw_interval": (
            300,
            "FeatureRedraw interval of the redraw "
            "configurations, in training steps",
        ),
        "corpus_bytes": (8_000_000, "how much of the stdlib to read"),
        "validation_every": (10, "every n-th file is held out for validation"),
        "validation_windows": (512, "held-out sequences to evaluate on"),
        "baseline": ("favor", "configuration the changes are measured against"),
        "output_dir": (
            common.RESULTS_DIR,
            "where to write quality.csv and quality.json",
        ),
    }
    for name, (default, help_) in flags.items():
        many = isinstance(default, list)
        parser.add_argument(
            "--" + name.replace("_", "-"),
            default=default,
            type=type(default[0] if many else default),
            nargs="+" if many else None,
            choices=list(CONFIGS) if name in ("configs", "baseline") else None,
            help=help_,
        )
    args = parser.parse_args(argv)
    if args.steps % args.epochs:
        parser.error(
            f"--epochs must divide --steps. Received: --steps {args.steps} "
            f"--epochs {args.epochs}"
        )
    return args


def main(argv=None):
    args = parse_args(argv)
    train_tokens, validation_tokens = load_corpus(args)
    validation = validation_data(validation_tokens, args)
    rows = []
    for seed in args.seeds:
        train = training_data(train_tokens, seed, args)
        for name in args.configs:
            rows.append(train_and_evaluate(name, seed, train, validation, args))

    stem = os.path.join(args.output_dir, "quality")
    settings = {k: v for k, v in vars(args).items() if k != "output_dir"}
    common.write_environment(stem + ".json", common.describe(), settings)
    common.write_csv(stem + ".csv", FIELDS, rows)
    print(
        f"\nValidation bits per byte after {args.steps} steps (lower is "
        f"better), change against {args.baseline} on the same seeds:"
    )
    example_utils.print_table(
        [
            "config",
            "mean",
            "per seed",
            f"vs {args.baseline}",
            "ms/step",
            "redraw steps",
        ],
        summary(rows, args.baseline),
    )
    print(f"Wrote {stem}.csv and {stem}.json")
    return rows


def plot(csv_paths, png_path):
    """Validation bits per byte of each configuration (mean bar, one dot
    per seed), a panel per CSV written by `main`."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        1, len(csv_paths), figsize=(6 * len(csv_paths), 4.2), squeeze=False
    )
    for axis, path in zip(axes[0], csv_paths):
        with open(path, newline="") as file:
            rows = list(csv.DictReader(file))
        names = list(dict.fromkeys(row["config"] for row in rows))
        for i, name in enumerate(names):
            values = [
                float(r["val_bits_per_byte"])
                for r in rows
                if r["config"] == name
            ]
            axis.bar(
                i,
                np.mean(values),
                color="tab:blue" if name != "exact" else "tab:red",
                alpha=0.5,
                label="mean of the seeds" if i == len(names) - 1 else None,
            )
            axis.plot(
                [i] * len(values),
                values,
                "ko",
                markersize=3,
                label="one seed" if i == 0 else None,
            )
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
        low = min(float(r["val_bits_per_byte"]) for r in rows)
        high = max(float(r["val_bits_per_byte"]) for r in rows)
        axis.set_ylim(
            low - 0.2 * (high - low) - 0.01, high + 0.2 * (high - low) + 0.01
        )
        axis.set_ylabel("validation bits per byte (lower is better)")
        axis.set_title(
            f"context {rows[0]['context']} bytes, {rows[0]['steps']} steps",
            fontsize=10,
        )
        axis.grid(True, axis="y", alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(
        "Byte-level language model on the Python standard "
        "library's source (red: exact attention)",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(png_path, dpi=130)
    plt.close(figure)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--plot"]:
        plot(sys.argv[2:-1], sys.argv[-1])  # --plot CSV [CSV ...] PNG
    else:
        main()
