"""Writes the `.keras` files and outputs that `test_compatibility.py` loads.

Run once with the release whose files must keep loading, from the
repository root:

    python tests/data/make_compatibility_files.py

Each model is tiny, its weights moved away from their initial values so
that a weight loaded into the wrong place changes the outputs.
"""

import os

import numpy as np

import keras_favor

HERE = os.path.dirname(os.path.abspath(__file__))
VOCABULARY_SIZE = 20
MAX_LENGTH = 12
MODELS = {
    "classifier_favor": dict(task="classification", num_classes=3),
    "classifier_relu_sequential": dict(
        task="classification",
        num_classes=3,
        feature_map="relu",
        projection="iid",
        api="sequential",
        normalize_first=False,
    ),
    "language_model_local_window": dict(
        task="language_model", local_window=4, chunk_size=4
    ),
    "language_model_exact": dict(task="language_model", attention="exact"),
}


def token_ids():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, VOCABULARY_SIZE, (3, MAX_LENGTH)).astype("int32")
    tokens[0, 9:] = 0
    return tokens


def main():
    rng = np.random.default_rng(1)
    outputs = {"token_ids": token_ids()}
    for name, options in MODELS.items():
        model = keras_favor.build_performer(
            vocabulary_size=VOCABULARY_SIZE,
            max_length=MAX_LENGTH,
            num_layers=2,
            num_heads=2,
            hidden_dim=8,
            intermediate_dim=16,
            num_features=8,
            seed=3,
            **options,
        )
        for weight in model.trainable_weights:
            weight.assign(
                weight + 0.1 * rng.normal(size=weight.shape).astype("float32")
            )
        model.save(os.path.join(HERE, f"{name}.keras"))
        outputs[name] = np.asarray(model(outputs["token_ids"]))
    np.savez(os.path.join(HERE, "compatibility_outputs.npz"), **outputs)


if __name__ == "__main__":
    main()
