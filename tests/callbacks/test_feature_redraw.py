"""FeatureRedraw: when and what it redraws, no redraw in the final window
of a `fit`, determinism, the layers it finds and their pinned index paths,
and exact resume from `.keras` files, `tf.train.Checkpoint` and
`BackupAndRestore`."""

import keras
import numpy as np
import pytest

import keras_favor
from keras_favor import layer_tree
from keras_favor.callbacks.feature_redraw import favor_attention_layers
from keras_favor.convert.attention_paths import all_layers
from tests import fit_script

pytestmark = pytest.mark.backend_independent

BATCH = 8


def projection(model, name="attention"):
    return keras.ops.convert_to_numpy(model.get_layer(name).projection)


def redraw_count(layer):
    return int(keras.ops.convert_to_numpy(layer.redraw_count))


class CountRecorder(keras.callbacks.Callback):
    """Records `(optimizer step, redraw count)` after every training batch."""

    def __init__(self, layer_name="attention"):
        super().__init__()
        self.layer_name = layer_name
        self.records = []
        self.initial_count = 0

    def on_train_begin(self, logs=None):
        if not self.records:
            layer = self.model.get_layer(self.layer_name)
            self.initial_count = redraw_count(layer)

    def on_train_batch_end(self, batch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        layer = self.model.get_layer(self.layer_name)
        self.records.append((step, redraw_count(layer)))

    def redraw_steps(self):
        """The steps after which the redraw count went up."""
        counts = [self.initial_count] + [count for _, count in self.records]
        return [
            step
            for (step, _), before, after in zip(
                self.records, counts, counts[1:]
            )
            if after > before
        ]


class StopAfterEpoch(keras.callbacks.Callback):
    """Stops `fit` at the end of epoch `epochs` (counted from 1), as an
    interruption would, without changing the `epochs` that `fit` plans."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 >= self.epochs:
            self.model.stop_training = True


def fit(model, callbacks, epochs=1, initial_epoch=0, num_examples=32):
    x, y = fit_script.toy_data(num_examples)
    return model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=epochs,
        initial_epoch=initial_epoch,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )


def compiled_model(**kwargs):
    return fit_script.compile_model(fit_script.tiny_model(**kwargs))


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_redraws_every_interval_steps(steps_per_execution, capsys):
    model = fit_script.compile_model(
        fit_script.tiny_model(), steps_per_execution=steps_per_execution
    )
    initial = projection(model)
    recorder = CountRecorder()
    callback = keras_favor.FeatureRedraw(interval=3, verbose=1, final_window=0)
    fit(model, [callback, recorder], epochs=2)
    steps = [step for step, _ in recorder.records]
    assert steps == list(range(steps_per_execution, 9, steps_per_execution))
    # A redraw lands at the end of the batch that reaches (or, running
    # several steps per batch, passes) a multiple of 3.
    expected = {1: [0, 0, 1, 1, 1, 2, 2, 2], 2: [0, 1, 2, 2]}
    assert [count for _, count in recorder.records] == (
        expected[steps_per_execution]
    )
    assert not np.allclose(projection(model), initial)
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    redraw_steps = {1: (3, 6), 2: (4, 6)}[steps_per_execution]
    assert lines == [
        f"FeatureRedraw: step {step}, redrew the projection of 1 "
        "FavorAttention layer(s)."
        for step in redraw_steps
    ]


def test_never_redraws_in_evaluate_predict_or_validation():
    model = compiled_model()
    callback = keras_favor.FeatureRedraw(interval=1, seed=0, final_window=0)
    x, y = fit_script.toy_data(32)
    initial = projection(model)
    model.evaluate(x, y, batch_size=BATCH, verbose=0, callbacks=[callback])
    model.predict(x, batch_size=BATCH, verbose=0, callbacks=[callback])
    np.testing.assert_array_equal(projection(model), initial)
    model.fit(
        x,
        y,
        batch_size=BATCH,
        validation_data=(x, y),
        verbose=0,
        callbacks=[callback],
    )
    assert redraw_count(model.get_layer("attention")) == 32 // BATCH


@pytest.fixture(scope="module")
def final_window_models():
    """One compiled tiny model per `steps_per_execution`, shared by the
    cases of `test_no_redraw_in_the_final_window`: each case's `fit` plans
    its own end (see `test_each_fit_call_keeps_its_own_final_window`), so
    a case that starts where another ended sees the same schedule, shifted
    by its first step, and the model's train function is traced once."""
    models = {}

    def model_for(steps_per_execution):
        if steps_per_execution not in models:
            models[steps_per_execution] = fit_script.compile_model(
                fit_script.tiny_model(), steps_per_execution=steps_per_execution
            )
        return models[steps_per_execution]

    return model_for


# 2 epochs of 6 steps, a multiple of the interval 3: the redraws at steps
# 3, 6, 9 and 12 are due, and those within `final_window` steps of step 12
# are skipped. Running 2 steps at a time, the batches that pass a multiple
# of 3 end at steps 4, 6, 10 and 12. (Steps counted from the `fit`'s
# first; it starts at a multiple of 12, so at a multiple of 3.)
@pytest.mark.parametrize(
    "final_window, steps_per_execution, redraw_steps",
    [
        (None, 1, [3, 6, 9]),
        (3, 1, [3, 6, 9]),
        (5, 1, [3, 6]),
        (0, 1, [3, 6, 9, 12]),
        (None, 2, [4, 6]),
    ],
)
def test_no_redraw_in_the_final_window(
    final_window, steps_per_execution, redraw_steps, capsys, final_window_models
):
    model = final_window_models(steps_per_execution)
    start = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    assert start % 12 == 0
    recorder = CountRecorder()
    callback = keras_favor.FeatureRedraw(
        interval=3, seed=0, verbose=1, final_window=final_window
    )
    fit(model, [callback, recorder], epochs=2, num_examples=48)
    assert recorder.records[-1][0] == start + 12
    assert [step - start for step in recorder.redraw_steps()] == redraw_steps
    assert 12 - redraw_steps[-1] >= callback.window
    skipped = [
        line
        for line in capsys.readouterr().out.splitlines()
        if "no redraw" in line
    ]
    due = {1: [3, 6, 9, 12], 2: [4, 6, 10, 12]}[steps_per_execution]
    assert skipped == [
        f"FeatureRedraw: step {start + step}, no redraw: training ends at "
        f"step {start + 12}, within final_window={callback.window} steps."
        for step in due
        if step not in redraw_steps
    ]


def test_each_fit_call_keeps_its_own_final_window():
    """Two `fit` calls of 8 steps each (no `initial_epoch`): each plans its
    own end, steps 8 and 16."""
    model = compiled_model()
    recorder = CountRecorder()
    callback = keras_favor.FeatureRedraw(interval=3, seed=0)
    for _ in range(2):
        fit(model, [callback, recorder], epochs=2)
    assert recorder.records[-1][0] == 16
    assert recorder.redraw_steps() == [3, 9, 12]


def batches():
    """A generator of the toy data: `fit` does not know how many steps it
    makes."""
    x, y = fit_script.toy_data(32)
    for start in range(0, 32, BATCH):
        yield x[start : start + BATCH], y[start : start + BATCH]


def test_unknown_steps_per_epoch_warns_and_redraws_on_the_interval():
    model = compiled_model()
    recorder = CountRecorder()
    callback = keras_favor.FeatureRedraw(interval=2, seed=0)
    with pytest.warns(UserWarning, match="steps_per_epoch") as record:
        model.fit(batches(), verbose=0, callbacks=[callback, recorder])
    assert callback.params["steps"] is None
    assert len([w for w in record if "FeatureRedraw" in str(w.message)]) == 1
    assert recorder.redraw_steps() == [2, 4]

    # With `steps_per_epoch` the rule applies and nothing warns.
    import warnings

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.fit(
            batches(),
            steps_per_epoch=4,
            verbose=0,
            callbacks=[callback, recorder],
        )
    assert not [w for w in record if "FeatureRedraw" in str(w.message)]
    assert recorder.redraw_steps() == [2, 4, 6]


def redrawn_projection(callback, times=2, **model_kwargs):
    """The attention projection after `times` redraws by `callback` of a
    fresh tiny model."""
    model = fit_script.tiny_model(**model_kwargs)
    callback.set_model(model)
    for _ in range(times):
        callback.redraw()
    name = model_kwargs.get("attention_name", "attention")
    assert redraw_count(model.get_layer(name)) == times
    return projection(model, name)


def test_same_seeds_same_projections_regardless_of_layer_names():
    """The k-th redraw depends on the seed, the layer's place in the model
    and k only: a second model, whose layer has another name, gets the
    same projections; another callback seed or k gets others."""
    first = redrawn_projection(keras_favor.FeatureRedraw(seed=7))
    np.testing.assert_array_equal(
        first,
        redrawn_projection(
            keras_favor.FeatureRedraw(seed=7), attention_name="renamed"
        ),
    )
    for other in (
        redrawn_projection(keras_favor.FeatureRedraw(seed=8)),
        redrawn_projection(keras_favor.FeatureRedraw(seed=7), times=3),
    ):
        assert not np.allclose(first, other)


def test_seed_none_follows_the_initial_projection():
    """Without a seed, runs that start from the same projection agree (as
    replicas, workers and resumed runs do) and runs that start from
    different ones diverge."""
    callback = keras_favor.FeatureRedraw()
    first = redrawn_projection(callback, layer_seed=1)
    np.testing.assert_array_equal(
        first, redrawn_projection(callback, layer_seed=1)
    )
    assert not np.allclose(first, redrawn_projection(callback, layer_seed=2))


class AttentionWrapper(keras.layers.Layer):
    """A custom layer holding two FavorAttention layers, one frozen."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras_favor.FavorAttention(
            2, 4, num_features=8, seed=1, name="inner"
        )
        self.frozen = keras_favor.FavorAttention(
            2, 4, num_features=8, seed=1, name="frozen"
        )
        self.frozen.trainable = False

    def call(self, x):
        return self.inner(x, x) + self.frozen(x, x)


def nested_model():
    """FavorAttention at the top, inside a custom layer, inside a nested
    Sequential, shared at two places, and with the `elu` feature map."""
    shared = keras_favor.FavorAttention(2, 4, num_features=8, seed=1)
    nested = keras.Sequential(
        [
            keras.Input((fit_script.LENGTH, fit_script.DIM)),
            AttentionWrapper(name="wrapper"),
        ],
        name="nested",
    )
    inputs = keras.Input((fit_script.LENGTH, fit_script.DIM))
    x = keras_favor.FavorAttention(2, 4, num_features=8, seed=1)(inputs, inputs)
    x = nested(x)
    x = shared(x, x)
    x = shared(x, x)
    x = keras_favor.FavorAttention(2, 4, feature_map="elu")(x, x)
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, outputs)


def test_finds_nested_layers_and_keeps_frozen_ones_fixed():
    model = nested_model()
    layers = favor_attention_layers(model)
    names = [layer.name for layer in layers.values()]
    assert len(names) == len(set(names)) == 5  # the shared layer once
    nested_paths = [path for path in layers if path.count("/") == 2]
    assert [layers[p].name for p in nested_paths] == ["inner", "frozen"]

    frozen_path = nested_paths[1]
    [elu_path] = [p for p, layer in layers.items() if layer.projection is None]
    frozen = keras.ops.convert_to_numpy(layers[frozen_path].projection)
    callback = keras_favor.FeatureRedraw(seed=0)
    callback.set_model(model)
    redrawn = callback.redraw()
    assert sorted(redrawn) == sorted(set(layers) - {frozen_path, elu_path})
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(layers[frozen_path].projection), frozen
    )
    assert {layer.name: redraw_count(layer) for layer in layers.values()} == {
        layer.name: int(path in redrawn) for path, layer in layers.items()
    }
    # The four with a projection started from the same one; the three
    # redrawn ones now differ.
    drawn = {
        keras.ops.convert_to_numpy(layer.projection).tobytes()
        for layer in redrawn.values()
    }
    assert len(drawn) == 3


@keras.saving.register_keras_serializable(package="test_feature_redraw")
class AttentionBlock(keras.layers.Layer):
    """FavorAttention in a public attribute, a private one and a list, with
    other layers between them."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = keras.layers.LayerNormalization(name="norm")
        self.first = keras_favor.FavorAttention(
            2, 4, num_features=8, seed=1, name="first"
        )
        self._second = keras_favor.FavorAttention(
            2, 4, num_features=8, seed=1, name="second"
        )
        self.stack = [
            keras.layers.Dense(fit_script.DIM, name="stack_dense"),
            keras_favor.FavorAttention(
                2, 4, num_features=8, seed=1, name="listed"
            ),
        ]

    def build(self, input_shape):
        dense, attention = self.stack
        for layer in (self.norm, self.first, self._second, dense, attention):
            layer.build(input_shape)

    def call(self, x):
        x = self.norm(x)
        x = self.first(x, x) + self._second(x, x)
        dense, attention = self.stack
        return attention(dense(x), x)


def pinned_model():
    """A functional model holding FavorAttention at the top, shared at two
    places, and inside a custom layer inside a Sequential."""
    shape = (fit_script.LENGTH, fit_script.DIM)
    shared = keras_favor.FavorAttention(
        2, 4, num_features=8, seed=1, name="shared"
    )
    sequential = keras.Sequential(
        [
            keras.Input(shape),
            keras.layers.Dense(fit_script.DIM, name="sequential_dense"),
            AttentionBlock(name="block"),
        ],
        name="sequential",
    )
    inputs = keras.Input(shape)
    x = keras_favor.FavorAttention(2, 4, num_features=8, seed=1, name="top")(
        inputs, inputs
    )
    x = sequential(x)
    x = shared(x, x)
    x = shared(x, x)
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, outputs)


# The index paths of `pinned_model()`. The functional model's layers:
# 0 input, 1 top, 2 sequential, 3 shared (once), 4 pooling, 5 dense; the
# Sequential's: 0 sequential_dense, 1 block; the block's, in the order its
# attributes are assigned: 0 norm, 1 first, 2 second, 3 stack_dense,
# 4 listed. Changing any of them changes every seed of a redraw.
PINNED_PATHS = {
    "1": "top",
    "2/1/1": "first",
    "2/1/2": "second",
    "2/1/4": "listed",
    "3": "shared",
}


def layer_names(model):
    return {
        path: layer.name
        for path, layer in favor_attention_layers(model).items()
    }


def test_index_paths_are_pinned():
    assert layer_names(pinned_model()) == PINNED_PATHS


class Holder(keras.layers.Layer):
    """Sub-layers in an attribute, a tuple, a dict (one of them a second
    time, in a list) and a Sequential."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first = keras.layers.Dense(2, name="first")
        self.pair = (keras.layers.Dense(2, name="in_tuple"), 3)
        self.table = {
            "b": keras.layers.Dense(2, name="in_dict"),
            "a": [self.first],
        }
        self.inner = keras.Sequential(
            [keras.layers.Dense(2, name="in_sequential")], name="inner"
        )


def test_layer_tree_walks_attributes_containers_and_graphs():
    holder = Holder()
    # Keras's own attributes (its tracking of the same sub-layers) are not
    # children; the layer's are, in the order they were set.
    assert [name for name, _ in layer_tree.children(holder)] == [
        "first",
        "pair",
        "table",
        "inner",
    ]
    assert [layer.name for layer in layer_tree.sublayers(holder)] == [
        "first",
        "in_tuple",
        "in_dict",
        "inner",
    ]
    walk = layer_tree.depth_first(
        holder,
        lambda node: [
            (str(i), child)
            for i, child in enumerate(layer_tree.sublayers(node))
        ],
    )
    assert [(path, layer.name) for path, layer in walk] == [
        (("0",), "first"),
        (("1",), "in_tuple"),
        (("2",), "in_dict"),
        (("3",), "inner"),
        (("3", "0"), "in_sequential"),
    ]
    # performerize's walk names the same layers by attribute path.
    assert [(path, layer.name) for path, layer in all_layers(holder)] == [
        ("first", "first"),
        ("pair.0", "in_tuple"),
        ("table.b", "in_dict"),
        ("inner", "inner"),
        ("inner.in_sequential", "in_sequential"),
    ]


def test_redraw_and_convert_walks_find_the_same_layers():
    model = pinned_model()
    by_index = {
        id(layer)
        for _, layer in layer_tree.depth_first(
            model,
            lambda node: [
                (str(i), child)
                for i, child in enumerate(layer_tree.sublayers(node))
            ],
        )
    }
    assert by_index == {id(layer) for _, layer in all_layers(model)}


def test_index_paths_and_redraws_survive_a_keras_file(tmp_path):
    model = pinned_model()
    path = str(tmp_path / "pinned.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert layer_names(loaded) == PINNED_PATHS
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    projections = []
    for each in (model, loaded):
        callback = keras_favor.FeatureRedraw(seed=0)
        callback.set_model(each)
        redrawn = callback.redraw()
        assert sorted(redrawn) == sorted(PINNED_PATHS)
        projections.append(
            {
                path: keras.ops.convert_to_numpy(layer.projection)
                for path, layer in redrawn.items()
            }
        )
    original, reloaded = projections
    for path in PINNED_PATHS:
        np.testing.assert_array_equal(original[path], reloaded[path])
    # Layers at different paths got different projections.
    assert len({p.tobytes() for p in original.values()}) == len(PINNED_PATHS)


def test_subclass_can_choose_the_layers():
    class RedrawInnerOnly(keras_favor.FeatureRedraw):
        def layers_to_redraw(self):
            return {
                path: layer
                for path, layer in super().layers_to_redraw().items()
                if layer.name == "inner"
            }

    model = nested_model()
    callback = RedrawInnerOnly(seed=0)
    callback.set_model(model)
    redrawn = callback.redraw()
    assert [layer.name for layer in redrawn.values()] == ["inner"]
    counts = {
        layer.name: redraw_count(layer)
        for layer in favor_attention_layers(model).values()
    }
    assert counts.pop("inner") == 1
    assert set(counts.values()) == {0}


# Epoch ranges of an interrupted run of 4 epochs: 3 steps an epoch and a
# redraw due every 2 steps, so one interruption falls between redraws
# (step 3) and one on a redraw (step 6). The final window of 5 steps skips
# the redraws due at steps 8, 10 and 12, all after the last resume.
SEGMENTS = ((0, 1), (1, 2), (2, 4))
EPOCHS = SEGMENTS[-1][1]
REDRAW_STEPS = [2, 4, 6]


def redraw_callback():
    return keras_favor.FeatureRedraw(interval=2, seed=3, final_window=5)


def interrupted_and_resumed(resume):
    """Trains the SEGMENTS, each a `fit` of all EPOCHS from its first epoch
    stopped after its last; `resume(model)` returns the model to continue
    with after each interruption."""
    callback = redraw_callback()
    model = compiled_model()
    for index, (initial_epoch, stop) in enumerate(SEGMENTS):
        if index:
            model = resume(model)
        fit(
            model,
            [callback, StopAfterEpoch(stop)],
            EPOCHS,
            initial_epoch,
            num_examples=24,
        )
    return model


def uninterrupted():
    model = compiled_model()
    recorder = CountRecorder()
    fit(model, [redraw_callback(), recorder], epochs=EPOCHS, num_examples=24)
    assert recorder.records[-1][0] == 12
    assert recorder.redraw_steps() == REDRAW_STEPS
    return model


def assert_same_training(resumed, reference):
    layer = resumed.get_layer("attention")
    assert int(keras.ops.convert_to_numpy(resumed.optimizer.iterations)) == 12
    assert redraw_count(layer) == len(REDRAW_STEPS)
    np.testing.assert_array_equal(projection(resumed), projection(reference))
    for a, b in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def reference_run():
    keras.utils.set_random_seed(1234)
    return uninterrupted()


def test_resume_from_keras_file(tmp_path, reference_run):
    def resume(model):
        path = str(tmp_path / "model.keras")
        model.save(path)
        return keras.saving.load_model(path)

    assert_same_training(interrupted_and_resumed(resume), reference_run)


@pytest.mark.tensorflow_only(
    reason="tf.train.Checkpoint tracks TensorFlow objects only"
)
def test_resume_from_tf_train_checkpoint(tmp_path, reference_run):
    import tensorflow as tf

    def resume(model):
        prefix = tf.train.Checkpoint(
            model=model, optimizer=model.optimizer
        ).save(str(tmp_path / "ckpt"))
        fresh = compiled_model(layer_seed=None)
        fresh.optimizer.build(fresh.trainable_variables)
        tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer).restore(
            prefix
        ).assert_existing_objects_matched()
        return fresh

    assert_same_training(interrupted_and_resumed(resume), reference_run)


def test_resume_with_backup_and_restore(tmp_path, reference_run):
    """Runs stopped after each of the SEGMENTS, each restarted from scratch
    (new model, new callbacks) and restored by BackupAndRestore, end where
    the uninterrupted run does."""
    for index, (_, stop) in enumerate(SEGMENTS):
        # Restarted runs draw other initial projections: the backup
        # replaces them.
        model = compiled_model(
            layer_seed=None if index else fit_script.LAYER_SEED
        )
        backup = keras.callbacks.BackupAndRestore(
            str(tmp_path / "backup"), delete_checkpoint=False
        )
        callbacks = [redraw_callback(), backup, StopAfterEpoch(stop)]
        fit(model, callbacks, epochs=EPOCHS, num_examples=24)
    assert_same_training(model, reference_run)


@pytest.mark.parametrize("final_window, window", [(None, 50), (0, 0), (7, 7)])
def test_config_round_trip(final_window, window):
    callback = keras_favor.FeatureRedraw(
        interval=50, seed=4, verbose=1, final_window=final_window
    )
    config = keras.saving.serialize_keras_object(callback)
    restored = keras.saving.deserialize_keras_object(config)
    assert isinstance(restored, keras_favor.callbacks.FeatureRedraw)
    assert restored.get_config() == {
        "interval": 50,
        "seed": 4,
        "verbose": 1,
        "final_window": final_window,
    }
    assert restored.window == window
    assert keras_favor.FeatureRedraw is keras_favor.callbacks.FeatureRedraw


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"interval": 0}, "interval"),
        ({"interval": 2.5}, "interval"),
        ({"interval": True}, "interval"),
        ({"seed": "1"}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"verbose": 2}, "verbose"),
        ({"final_window": -1}, "final_window"),
        ({"final_window": 1.5}, "final_window"),
        ({"final_window": True}, "final_window"),
        ({"final_window": "10"}, "final_window"),
    ],
)
def test_invalid_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        keras_favor.FeatureRedraw(**kwargs)


def attention_free_model():
    inputs = keras.Input((fit_script.LENGTH, fit_script.DIM))
    x = keras.layers.MultiHeadAttention(2, 4)(inputs, inputs)
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, outputs, name="no_favor")


def frozen_model():
    model = fit_script.tiny_model()
    model.get_layer("attention").trainable = False
    return model


def projection_free_model():
    inputs = keras.Input((fit_script.LENGTH, fit_script.DIM))
    x = keras_favor.FavorAttention(2, 4, feature_map="elu")(inputs, inputs)
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize(
    "make_model, reason",
    [
        (attention_free_model, "no FavorAttention"),
        (frozen_model, "trainable=False"),
        (projection_free_model, "none with a random projection"),
    ],
)
def test_warns_once_per_fit_when_there_is_nothing_to_redraw(make_model, reason):
    model = fit_script.compile_model(make_model())
    callback = keras_favor.FeatureRedraw(interval=1, seed=0)
    for _ in range(2):
        with pytest.warns(UserWarning, match="FeatureRedraw") as record:
            fit(model, [callback], epochs=3)
        messages = [
            str(w.message) for w in record if "FeatureRedraw" in str(w.message)
        ]
        assert len(messages) == 1
        assert reason in messages[0]


def test_does_not_warn_with_layers_to_redraw():
    import warnings

    model = compiled_model()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(model, [keras_favor.FeatureRedraw(interval=1, seed=0)], epochs=2)
    assert not [w for w in record if "FeatureRedraw" in str(w.message)]
    # Every step but the last, which is within the final window of 1 step.
    assert redraw_count(model.get_layer("attention")) == 2 * 32 // BATCH - 1
