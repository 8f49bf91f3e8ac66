"""Helpers shared by the examples: quiet start-up, model flags, timed
training, tables.

Importing this module imports TensorFlow with its start-up messages
silenced (see `import_tensorflow_quietly`), so an example imports it before
Keras.
"""

import contextlib
import os
import sys
import time


@contextlib.contextmanager
def stderr_to_devnull():
    """Sends file descriptor 2 to `/dev/null` inside the block.

    TensorFlow's C++ start-up messages (the CUDA probe on a machine without a
    GPU, "All log messages before absl::InitializeLog() is called are written
    to STDERR") are written before its log level applies, straight to the
    file descriptor, so `TF_CPP_MIN_LOG_LEVEL` cannot hide them.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tensorflow_quietly():
    """Imports TensorFlow and finds its devices without start-up noise.

    Sets `TF_CPP_MIN_LOG_LEVEL=2` (errors only) unless it is set, and
    `TF_ENABLE_ONEDNN_OPTS=0` unless it is set: TensorFlow 2.21's oneDNN
    batch matmul can corrupt the heap on CPU (docs/known_issues.md), and
    `make demo` and the tests run without it. The import and the first
    device query run with file descriptor 2 sent to `/dev/null`; a failed
    import still raises, with its traceback. Python's own log level for
    TensorFlow (`absl` and the `tensorflow` logger) is set to errors.

    Returns:
        The `tensorflow` module.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    with stderr_to_devnull():
        import tensorflow as tf

        tf.config.list_physical_devices()
    tf.get_logger().setLevel("ERROR")
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    return tf


import_tensorflow_quietly()

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_favor  # noqa: E402

ATTENTION_NAMES = {"favor": "Performer (FAVOR+)", "exact": "Exact softmax"}


def add_model_arguments(parser, **defaults):
    """Adds the model-size and training flags, with per-example defaults.

    A default of None leaves that flag out. The help texts do not state
    the defaults: the examples' parsers use
    `argparse.ArgumentDefaultsHelpFormatter`, which appends them.
    """
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
        num_layers="number of Transformer blocks",
        num_heads="attention heads per block",
        hidden_dim="width of the embeddings and blocks",
        intermediate_dim="width of the feed-forward layers",
        num_features="random features per FAVOR+ attention",
        batch_size="sequences per training step",
        steps="training steps per model, split over the epochs",
        epochs="epochs the steps are split over",
        learning_rate="AdamW learning rate",
        dropout="dropout rate",
        seed="seed of the data, the weights and the projections",
    )
    for name, default in sizes.items():
        if default is None:
            continue
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=type(default),
            default=default,
            help=helps[name],
        )
    return parser


def add_conversion_arguments(parser, output_dir, **defaults):
    """Adds the flags of the experiments that train a teacher on the
    standard-library corpus, convert it and finetune it: the model's size
    (`add_model_arguments`, the steps left to each example), the data and
    the finetuning's learning rate."""
    sizes = dict(steps=None, epochs=None, dropout=None)
    sizes.update(defaults)
    add_model_arguments(parser, **sizes)
    add = parser.add_argument
    add("--max-length", type=int, default=128, help="bytes per sequence")
    add(
        "--finetune-learning-rate",
        type=float,
        default=1e-3,
        help="AdamW learning rate of the finetuning",
    )
    add(
        "--corpus-bytes",
        type=int,
        default=8_000_000,
        help="how much of the stdlib source to read",
    )
    add(
        "--validation-every",
        type=int,
        default=10,
        help="every n-th file is held out for validation",
    )
    add(
        "--validation-windows",
        type=int,
        default=128,
        help="held-out sequences the bits per byte are measured on",
    )
    add("--output-dir", default=output_dir, help="where the results go")
    return parser


def apply_full_size(args, argv, full):
    """Sets each of `full`'s sizes on `args` unless its flag was given."""
    given = {a.split("=")[0] for a in (argv or sys.argv[1:])}
    for name, value in full.items():
        if "--" + name.replace("_", "-") not in given:
            setattr(args, name, value)


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
    """Fits for `args.steps` steps over `args.epochs` epochs, one line of
    progress per epoch.

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
        # The datasets are shuffled already; `fit` warns that it cannot.
        shuffle=False,
        verbose=2,
    )
    return time.perf_counter() - start


def load_note():
    """The machine's 1-minute load average now, for the label of a timing:
    on a 2-core machine a reading above 1.5 is a draft."""
    load = os.getloadavg()[0]
    kind = "a draft" if load >= 1.5 else "a quiet machine"
    return f"1-minute load {load:.2f} at the start: {kind}"


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


class StepTimer(keras.callbacks.Callback):
    """The wall time of every training batch, from its start to its end."""

    def __init__(self):
        super().__init__()
        self.seconds = []
        self._start = None

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)

    def median(self, warmup=1):
        """The median seconds of a step, the first `warmup` steps (which
        hold the compilation) left out unless no other step ran; NaN
        before any step."""
        steps = self.seconds[warmup:] or self.seconds
        return float(np.median(steps)) if steps else float("nan")


class TrainingClock(keras.callbacks.Callback):
    """Evaluates a model at chosen steps or seconds of training, on a clock
    that leaves out the tracing step and the evaluations.

    The clock starts when the first training step ends (that step traces
    and compiles the training step) and runs to the end of each later step;
    the time of each evaluation is taken off it. Every evaluation appends
    `{"step", "seconds", **evaluate(model)}` to `history`.

    Args:
        evaluate: callable from the model to a dict of numbers.
        every_steps: int or None, evaluate after every this many steps.
        budget_s: number or None, stop training after this many seconds
            on the clock.
        evaluate_first: bool, also evaluate after the first step, at 0 s
            on the clock.
        label: str, the model's name in the progress lines.

    Training ends with an evaluation unless the last step had one.
    """

    def __init__(
        self,
        evaluate,
        every_steps=None,
        budget_s=None,
        evaluate_first=False,
        label="",
    ):
        super().__init__()
        self.evaluate = evaluate
        self.every_steps = every_steps
        self.evaluate_first = evaluate_first
        self.budget_s = budget_s
        self.label = label
        self.history = []
        self.step_s = []
        self.first_step_s = None
        self._clock_start = None
        self._batch_start = None
        self._evaluation_s = 0.0

    @property
    def steps(self):
        return len(self.step_s) + (self.first_step_s is not None)

    def seconds(self, now=None):
        """Seconds on the clock at `now` (default: the time of the call)."""
        if self._clock_start is None:
            return 0.0
        now = time.perf_counter() if now is None else now
        return now - self._clock_start - self._evaluation_s

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if self.first_step_s is None:
            self.first_step_s = now - self._batch_start
            self._clock_start = now
        else:
            self.step_s.append(now - self._batch_start)
        out_of_time = (
            self.budget_s is not None and self.seconds(now) >= self.budget_s
        )
        if (
            out_of_time
            or (self.evaluate_first and self.steps == 1)
            or (self.every_steps and self.steps % self.every_steps == 0)
        ):
            self.run_evaluation(now)
        if out_of_time:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if not self.history or self.history[-1]["step"] != self.steps:
            self.run_evaluation(time.perf_counter())

    def run_evaluation(self, now):
        seconds = self.seconds(now)
        start = time.perf_counter()
        numbers = self.evaluate(self.model)
        self._evaluation_s += time.perf_counter() - start
        self.history.append({"step": self.steps, "seconds": seconds, **numbers})
        shown = ", ".join(f"{k} {v:.3f}" for k, v in numbers.items())
        print(
            f"  [{self.label}] step {self.steps:5d}, {seconds:6.1f} s: {shown}",
            flush=True,
        )

    def median_step_s(self):
        """The median seconds of a step after the first; NaN before."""
        return float(np.median(self.step_s)) if self.step_s else float("nan")
