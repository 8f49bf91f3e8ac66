"""Quickstart: build, train, save and generate with a Performer.

A byte-level language model of the Python standard library's source, with
FAVOR+ attention: trained with feature redraws, saved, loaded back, and
sampled with its recurrent cache. Run from the repository root:

    python -m examples.quickstart    # about 2 minutes on 2 CPU cores
"""

import math
import os

import keras
import numpy as np

import keras_favor
from examples import corpus

LENGTH = 128  # bytes of context


def main(output_dir="quickstart_output", steps=300, batch_size=16):
    train, validation, _ = corpus.load_corpus(2_000_000, 10, seed=0)
    rng = np.random.default_rng(0)
    x, y = corpus.next_token_pairs(
        corpus.random_windows(train, steps * batch_size, LENGTH + 1, rng)
    )
    x_val, y_val = corpus.next_token_pairs(
        corpus.random_windows(validation, 64, LENGTH + 1, rng)
    )
    # 2 blocks of width 128 (defaults), 64 features, the 16 nearest exact.
    model = keras_favor.build_performer(
        corpus.VOCABULARY_SIZE,
        LENGTH,
        task="language_model",
        num_features=64,
        local_window=16,
        seed=0,
    )
    model.compile("adamw", keras_favor.models.language_model_loss())
    # A new random projection every `interval` steps, none near the end.
    redraw = keras_favor.FeatureRedraw(interval=max(steps // 3, 1), seed=1)
    model.fit(x, y, batch_size=batch_size, callbacks=[redraw], verbose=2)
    loss = model.evaluate(x_val, y_val, verbose=0)
    print(f"validation: {loss / math.log(2):.2f} bits per byte")

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "performer.keras")
    model.save(path)  # weights, projections and redraw counts
    restored = keras.saving.load_model(path)

    prompt = np.frombuffer(b"def ", np.uint8)[None].astype("int32") + 1
    tokens = keras_favor.generate(restored, prompt, 80, "random", seed=0)
    text = bytes(int(t) - 1 for t in tokens[0] if t).decode("utf-8", "replace")
    print(f"generated:\n{text}")
    return loss, text


if __name__ == "__main__":
    main()
