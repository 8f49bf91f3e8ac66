"""Helpers shared by the examples: model flags, timed training, tables."""

import time

import keras

import keras_favor

ATTENTION_NAMES = {"favor": "Performer (FAVOR+)", "exact": "Exact softmax"}


def add_model_arguments(parser, **defaults):
    """Adds the model-size and training flags, with per-example defaults."""
    sizes = dict(
        num_layers=2,
        num_heads=4,
        hidden_dim=64,
        intermediate_dim=128,
        num_features=64,
        batch_size=16,
        steps=200,
        epochs=2,
        learning_rate=1e-3,
        dropout=0.0,
        seed=0,
    )
    sizes.update(defaults)
    helps = dict(
        num_layers="number of Performer blocks",
        num_heads="attention heads per block",
        hidden_dim="width of the embeddings and blocks",
        intermediate_dim="width of the feed-forward layers",
        num_features="random features per FAVOR+ attention",
        batch_size="sequences per training step",
        steps="training steps per model, split over the epochs",
        epochs="epochs (progress bars) the steps are split over",
        learning_rate="AdamW learning rate",
        dropout="dropout rate",
        seed="seed of the data, the weights and the projections",
    )
    for name, default in sizes.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=type(default),
            default=default,
            help=f"{helps[name]} (default: {default})",
        )
    return parser


def build_model(args, attention, **kwargs):
    """`keras_favor.build_performer` with the sizes from the flags."""
    keras.utils.set_random_seed(args.seed)
    return keras_favor.build_performer(
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        hidden_dim=args.hidden_dim,
        intermediate_dim=args.intermediate_dim,
        num_features=args.num_features,
        dropout=args.dropout,
        seed=args.seed,
        attention=attention,
        **kwargs,
    )


def timed_fit(model, train_data, validation_data, args, callbacks=()):
    """Fits for `args.steps` steps over `args.epochs` epochs.

    Returns:
        The training time in seconds, compilation included.
    """
    epochs = max(1, min(args.epochs, args.steps))
    start = time.perf_counter()
    model.fit(
        train_data,
        epochs=epochs,
        steps_per_epoch=max(1, args.steps // epochs),
        validation_data=validation_data,
        callbacks=list(callbacks),
        verbose=1,
    )
    return time.perf_counter() - start


def print_table(headers, rows):
    """Prints rows of strings as a plain-text table."""
    widths = [
        max(len(str(row[i])) for row in [headers] + rows)
        for i in range(len(headers))
    ]

    def line(cells):
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))

    print(line(headers))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))
