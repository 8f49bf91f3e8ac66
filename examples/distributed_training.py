"""Train a Performer classifier with tf.distribute, FeatureRedraw and
BackupAndRestore.

On one machine, MirroredStrategy trains on every GPU present (or on the
CPU):

    python -m examples.distributed_training

On several machines (or several processes on one), set `TF_CONFIG` on each
worker and run the same command on each: the script then calls
`keras_favor.distribute.enable_multi_worker_fit()` and uses
MultiWorkerMirroredStrategy. Two workers on localhost:

    TF_CONFIG='{"cluster": {"worker": ["localhost:12345", "localhost:23456"]},
                "task": {"type": "worker", "index": 0}}' \\
        python -m examples.distributed_training &
    TF_CONFIG='{"cluster": {"worker": ["localhost:12345", "localhost:23456"]},
                "task": {"type": "worker", "index": 1}}' \\
        python -m examples.distributed_training

With TF_CONFIG set, every line the worker prints starts with its index,
`[worker 0] `, so that the logs of workers sharing a terminal stay apart.

Stop a run (Ctrl-C, or `--interrupt-after-epoch=1` to simulate a failure)
and start it again with the same command: BackupAndRestore resumes from the
last finished epoch, and FeatureRedraw continues its sequence of
projections exactly where the interrupted run left it.

The task: does a sequence of random tokens hold more 1s than 2s? The
answer needs attention across the whole sequence.
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from examples import example_utils  # noqa: F401 (imports TensorFlow quietly)

# isort: split
import keras
import tensorflow as tf

import keras_favor

VOCABULARY = 16
LENGTH = 64
DIM = 32


class Interrupted(Exception):
    pass


class InterruptAfterEpoch(keras.callbacks.Callback):
    """Stops training after an epoch, as a machine failure would."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise Interrupted(epoch + 1)


class ReportStart(keras.callbacks.Callback):
    """Prints where training starts: step 0, or where a backup left it."""

    def on_train_begin(self, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        print(f"Training starts at step {step}; {redraw_report(self.model)}")


def redraw_report(model):
    counts = [
        int(keras.ops.convert_to_numpy(layer.redraw_count))
        for layer in model.layers
        if isinstance(layer, keras_favor.FavorAttention)
    ]
    return f"redraw count per attention layer: {counts}"


class PrefixedLines:
    """A text stream that writes to `stream` with `prefix` at the start of
    every line.

    Args:
        stream: a text stream, such as `sys.stdout`.
        prefix: str, written before each line.
    """

    def __init__(self, stream, prefix):
        self.stream = stream
        self.prefix = prefix
        self._at_line_start = True

    def write(self, text):
        pieces = []
        for line in text.splitlines(keepends=True):
            if self._at_line_start:
                pieces.append(self.prefix)
            pieces.append(line)
            self._at_line_start = line.endswith(("\n", "\r"))
        self.stream.write("".join(pieces))
        return len(text)

    def __getattr__(self, name):
        # flush, fileno, isatty, encoding...: those of `stream`.
        return getattr(self.stream, name)


def prefix_output_with_worker():
    """Under TF_CONFIG, starts every line of this process's Python output
    (stdout and stderr) with `[worker i] `."""
    if "TF_CONFIG" not in os.environ:
        return
    prefix = f"[worker {worker_index()}] "
    sys.stdout = PrefixedLines(sys.stdout, prefix)
    sys.stderr = PrefixedLines(sys.stderr, prefix)


def make_strategy():
    """MultiWorkerMirroredStrategy when TF_CONFIG names a cluster, else
    MirroredStrategy over the local devices."""
    if "TF_CONFIG" in os.environ:
        # Stock Keras's `fit` fails under MultiWorkerMirroredStrategy
        # (keras-team/keras#20585); this patches it where needed.
        keras_favor.distribute.enable_multi_worker_fit()
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.MirroredStrategy()


def worker_index():
    if "TF_CONFIG" not in os.environ:
        return 0
    return json.loads(os.environ["TF_CONFIG"])["task"]["index"]


def make_dataset(num_examples, global_batch_size, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCABULARY, size=(num_examples, LENGTH))
    labels = (tokens == 1).sum(axis=1) > (tokens == 2).sum(axis=1)
    dataset = tf.data.Dataset.from_tensor_slices(
        (tokens.astype("int32"), labels.astype("float32"))
    )
    options = tf.data.Options()
    # In-memory data has no files to split between workers: shard batches.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    dataset = dataset.repeat().batch(global_batch_size, drop_remainder=True)
    return dataset.with_options(options)


def build_model(num_features, seed):
    inputs = keras.Input((LENGTH,), dtype="int32")
    x = keras.layers.Embedding(VOCABULARY, DIM)(inputs)
    for _ in range(2):
        attended = keras_favor.FavorAttention(
            num_heads=2, key_dim=DIM // 2, num_features=num_features, seed=seed
        )(x, x)
        x = keras.layers.LayerNormalization()(x + attended)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(1, activation="sigmoid")(x)
    return keras.Model(inputs, outputs)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=6, help="training epochs")
    parser.add_argument(
        "--steps-per-epoch",
        type=int,
        default=40,
        help="training steps per epoch",
    )
    parser.add_argument(
        "--batch-size-per-replica",
        type=int,
        default=32,
        help="sequences per step on each replica (the "
        "global batch is this times the replicas)",
    )
    parser.add_argument(
        "--num-features",
        type=int,
        default=32,
        help="random features per FAVOR+ attention",
    )
    parser.add_argument(
        "--redraw-interval",
        type=int,
        default=25,
        help="FeatureRedraw interval, in training steps",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed of the data, the weights and the projections",
    )
    parser.add_argument(
        "--backup-dir",
        default=os.path.join(tempfile.gettempdir(), "keras_favor_backup"),
        help="BackupAndRestore's directory; each worker writes its own "
        "subdirectory",
    )
    parser.add_argument(
        "--interrupt-after-epoch",
        type=int,
        default=0,
        help="stop with an error after this epoch, as a "
        "failure would (0: never)",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    prefix_output_with_worker()
    keras.utils.set_random_seed(args.seed)
    strategy = make_strategy()
    print(f"{strategy.num_replicas_in_sync} replica(s) in sync")
    global_batch_size = args.batch_size_per_replica * (
        strategy.num_replicas_in_sync
    )
    with strategy.scope():
        model = build_model(args.num_features, args.seed)
        model.compile(
            optimizer=keras.optimizers.Adam(3e-3),
            loss="binary_crossentropy",
            metrics=["accuracy"],
        )
    # Workers write their own backups (their weights are identical).
    backup_dir = os.path.join(args.backup_dir, f"worker_{worker_index()}")
    callbacks = [
        keras_favor.FeatureRedraw(
            interval=args.redraw_interval, seed=args.seed, verbose=1
        ),
        keras.callbacks.BackupAndRestore(backup_dir),
        ReportStart(),
    ]
    if args.interrupt_after_epoch:
        callbacks.append(InterruptAfterEpoch(args.interrupt_after_epoch))
    try:
        model.fit(
            make_dataset(4096, global_batch_size, args.seed),
            epochs=args.epochs,
            steps_per_epoch=args.steps_per_epoch,
            validation_data=make_dataset(512, global_batch_size, args.seed + 1),
            validation_steps=4,
            callbacks=callbacks,
            # A tf.data pipeline: `fit` would warn that it cannot shuffle.
            shuffle=False,
            verbose=2,
        )
    except Interrupted as stop:
        print(
            f"Interrupted after epoch {stop}. Run the same command again "
            "to resume from the backup."
        )
        return
    print(f"Done; {redraw_report(model)}")


if __name__ == "__main__":
    main()
