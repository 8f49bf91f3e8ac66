"""FeatureRedraw under `keras.distribution.DataParallel` on JAX: each
redraw's projection is one value, replicated to every device, and the fit
is the one-device fit (the JAX pass's host shows 8 CPU devices,
tests/conftest.py)."""

import keras
import numpy as np
import pytest

import keras_favor
from keras_favor.callbacks.feature_redraw import favor_attention_layers

pytestmark = [pytest.mark.backend_independent, pytest.mark.jax_only]

# 64 sequences in batches of 16 for 2 epochs: 8 steps, redraws after
# steps 3 and 6.
STEPS, INTERVAL = 8, 3


class BatchLosses(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


def data():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 20, size=(64, 12))
    tokens[::3, 9:] = 0
    return tokens, (tokens[:, 0] > 10).astype("int32")


def fit(redraw):
    """Losses, redraw counts, projections (with their device shards) and
    weights of a compiled 8-step fit of a 2-block classifier."""
    keras.utils.set_random_seed(0)
    model = keras_favor.build_performer(
        vocabulary_size=20,
        max_length=12,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        num_features=8,
        seed=3,
        chunk_size=4,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    losses = BatchLosses()
    # Listed after the redraw, so that the losses are read after it.
    callbacks = [losses]
    if redraw:
        callbacks.insert(
            0,
            keras_favor.FeatureRedraw(
                interval=INTERVAL, seed=1, final_window=0
            ),
        )
    tokens, labels = data()
    model.fit(
        tokens,
        labels,
        batch_size=16,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    layers = favor_attention_layers(model).values()
    return {
        "losses": losses.losses,
        "redraw_counts": [
            int(keras.ops.convert_to_numpy(layer.redraw_count))
            for layer in layers
        ],
        "projections": [layer.projection.value for layer in layers],
        "weights": model.get_weights(),
    }


def test_feature_redraw_under_data_parallel_follows_one_device():
    import jax

    devices = jax.devices()[:2]
    assert len(devices) == 2
    with keras.distribution.DataParallel(devices=devices).scope():
        parallel = fit(redraw=True)
    single = fit(redraw=True)
    fixed = fit(redraw=False)
    assert parallel["redraw_counts"] == single["redraw_counts"] == [2, 2]
    assert fixed["redraw_counts"] == [0, 0]
    # Each projection: on both devices, the same value on each, the value
    # of the one-device fit, and not the value of a fit without redraws.
    for value, one, unredrawn in zip(
        parallel["projections"], single["projections"], fixed["projections"]
    ):
        assert value.sharding.is_fully_replicated
        shards = [np.asarray(s.data) for s in value.addressable_shards]
        assert len(shards) == 2
        for shard in shards:
            np.testing.assert_array_equal(shard, np.asarray(one))
        assert not np.array_equal(np.asarray(one), np.asarray(unredrawn))
    assert len(parallel["losses"]) == len(single["losses"]) == STEPS
    np.testing.assert_allclose(parallel["losses"], single["losses"], rtol=1e-5)
    # Before the first redraw the fits agree; from the step after it on
    # they train with other features.
    np.testing.assert_allclose(
        single["losses"][:INTERVAL], fixed["losses"][:INTERVAL], rtol=1e-6
    )
    assert all(
        abs(a - b) > 1e-6 * abs(b)
        for a, b in zip(single["losses"][INTERVAL:], fixed["losses"][INTERVAL:])
    )
    for a, b in zip(parallel["weights"], single["weights"]):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=0, atol=1e-4 * np.abs(b).max()
        )
