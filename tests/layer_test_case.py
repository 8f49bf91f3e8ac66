"""One test harness for every public layer: `run_layer_test`.

The checks build fresh layers from `init_kwargs`, so that no check passes
because of state that another one left behind.
"""

import inspect

import keras
import numpy as np
from keras import ops

DTYPE_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16", "bfloat16")


def run_layer_test(
    layer_cls,
    init_kwargs,
    input_data,
    expected_output_shape,
    tmp_path,
    call_kwargs=None,
    variable_dtype_exemptions=None,
    weights_without_gradient=(),
):
    """Checks what every Keras layer of the package owes its users.

    Args:
        layer_cls: the layer class.
        init_kwargs: dict, constructor arguments.
        input_data: an array, passed as the first call argument, or a dict
            of arrays, passed as keyword arguments (`{"query": q, ...}`).
        expected_output_shape: tuple, the output shape for `input_data`.
        tmp_path: a directory for the `.keras` file.
        call_kwargs: dict, further call arguments, such as
            `{"use_causal_mask": True}`.
        variable_dtype_exemptions: dict from a variable's name to the dtype
            it keeps under every dtype policy, such as
            `{"projection": "float32"}`.
        weights_without_gradient: ends of the paths of trainable weights
            whose gradient is zero by design, which the fit check exempts
            from moving, such as softmax attention's `"key/bias"` (a shift
            of all of a query's logits leaves the softmax unchanged).

    The checks:
        - `get_config` holds every constructor argument (with the value
          passed in `init_kwargs` if it is a bool, int or float) and
          survives `from_config`;
        - the eager call, the symbolic call and `compute_output_shape` give
          the expected shape, and a Functional model of the symbolic call
          computes what the eager call does;
        - a `.keras` file, loaded without `custom_objects`, restores every
          variable (moved off its initial value first) and the outputs;
        - two `jit_compile=True` steps of `fit` give a finite loss, change
          every trainable weight but `weights_without_gradient`, and, on
          TensorFlow, agree with the same steps run eagerly, without XLA
          (so the layer must be deterministic in training: no dropout);
        - under each of `DTYPE_POLICIES`, passed as the layer's `dtype`, the
          output has the compute dtype and is finite, the variables have the
          variable dtype (but for the exemptions), and every sublayer has the
          layer's policy.
    """
    call_kwargs = call_kwargs or {}
    expected_output_shape = tuple(expected_output_shape)
    layer = layer_cls(**init_kwargs)
    check_output_shapes(layer, input_data, call_kwargs, expected_output_shape)
    check_config_round_trip(layer, init_kwargs)
    check_keras_file_round_trip(
        layer_cls(**init_kwargs), input_data, call_kwargs, tmp_path
    )
    check_jit_fit_step(
        layer_cls,
        init_kwargs,
        input_data,
        call_kwargs,
        weights_without_gradient,
    )
    for policy in DTYPE_POLICIES:
        check_dtype_policy(
            layer_cls,
            init_kwargs,
            policy,
            input_data,
            call_kwargs,
            variable_dtype_exemptions or {},
        )


def call_layer(layer, inputs, call_kwargs):
    if isinstance(inputs, dict):
        return layer(**inputs, **call_kwargs)
    return layer(inputs, **call_kwargs)


def symbolic_inputs(input_data):
    """`keras.Input`s of the data's shapes and dtypes, batch size unknown."""
    if isinstance(input_data, dict):
        return {
            name: keras.Input(x.shape[1:], dtype=str(x.dtype), name=name)
            for name, x in input_data.items()
        }
    return keras.Input(input_data.shape[1:], dtype=str(input_data.dtype))


def functional_model(layer, input_data, call_kwargs):
    inputs = symbolic_inputs(input_data)
    return keras.Model(inputs, call_layer(layer, inputs, call_kwargs))


def computed_output_shape(layer, input_data):
    if isinstance(input_data, dict):
        return layer.compute_output_shape(
            **{f"{name}_shape": x.shape for name, x in input_data.items()}
        )
    return layer.compute_output_shape(input_data.shape)


def run_model(model, input_data):
    """The model's outputs for `input_data`, called eagerly (the traced
    call is checked by the fit step)."""
    return numpy(model(input_data))


def numpy(x):
    return ops.convert_to_numpy(x)


def batch_of(input_data):
    if isinstance(input_data, dict):
        return next(iter(input_data.values()))
    return input_data


def check_output_shapes(layer, input_data, call_kwargs, expected_shape):
    eager = call_layer(layer, input_data, call_kwargs)
    assert tuple(eager.shape) == expected_shape
    model = functional_model(layer, input_data, call_kwargs)
    assert tuple(model.output.shape) == (None,) + expected_shape[1:]
    assert tuple(computed_output_shape(layer, input_data)) == expected_shape
    np.testing.assert_allclose(
        run_model(model, input_data), eager, rtol=1e-5, atol=1e-6
    )


def constructor_arguments(layer_cls):
    parameters = inspect.signature(layer_cls.__init__).parameters.values()
    return {
        p.name
        for p in parameters
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def check_config_round_trip(layer, init_kwargs):
    config = layer.get_config()
    # A block records its attention's options in a mapping of their own.
    recorded = {**config.get("attention_options", {}), **config}
    arguments = constructor_arguments(type(layer)) | set(init_kwargs)
    missing = sorted(arguments - set(recorded))
    assert not missing, f"get_config() lacks the arguments {missing}"
    for name, value in init_kwargs.items():
        if type(value) in (bool, int, float):
            assert recorded[name] == value, f"get_config() changes `{name}`"
    restored = type(layer).from_config(config)
    assert restored.get_config() == config


def move_off_initial_values(variables, seed=0):
    """Adds noise to each variable, so that a variable that is not restored
    from the file but drawn again from its initializer, or its seed, shows."""
    rng = np.random.default_rng(seed)
    for variable in variables:
        if "int" in variable.dtype:
            variable.assign(variable + 1)
        else:
            noise = 0.1 * rng.normal(size=variable.shape)
            variable.assign(variable + ops.cast(noise, variable.dtype))


def check_keras_file_round_trip(layer, input_data, call_kwargs, tmp_path):
    model = functional_model(layer, input_data, call_kwargs)
    move_off_initial_values(model.weights)
    path = tmp_path / f"{type(layer).__name__}.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert type(restored.layers[-1]) is type(layer)
    assert [w.path for w in restored.weights] == [w.path for w in model.weights]
    for original, loaded in zip(model.weights, restored.weights):
        np.testing.assert_array_equal(
            numpy(loaded), numpy(original), err_msg=original.path
        )
    np.testing.assert_array_equal(
        run_model(restored, input_data), run_model(model, input_data)
    )


def fit_two_steps(model, input_data, targets, jit_compile):
    """Two steps of `fit`, compiled by XLA or (without `jit_compile`) run
    eagerly."""
    model.compile(
        keras.optimizers.SGD(0.1),
        "mse",
        jit_compile=jit_compile,
        run_eagerly=not jit_compile,
    )
    history = model.fit(
        input_data,
        targets,
        batch_size=len(targets) // 2,
        epochs=1,
        shuffle=False,
        verbose=0,
    )
    return history.history["loss"][0]


def check_jit_fit_step(
    layer_cls, init_kwargs, input_data, call_kwargs, weights_without_gradient
):
    """Two `fit` steps with XLA: the loss is finite, every trainable weight
    (but those without gradient) moves, and loss and weights agree with the
    same steps run eagerly, without XLA."""
    batch = len(batch_of(input_data))
    assert batch >= 2, "the fit check takes two steps: pass a batch of 2+"
    model = functional_model(layer_cls(**init_kwargs), input_data, call_kwargs)
    twin = functional_model(layer_cls(**init_kwargs), input_data, call_kwargs)
    twin.set_weights(model.get_weights())
    initial = [numpy(w) for w in model.trainable_weights]
    assert initial, "the layer has no trainable weights"
    targets = np.random.default_rng(0).normal(
        size=(batch,) + tuple(model.output.shape[1:])
    )
    loss = fit_two_steps(model, input_data, targets, jit_compile=True)
    assert np.isfinite(loss)
    paths = [w.path for w in model.trainable_weights]
    for end in weights_without_gradient:
        assert any(p.endswith(end) for p in paths), f"no weight ends in {end}"
    exempt = [p for p in paths if p.endswith(tuple(weights_without_gradient))]
    unchanged = [
        w.path
        for w, before in zip(model.trainable_weights, initial)
        if np.array_equal(numpy(w), before) and w.path not in exempt
    ]
    assert not unchanged, f"fit did not change {unchanged}"
    if keras.backend.backend() != "tensorflow":
        # Only TensorFlow has steps without XLA (its own kernels, run
        # eagerly: no graph to trace); JAX's eager steps run the same XLA
        # ops one by one, compiling each.
        return
    twin_loss = fit_two_steps(twin, input_data, targets, jit_compile=False)
    np.testing.assert_allclose(loss, twin_loss, rtol=1e-5)
    for jitted, plain in zip(model.weights, twin.weights):
        np.testing.assert_allclose(
            numpy(jitted),
            numpy(plain),
            rtol=1e-5,
            atol=1e-6,
            err_msg=jitted.path,
        )


def check_dtype_policy(
    layer_cls, init_kwargs, policy_name, input_data, call_kwargs, exemptions
):
    layer = layer_cls(**init_kwargs, dtype=policy_name)
    policy = layer.dtype_policy
    assert policy.name == policy_name
    output = call_layer(layer, input_data, call_kwargs)
    assert keras.backend.standardize_dtype(output.dtype) == policy.compute_dtype
    assert np.all(np.isfinite(numpy(ops.cast(output, "float32"))))
    for sublayer in layer._flatten_layers(include_self=False):
        assert sublayer.dtype_policy.name == policy_name, sublayer.path
    for variable in layer.weights:
        expected = exemptions.get(variable.name, policy.variable_dtype)
        assert variable.dtype == expected, (policy_name, variable.path)
    names = {variable.name for variable in layer.weights}
    assert set(exemptions) <= names, "an exemption names no variable"
