"""Tiny models and data for the FeatureRedraw and tf.distribute tests, and a
script that trains them under a strategy in a fresh process.

    python tests/fit_script.py mirrored OUT_DIR
    python tests/fit_script.py multi_worker OUT_DIR  # with TF_CONFIG set

`mirrored` splits the CPU into two logical devices before TensorFlow
starts, imports keras_favor into a process that has only Keras and checks
what the import and `enable_multi_worker_fit` do to Keras, and that the
import loads no keras-hub (its summary's `keras_untouched`), puts Keras's
functions back and trains under MirroredStrategy.
Each mode writes `OUT_DIR/result.json` and `OUT_DIR/weights.npz`; the tests
read them.
"""

import json
import os
import sys

import keras
import numpy as np

LENGTH = 16
DIM = 8
NUM_FEATURES = 16
GLOBAL_BATCH = 16
NUM_EXAMPLES = 64
EPOCHS = 2
INTERVAL = 3
REDRAW_SEED = 11
LAYER_SEED = 5
WEIGHT_SEED = 3
COLLECTIVE_TIMEOUT_S = 60


def tiny_model(
    use_causal_mask=False, layer_seed=LAYER_SEED, attention_name="attention"
):
    """Attention, pooling and a dense head. Weights are drawn from
    `WEIGHT_SEED`, the initial projection from `layer_seed`."""
    import keras_favor

    keras.utils.set_random_seed(WEIGHT_SEED)
    inputs = keras.Input((LENGTH, DIM))
    x = keras_favor.FavorAttention(
        num_heads=2,
        key_dim=4,
        num_features=NUM_FEATURES,
        seed=layer_seed,
        chunk_size=8,
        name=attention_name,
    )(inputs, inputs, use_causal_mask=use_causal_mask)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(1)(x)
    return keras.Model(inputs, outputs)


def toy_data(num_examples=NUM_EXAMPLES):
    """`(x, y)` with `x` of shape `(n, LENGTH, DIM)`; `y` depends on `x`."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_examples, LENGTH, DIM)).astype("float32")
    y = (x[:, :, 0].mean(axis=1) + x[:, -1, 1])[:, None]
    return x, y.astype("float32")


def toy_dataset():
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices(toy_data()).batch(GLOBAL_BATCH)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return dataset.with_options(options)


def compile_model(model, **kwargs):
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", **kwargs)
    return model


class ReplicaRecorder(keras.callbacks.Callback):
    """After every training batch, records the attention layer's redraw
    count and whether every replica's copy of its projection is equal.
    (`variable.value` is the `tf.Variable` under the Keras variable: a
    `MirroredVariable` with one copy per local replica.)"""

    def __init__(self, strategy):
        super().__init__()
        self.strategy = strategy
        self.records = []

    def on_train_batch_end(self, batch, logs=None):
        layer = self.model.get_layer("attention")
        copies = [
            np.asarray(copy)
            for copy in self.strategy.experimental_local_results(
                layer.projection.value
            )
        ]
        self.records.append(
            {
                "step": int(np.asarray(self.model.optimizer.iterations)),
                "redraw_count": int(np.asarray(layer.redraw_count)),
                "num_copies": len(copies),
                "copies_equal": all(
                    np.array_equal(copies[0], copy) for copy in copies
                ),
                "projection_sum": float(copies[0].sum()),
            }
        )


def train_under(strategy):
    """Fits the tiny model with FeatureRedraw under `strategy`; returns the
    JSON-ready summary and the arrays to compare."""
    import keras_favor

    with strategy.scope():
        model = compile_model(tiny_model())
    recorder = ReplicaRecorder(strategy)
    history = model.fit(
        toy_dataset(),
        epochs=EPOCHS,
        verbose=0,
        callbacks=[
            # Redraws to the last step (no final window): the tests check
            # every redraw across replicas.
            keras_favor.FeatureRedraw(
                interval=INTERVAL, seed=REDRAW_SEED, final_window=0
            ),
            recorder,
        ],
    )
    layer = model.get_layer("attention")
    projection_before = np.asarray(layer.projection)
    evaluation = model.evaluate(toy_dataset(), verbose=0)
    predictions = model.predict(toy_dataset(), verbose=0)
    summary = {
        "num_replicas": strategy.num_replicas_in_sync,
        "records": recorder.records,
        "loss": history.history["loss"],
        "evaluate_loss": float(evaluation),
        "predict_shape": list(predictions.shape),
        "projection_kept_by_evaluate_and_predict": bool(
            np.array_equal(projection_before, np.asarray(layer.projection))
        ),
    }
    arrays = {f"weight_{i}": w for i, w in enumerate(model.get_weights())}
    arrays["projection"] = projection_before
    return summary, arrays


def fit_failure(strategy):
    """Fits a fresh tiny model; returns the error message, or None."""
    with strategy.scope():
        model = compile_model(tiny_model())
    try:
        model.fit(toy_dataset(), epochs=1, verbose=0)
    except Exception as error:  # noqa: BLE001 (any failure is the result)
        return f"{type(error).__name__}: {error}"[:2000]
    return None


def multi_worker_strategy():
    import tensorflow as tf

    return tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=COLLECTIVE_TIMEOUT_S
        )
    )


def run_mirrored():
    """Checks `import keras_favor` (`run_keras_untouched`), restores
    Keras's trainer functions, so that stock Keras trains, and fits under
    MirroredStrategy on two logical CPUs."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    stock = keras_trainer_functions()
    untouched = run_keras_untouched()
    restore_trainer_functions(stock)
    assert keras_trainer_functions() == stock
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    summary, arrays = train_under(tf.distribute.MirroredStrategy(devices))
    summary["keras_untouched"] = untouched
    return summary, arrays


def keras_trainer_functions():
    """The two functions of Keras's TensorFlow trainer that
    `enable_multi_worker_fit` patches, found without keras_favor."""
    [trainer] = [
        cls
        for cls in keras.Model.__mro__
        if cls.__name__ == "TensorFlowTrainer"
    ]
    return (
        vars(trainer)["_maybe_symbolic_build"],
        sys.modules[trainer.__module__].reduce_per_replica,
    )


def restore_trainer_functions(functions):
    """Puts back the functions `keras_trainer_functions()` returned."""
    [trainer] = [
        cls
        for cls in keras.Model.__mro__
        if cls.__name__ == "TensorFlowTrainer"
    ]
    trainer._maybe_symbolic_build = functions[0]
    sys.modules[trainer.__module__].reduce_per_replica = functions[1]


def run_keras_untouched():
    """Checks, in a fresh process that has not imported keras_favor, that
    `import keras_favor` leaves Keras's trainer functions as they are, and
    what two calls of `enable_multi_worker_fit` do to them, and that
    keras-hub, an extra, is loaded only through `keras_favor.keras_hub`
    (not by `keras_favor` or `performerize`); returns the JSON-ready
    summary."""
    stock = keras_trainer_functions()
    import keras_favor
    import keras_favor.convert

    keras_hub_imported = "keras_hub" in sys.modules
    imported = keras_trainer_functions()
    enabled = [keras_favor.distribute.enable_multi_worker_fit()]
    patched = keras_trainer_functions()
    enabled.append(keras_favor.distribute.enable_multi_worker_fit())
    summary = {
        "keras_hub_imported": keras_hub_imported,
        "unchanged_by_import": [a is b for a, b in zip(stock, imported)],
        "enable_results": enabled,
        "enabled": keras_favor.distribute.multi_worker_fit_enabled(),
        "patched_wraps_stock": [
            getattr(p, "_keras_favor_wrapped", None) is s
            for p, s in zip(patched, stock)
        ],
        "unchanged_by_second_call": [
            a is b for a, b in zip(patched, keras_trainer_functions())
        ],
    }
    return summary


def run_multi_worker():
    """Fits under MultiWorkerMirroredStrategy. First records how `fit`
    fails with stock Keras (`import keras_favor` changes nothing) and with
    only the symbolic-build half of the fix, then calls
    `enable_multi_worker_fit` and trains."""
    import keras_favor
    from keras_favor.distribute import multi_worker_fit

    strategy = multi_worker_strategy()
    summary = {
        "enabled_after_import": multi_worker_fit.multi_worker_fit_enabled(),
        "stock_error": fit_failure(strategy),
        "symbolic_build_fix_only_error": None,
    }
    if multi_worker_fit._keras_needs_fix():
        trainer = multi_worker_fit._tensorflow_trainer_class()
        stock_build = vars(trainer)["_maybe_symbolic_build"]
        trainer._maybe_symbolic_build = (
            multi_worker_fit._fixed_maybe_symbolic_build(stock_build)
        )
        summary["symbolic_build_fix_only_error"] = fit_failure(strategy)
        trainer._maybe_symbolic_build = stock_build
    summary["enable_result"] = keras_favor.distribute.enable_multi_worker_fit()
    trained, arrays = train_under(strategy)
    summary.update(trained)
    return summary, arrays


MODES = {"mirrored": run_mirrored, "multi_worker": run_multi_worker}


def main(mode, out_dir):
    summary, arrays = MODES[mode]()
    os.makedirs(out_dir, exist_ok=True)
    np.savez(os.path.join(out_dir, "weights.npz"), **arrays)
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(summary, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
