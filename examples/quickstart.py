"""Quickstart: a byte-level Performer language model on real text.

Trains a small causal Performer (FAVOR+ attention) on the Python standard
library's source files, with `keras_favor.FeatureRedraw` redrawing the random
features during `fit`, and beside it the identical model with exact softmax
attention (`keras.layers.MultiHeadAttention`) for the same steps on the same
batches. It reports validation bits per byte for both, exports the Performer
as a SavedModel, reloads it, checks that it predicts what the model predicts,
generates a continuation of a prompt with the decoding cache
(`keras_favor.generate`) and the same from the SavedModel's `generate`
endpoint, and ends with a summary table.

Run `make demo`, or `python examples/quickstart.py --help` for the flags that
set the size and the time. The defaults finish within 10 minutes on 2 CPU
cores.
"""

import argparse
import math
import os
import pathlib
import random
import sys
import sysconfig
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from example_utils import ATTENTION_NAMES  # noqa: E402
from example_utils import add_model_arguments  # noqa: E402
from example_utils import build_model  # noqa: E402
from example_utils import print_table  # noqa: E402
from example_utils import timed_fit  # noqa: E402

import keras_favor  # noqa: E402

# Bytes 0..255 are tokens 1..256; token 0 is padding.
VOCABULARY_SIZE = 257
SKIPPED_DIRECTORIES = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_source_files(seed):
    """The standard library's `.py` files, in a fixed shuffled order."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(
        path
        for path in root.rglob("*.py")
        if not SKIPPED_DIRECTORIES & set(path.relative_to(root).parts)
    )
    random.Random(seed).shuffle(paths)
    return paths


def load_corpus(max_bytes, validation_every, seed):
    """Byte tokens of the stdlib sources, split by file.

    Every `validation_every`-th file (in a seeded shuffle of the sorted
    paths) goes to the validation split, the others to training, until
    `max_bytes` have been read.

    Returns:
        `(train_tokens, validation_tokens, num_files)`, int32 arrays.
    """
    splits = ([], [])
    total = 0
    paths = stdlib_source_files(seed)
    for index, path in enumerate(paths):
        if total >= max_bytes:
            break
        data = path.read_bytes()[: max_bytes - total]
        splits[index % validation_every == 0].append(data)
        total += len(data)
    train, validation = (
        np.frombuffer(b"".join(parts), np.uint8).astype(np.int32) + 1
        for parts in splits
    )
    return train, validation, index


def random_windows(tokens, count, length, rng):
    """`count` windows of `length` consecutive tokens at random offsets."""
    starts = rng.integers(0, len(tokens) - length, size=count)
    return np.stack([tokens[s : s + length] for s in starts])


def next_token_pairs(windows):
    """Inputs and next-token targets of `(N, T + 1)` windows."""
    return windows[:, :-1], windows[:, 1:]


def bits_per_byte(y_true, y_pred):
    """Cross-entropy in bits: each token is one byte. (The windows are cut
    from the corpus, so no target is padding and this is the loss in bits.)"""
    loss = keras.losses.sparse_categorical_crossentropy(
        y_true, y_pred, from_logits=True
    )
    return loss / math.log(2.0)


def compile_model(model, args):
    model.compile(
        optimizer=keras.optimizers.AdamW(args.learning_rate),
        # The next-token cross-entropy over the non-padding targets.
        loss=keras_favor.models.language_model_loss(),
        metrics=[bits_per_byte],
    )


def datasets(args):
    corpus = load_corpus(args.corpus_bytes, args.validation_every, args.seed)
    train_tokens, validation_tokens, num_files = corpus
    rng = np.random.default_rng(args.seed)
    length = args.max_length + 1
    train = next_token_pairs(
        random_windows(train_tokens, args.steps * args.batch_size, length, rng)
    )
    validation = next_token_pairs(
        random_windows(validation_tokens, args.validation_windows, length, rng)
    )
    print(
        f"Corpus: {num_files} stdlib files, {len(train_tokens):,} training "
        f"and {len(validation_tokens):,} validation bytes."
    )
    train_data = (
        tf.data.Dataset.from_tensor_slices(train)
        .batch(args.batch_size, drop_remainder=True)
        .repeat()
    )
    validation_data = tf.data.Dataset.from_tensor_slices(validation).batch(
        args.batch_size
    )
    return train_data, validation_data, validation


def train(attention, args, train_data, validation_data):
    """Builds, trains and evaluates one model; returns it and its results."""
    print(f"\n{ATTENTION_NAMES[attention]} attention:")
    model = build_model(
        args,
        attention,
        vocabulary_size=VOCABULARY_SIZE,
        max_length=args.max_length,
        task="language_model",
    )
    compile_model(model, args)
    callbacks = []
    if attention == "favor":
        callbacks.append(
            keras_favor.FeatureRedraw(
                interval=args.redraw_interval, seed=args.seed
            )
        )
    seconds = timed_fit(model, train_data, validation_data, args, callbacks)
    results = model.evaluate(validation_data, verbose=0, return_dict=True)
    return model, {
        "model": ATTENTION_NAMES[attention],
        "parameters": f"{model.count_params():,}",
        "train s": f"{seconds:.0f}",
        "ms/step": f"{1000 * seconds / args.steps:.0f}",
        "val bits/byte": f"{results['bits_per_byte']:.3f}",
    }


def export_and_reload(model, export_dir, check_inputs, temperature):
    """Exports `model` as a SavedModel that serves logits and generates
    (`keras_favor.generation.export_language_model`), reloads it and
    compares its logits with the model's.

    Returns:
        The reloaded SavedModel and the largest absolute difference between
        its logits and `model.predict`'s on `check_inputs`.
    """
    keras_favor.generation.export_language_model(
        model, export_dir, sampler="random", temperature=temperature
    )
    reloaded = tf.saved_model.load(export_dir)
    difference = np.max(
        np.abs(
            reloaded.serve(tf.constant(check_inputs)).numpy()
            - model.predict(check_inputs, verbose=0)
        )
    )
    return reloaded, difference


def prompt_tokens(prompt):
    """`prompt` as a `(1, length)` batch of byte tokens (byte + 1)."""
    return (np.frombuffer(prompt.encode("utf-8"), np.uint8) + 1)[None].astype(
        np.int32
    )


def continuation_text(tokens, prompt_length):
    """The generated bytes of `(1, length)` tokens as printable text."""
    generated = bytes(max(int(t) - 1, 0) for t in tokens[0, prompt_length:])
    return printable(generated.decode("utf-8", errors="replace"))


def generate(model, served, prompt, num_bytes, temperature, seed):
    """Samples a continuation of `prompt` with the decoding cache
    (`keras_favor.generate`), and again from the SavedModel's `generate`
    endpoint with the same seed.

    Returns:
        The continuation and whether the SavedModel generated the same.
    """
    tokens = prompt_tokens(prompt)
    generated = keras_favor.generate(
        model, tokens, num_bytes, sampler="random", temperature=temperature,
        seed=seed,
    )
    served_tokens = served.generate(
        tf.constant(tokens), tf.constant(num_bytes, tf.int32),
        tf.constant([seed, 0], tf.int64),
    ).numpy()
    same = bool(np.array_equal(served_tokens, generated))
    return continuation_text(generated, tokens.shape[1]), same


def printable(text):
    """`text` with control characters other than newline and tab as `?`."""
    return "".join(
        c if c.isprintable() or c in "\n\t" else "?" for c in text
    )


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(parser, steps=1000, epochs=4, batch_size=16)
    parser.add_argument("--max-length", type=int, default=128,
                        help="bytes per training sequence")
    parser.add_argument("--corpus-bytes", type=int, default=8_000_000,
                        help="how much of the stdlib to read")
    parser.add_argument("--validation-every", type=int, default=10,
                        help="every n-th file is held out for validation")
    parser.add_argument("--validation-windows", type=int, default=256,
                        help="held-out sequences to evaluate on")
    parser.add_argument("--redraw-interval", type=int, default=300,
                        help="FeatureRedraw interval, in training steps")
    parser.add_argument("--export-dir", default=None,
                        help="where to write the SavedModel (default: a "
                        "temporary directory)")
    parser.add_argument("--prompt", default="def ",
                        help="text the generated bytes continue")
    parser.add_argument("--generate-bytes", type=int, default=120,
                        help="bytes to generate (at most --max-length "
                        "minus the prompt's bytes: the learned positions)")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature of the generated bytes")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the exact-attention model")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    train_data, validation_data, validation = datasets(args)
    attentions = ["favor"] if args.no_baseline else ["favor", "exact"]
    rows, models = [], {}
    for attention in attentions:
        models[attention], row = train(
            attention, args, train_data, validation_data
        )
        rows.append(row)

    export_dir = args.export_dir or os.path.join(
        tempfile.mkdtemp(), "performer_lm"
    )
    print(f"\nExporting the Performer to {export_dir} and reloading it...")
    export_start = time.perf_counter()
    reloaded, difference = export_and_reload(
        models["favor"], export_dir, validation[0][: args.batch_size],
        args.temperature,
    )
    print(
        f"Exported and reloaded in {time.perf_counter() - export_start:.0f} "
        f"s. SavedModel vs model.predict: max |diff| {difference:.2e}"
    )
    num_bytes = min(
        args.generate_bytes, args.max_length - len(prompt_tokens(args.prompt)[0])
    )
    generate_start = time.perf_counter()
    continuation, served_same = generate(
        models["favor"], reloaded, args.prompt, num_bytes, args.temperature,
        args.seed,
    )
    print(
        f"\nPrompt and generated continuation: {num_bytes} bytes with the "
        "decoding cache, then again from the SavedModel's generate "
        f"endpoint with the same seed, which gave "
        f"{'the same' if served_same else 'DIFFERENT'} bytes "
        f"({time.perf_counter() - generate_start:.1f} s for both):\n"
        f"{args.prompt}{continuation}"
    )

    print("\nSummary (validation bits per byte: lower is better)")
    print_table(list(rows[0]), [list(row.values()) for row in rows])
    print(f"SavedModel: {export_dir}")
    print(f"Total time: {time.perf_counter() - start:.0f} s")
    return {"rows": rows, "export_dir": export_dir, "max_diff": difference,
            "served_same": served_same,
            "continuation": continuation}


if __name__ == "__main__":
    main()
