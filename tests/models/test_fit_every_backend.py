"""`build_performer` models on every backend: an XLA-compiled `fit` with
FeatureRedraw learns, redraws where it should and saves."""

import keras
import numpy as np
import pytest

import keras_favor
from keras_favor.callbacks.feature_redraw import favor_attention_layers

pytestmark = pytest.mark.backend_independent


def tokens_and_labels():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 20, size=(64, 12))
    tokens[::3, 9:] = 0
    return tokens, (tokens[:, 0] > 10).astype("int32")


@pytest.mark.integration
@pytest.mark.parametrize("task", ["classification", "language_model"])
def test_compiled_fit_with_redraws_learns_and_reloads(tmp_path, task):
    tokens, labels = tokens_and_labels()
    model = keras_favor.build_performer(
        vocabulary_size=20,
        max_length=12,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        num_features=8,
        task=task,
        dropout=0.1,
        seed=3,
        chunk_size=4,
    )
    if task == "classification":
        x, y = tokens, labels
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        x, y = tokens[:, :-1], tokens[:, 1:]
        loss = keras_favor.models.language_model_loss()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2), loss=loss, jit_compile=True
    )
    redraw = keras_favor.FeatureRedraw(interval=3, seed=1)
    history = model.fit(
        x, y, batch_size=16, epochs=4, verbose=0, callbacks=[redraw]
    )
    losses = history.history["loss"]
    assert model.jit_compile
    assert losses[-1] < losses[0], losses
    # 16 steps, a redraw every 3, none in the final window.
    counts = [
        int(keras.ops.convert_to_numpy(layer.redraw_count))
        for layer in favor_attention_layers(model).values()
    ]
    assert counts == [4]
    path = str(tmp_path / f"{task}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(outputs(loaded, x), outputs(model, x), atol=1e-6)


def outputs(model, x):
    """The model's inference outputs. On TensorFlow an eager call, which
    computes them without tracing and XLA-compiling a predict function per
    model (seconds each); on JAX, where an eager call runs, and compiles,
    op by op, `predict`."""
    if keras.backend.backend() == "tensorflow":
        return keras.ops.convert_to_numpy(model(x, training=False))
    return model.predict(x, verbose=0)
