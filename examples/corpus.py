"""A byte-level text corpus: the Python standard library's source.

Every Python installation ships it, so the examples and benchmarks train
language models on real text without downloading anything. Bytes 0..255
are tokens 1..256 and token 0 is padding (`VOCABULARY_SIZE` = 257).
"""

import math
import pathlib
import random
import sysconfig

import numpy as np

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
    import keras

    loss = keras.losses.sparse_categorical_crossentropy(
        y_true, y_pred, from_logits=True
    )
    return loss / math.log(2.0)
