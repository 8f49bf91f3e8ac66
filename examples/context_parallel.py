"""Context parallelism: one long sequence trained across 8 devices.

A byte-level causal language model of the Python standard library's
source, trained on windows of `--length` bytes whose positions are split
across the `sequence` axis of a `(batch, sequence)` device mesh: each
device holds `length / 8` positions and its share of the activations, and
the devices exchange only the attention states (docs/context_parallel.md).
On a machine without accelerators it runs on 8 emulated CPU devices; the
first steps are then repeated on one device, and the losses match. Run
from the repository root:

    python -m examples.context_parallel                 # a few minutes
    python -m examples.context_parallel --length 16384 --steps 20
"""

import argparse
import math
import os

DEVICES_FLAG = "--xla_force_host_platform_device_count"
if __name__ == "__main__":
    # Run as a script: JAX with emulated CPU devices, set before Keras and
    # JAX start (real accelerators, where present, are used instead).
    # Imported, it leaves the environment as it is.
    os.environ.setdefault("KERAS_BACKEND", "jax")
    if DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" {DEVICES_FLAG}=8"
        ).strip()

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_favor  # noqa: E402
from examples import corpus  # noqa: E402


def sequence_mesh_distribution(sequence_devices):
    """A Keras distribution whose mesh has a `sequence` axis: the batch is
    split over the `batch` axis, each sequence over `sequence`."""
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh(
        (len(devices) // sequence_devices, sequence_devices),
        ("batch", "sequence"),
        devices,
    )
    # No weight is sharded (an empty layout map): the weights are small,
    # the activations of long sequences are not.
    return keras.distribution.ModelParallel(
        layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="batch"
    )


def build_model(length, args):
    model = keras_favor.build_performer(
        corpus.VOCABULARY_SIZE,
        length,
        num_layers=2,
        num_heads=4,
        hidden_dim=args.hidden_dim,
        task="language_model",
        num_features=args.num_features,
        seed=0,
    )
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras_favor.models.language_model_loss(),
        jit_compile=True,
    )
    return model


def step_losses(model, x, y, batch_size):
    """Trains on `x, y` one batch per step; the loss of each step."""
    losses = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: losses.append(logs["loss"])
    )
    model.fit(
        x,
        y,
        batch_size=batch_size,
        shuffle=False,
        verbose=0,
        callbacks=[record],
    )
    return losses


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--length", type=int, default=4096, help="bytes per sequence")
    add("--steps", type=int, default=10, help="training steps")
    add("--batch-size", type=int, default=1, help="sequences per step")
    add("--sequence-devices", type=int, default=8, help="devices per sequence")
    add("--hidden-dim", type=int, default=64, help="model width")
    add("--num-features", type=int, default=64, help="random features")
    add(
        "--compare-steps",
        type=int,
        default=2,
        help="steps repeated on one device to compare the losses (0: none)",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if keras.backend.backend() != "jax":
        raise SystemExit("Run with KERAS_BACKEND=jax: sharding uses JAX.")
    corpus_bytes = max(4 * args.length * args.steps, 100_000)
    train, _, _ = corpus.load_corpus(corpus_bytes, 10, seed=0)
    rng = np.random.default_rng(0)
    x, y = corpus.next_token_pairs(
        corpus.random_windows(
            train, args.steps * args.batch_size, args.length + 1, rng
        )
    )
    share = math.ceil(args.length / args.sequence_devices)
    print(
        f"{len(keras.distribution.list_devices())} devices; each sequence of "
        f"{args.length} bytes split {args.sequence_devices} ways: {share} "
        "positions per device."
    )
    single = build_model(args.length, args)
    weights = single.get_weights()
    with sequence_mesh_distribution(args.sequence_devices).scope():
        sharded = build_model(args.length, args)
        sharded.set_weights(weights)
        losses = step_losses(sharded, x, y, args.batch_size)
    for step, loss in enumerate(losses, 1):
        print(f"step {step}: {loss / math.log(2):.3f} bits per byte")
    compared = args.compare_steps * args.batch_size
    gap = None
    if compared:
        reference = step_losses(
            single, x[:compared], y[:compared], args.batch_size
        )
        gap = max(abs(a - b) for a, b in zip(losses, reference))
        print(
            f"one device, first {len(reference)} steps: largest loss "
            f"difference {gap:.2e}"
        )
    return losses, gap


if __name__ == "__main__":
    main()
