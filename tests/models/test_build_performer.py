"""Tests of `keras_favor.build_performer`."""

import keras
import numpy as np
import pytest

import keras_favor

pytestmark = pytest.mark.backend_independent

SIZES = dict(
    vocabulary_size=30,
    max_length=12,
    num_layers=2,
    num_heads=2,
    hidden_dim=16,
    intermediate_dim=32,
    num_features=16,
    seed=5,
)


def build(**kwargs):
    return keras_favor.build_performer(**{**SIZES, **kwargs})


def blocks(model):
    return [
        layer
        for layer in model.layers
        if isinstance(layer, keras_favor.PerformerBlock)
    ]


def tokens(batch=3, length=12, seed=0):
    return (
        np.random.RandomState(seed)
        .randint(1, 30, (batch, length))
        .astype("int32")
    )


@pytest.mark.parametrize(
    "task, shape",
    [
        ("classification", (3, 4)),
        ("language_model", (3, 12, 30)),
        ("encoder", (3, 12, 16)),
    ],
)
@pytest.mark.parametrize("api", ["functional", "sequential"])
def test_output_shapes(task, shape, api):
    model = build(task=task, num_classes=4, api=api)
    assert isinstance(model, keras.Sequential) == (api == "sequential")
    assert model(tokens()).shape == shape


@pytest.mark.parametrize("task", ["classification", "language_model"])
def test_sequential_is_the_functional_architecture(task):
    functional = build(task=task)
    sequential = build(task=task, api="sequential")
    assert [layer.name for layer in functional.layers[1:]] == [
        layer.name for layer in sequential.layers
    ]
    assert [w.shape for w in functional.weights] == [
        w.shape for w in sequential.weights
    ]
    sequential.set_weights(functional.get_weights())
    np.testing.assert_allclose(
        functional(tokens()), sequential(tokens()), atol=1e-5
    )


def test_blocks_get_task_options_and_distinct_seeds():
    model = build(
        task="language_model",
        attention="exact",
        dropout=0.1,
        feature_map="relu",
        projection="iid",
    )
    language_model_blocks = blocks(model)
    assert len(language_model_blocks) == 2
    for block in language_model_blocks:
        assert block.causal and block.attention == "exact"
        assert block.dropout == 0.1
    assert [b.attention_layer.seed for b in language_model_blocks] == [5, 6]
    assert not any(b.causal for b in blocks(build(task="encoder")))


def test_projections_differ_between_layers_and_repeat_with_the_seed():
    first, second = build(), build()
    projections = [
        np.asarray(block.attention_layer.projection) for block in blocks(first)
    ]
    assert not np.allclose(*projections)
    np.testing.assert_array_equal(
        projections[0], blocks(second)[0].attention_layer.projection
    )


def test_language_model_is_causal():
    model = build(task="language_model")
    x = tokens(batch=1)
    changed = x.copy()
    changed[:, 7:] = 1
    np.testing.assert_allclose(
        model(x)[:, :7], model(changed)[:, :7], atol=1e-5
    )
    assert not np.allclose(model(x)[:, 7:], model(changed)[:, 7:])


@pytest.mark.parametrize("api", ["functional", "sequential"])
def test_classifier_ignores_padding(api):
    model = build(api=api)
    short = tokens(batch=2, length=7)
    padded = np.pad(short, ((0, 0), (0, 5)))
    np.testing.assert_allclose(model(short), model(padded), atol=1e-5)


def test_language_model_loss_ignores_padding():
    model = build(task="language_model")
    model.compile(loss=keras_favor.models.language_model_loss())
    inputs = np.pad(tokens(batch=2, length=8), ((0, 0), (0, 4)))
    targets = np.pad(tokens(batch=2, length=8, seed=1), ((0, 0), (0, 4)))
    logits = model.predict(inputs, verbose=0)[:, :8]
    log_probabilities = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(
        log_probabilities, targets[:, :8, None], axis=-1
    ).mean()
    np.testing.assert_allclose(
        model.evaluate(inputs, targets, verbose=0), expected, rtol=1e-5
    )


@pytest.mark.integration
def test_classifier_trains_with_fit_and_feature_redraw():
    # A learnable rule: the class is whether token 1 occurs in the sequence.
    rng = np.random.RandomState(0)
    x = rng.randint(2, 30, (256, 12)).astype("int32")
    y = rng.randint(0, 2, 256)
    x[y == 1, rng.randint(0, 12, (y == 1).sum())] = 1
    model = build()
    model.compile(
        keras.optimizers.Adam(3e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    initial = [np.asarray(b.attention_layer.projection) for b in blocks(model)]
    history = model.fit(
        x,
        y,
        batch_size=32,
        epochs=6,
        verbose=0,
        callbacks=[keras_favor.FeatureRedraw(interval=20, seed=0)],
    )
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
    assert model.evaluate(x, y, verbose=0, return_dict=True)["accuracy"] > 0.9
    # 48 steps: a redraw after step 20 in every block; the one after step
    # 40 would leave the model fewer than `interval` steps to adapt, so
    # FeatureRedraw makes none there.
    for block, projection in zip(blocks(model), initial):
        assert int(block.attention_layer.redraw_count) == 1
        assert not np.allclose(block.attention_layer.projection, projection)


def test_longer_input_than_max_length_raises():
    with pytest.raises(ValueError, match="sequence_length"):
        build()(tokens(length=13))


def test_post_norm_has_no_final_norm():
    names = [layer.name for layer in build(normalize_first=False).layers]
    assert "final_norm" not in names
    assert "final_norm" in [layer.name for layer in build().layers]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(task="translation"), "task"),
        (dict(api="subclass"), "api"),
        (dict(num_heads=3), "divisible"),
        (dict(num_layers=0), "num_layers"),
        (dict(num_classes=0), "num_classes"),
        (dict(seed=1.5), "seed"),
        (dict(attention="sparse"), "attention"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(**kwargs)
