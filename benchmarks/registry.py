"""Named benchmark configurations: what `python -m benchmarks.run` measures.

A configuration is a measuring function and its parameters, registered
under a name. The runner calls the function in a worker process of its own
(a fresh interpreter, so that peak memory is the configuration's alone),
with keras_favor imported from the source tree under measurement: the
working tree, or any commit's `keras_favor/` unpacked in a folder. The
functions use the public API of keras_favor only, so that one harness times
every revision (except the recomputation configurations, which select a
mechanism inside `keras_favor.ops.grouped_recompute`).

Each function returns `speed_memory.measure`'s fields: `status`, the median,
fastest and slowest step in seconds (`median_s`, `min_s`, `max_s`), and the
peak resident memory of the process before and after the steps
(`baseline_rss_mib`, `peak_rss_mib`).

To add a configuration, call `register(Configuration(...))` below with a
name that says what is measured and at which size; `groups` names sets of
configurations that are run together, and `pairs` the ones the runner
prints side by side as a ratio.
"""

import dataclasses
import types


@dataclasses.dataclass(frozen=True)
class Configuration:
    """One named measurement.

    Args:
        name: the name on the command line and in the result files.
        function: the measuring function, called in the worker process as
            `function(**parameters)`.
        parameters: its keyword arguments (JSON values).
        description: one line for `--list` and the result files.
        metric: the field that `--compare` judges: `"median_s"` (the step's
            time) or `"peak_rss_mib"` (the process's peak memory).
        quick: whether `--quick` runs it.
    """

    name: str
    function: object
    parameters: dict
    description: str
    metric: str = "median_s"
    quick: bool = False


_REGISTRY = {}
METRICS = ("median_s", "peak_rss_mib")


def register(configuration):
    """Adds `configuration` to the registry under its name."""
    if configuration.name in _REGISTRY:
        raise ValueError(
            f"A configuration named {configuration.name!r} is already registered."
        )
    if configuration.metric not in METRICS:
        raise ValueError(
            f"`metric` must be one of {METRICS}, got {configuration.metric!r}."
        )
    _REGISTRY[configuration.name] = configuration


def get(name):
    """The configuration registered as `name`."""
    if name not in _REGISTRY:
        raise ValueError(
            f"No configuration named {name!r}. Registered: {names()}; "
            f"groups: {sorted(GROUPS)}."
        )
    return _REGISTRY[name]


def names():
    """The registered names, in the order of registration."""
    return list(_REGISTRY)


def expand(selection):
    """Configuration names for `selection`, where a group stands for its
    members; each name once, in the order given."""
    expanded = []
    for name in selection:
        for member in GROUPS.get(name, (name,)):
            get(member)
            if member not in expanded:
                expanded.append(member)
    return expanded


def quick_names():
    """The configurations that `--quick` runs."""
    return [
        name for name, configuration in _REGISTRY.items() if configuration.quick
    ]


# ------------------------------------------------------------ measurements --


def training_step(
    level,
    mode,
    length,
    repeats,
    pass_="forward_backward",
    model="favor",
    **favor_options,
):
    """Times `repeats` compiled steps of `models.build(level, model, ...)` on a
    `(1, length, 512)` input after one untimed call, as `speed_memory` does
    (TensorFlow backend: a `tf.function`; JAX: `jax.jit`); `pass_` is
    `"forward"` or `"forward_backward"` (the gradients of every weight)."""
    from benchmarks import speed_memory

    job = {
        "level": level,
        "model": model,
        "mode": mode,
        "pass": pass_,
        "length": length,
        "chunk_size": 0,
        "jit": False,
        "repeats": repeats,
        "min_repeats": repeats,
        "budget_s": float("inf"),
        "time_cap_s": float("inf"),
        "favor_options": favor_options,
    }
    return speed_memory.measure(job)


def training_step_with_keras_remat(**parameters):
    """`training_step` with the groups of `keras_favor.ops.grouped_recompute`
    recomputed through `keras.remat` (on TensorFlow, `tf.recompute_grad`)
    instead of the TensorFlow path's `tf.custom_gradient`."""
    use_keras_remat_for_groups()
    return training_step(**parameters)


def use_keras_remat_for_groups():
    """Makes `run_in_groups` take its `keras.remat` path on every backend.

    On TensorFlow, `keras.remat` is `tf.recompute_grad`, whose function
    takes tensors only: the groups' lists (with None for absent inputs) go
    through it flattened to their tensors and are rebuilt inside.
    """
    import keras

    from keras_favor.ops import grouped_recompute

    missing = [
        name
        for name in ("backend", "keras", "_run_with_remat")
        if not hasattr(grouped_recompute, name)
    ]
    if missing:
        raise RuntimeError(
            "keras_favor.ops.grouped_recompute no longer has "
            f"{missing}: update benchmarks.registry.use_keras_remat_for_groups."
        )
    grouped_recompute.backend = types.SimpleNamespace(
        is_tensorflow=lambda: False
    )
    grouped_recompute.keras = types.SimpleNamespace(
        remat=lambda fn: _flat_tensor_remat(fn, keras.remat)
    )


def _flat_tensor_remat(fn, remat):
    """`remat(fn)` for `fn(inputs, shared, carry) -> (outputs, carry)`, whose
    arguments are lists holding tensors or None."""

    def run(inputs, shared, carry):
        structure = [list(inputs), list(shared), list(carry)]
        tensors = [x for part in structure for x in part if x is not None]
        num_outputs = []

        def on_tensors(*values):
            values = iter(values)
            parts = [
                [None if x is None else next(values) for x in part]
                for part in structure
            ]
            outputs, new_carry = fn(*parts)
            num_outputs[:] = [len(outputs)]
            return list(outputs) + list(new_carry)

        results = list(remat(on_tensors)(*tensors))
        return results[: num_outputs[0]], results[num_outputs[0] :]

    return run


# ---------------------------------------------------------- configurations --

for _mode in ("bidirectional", "causal"):
    register(
        Configuration(
            f"favor_train_step_{_mode}_8192",
            training_step,
            {"level": "layer", "mode": _mode, "length": 8192, "repeats": 5},
            f"FavorAttention, {_mode}, forward + backward, L = 8192 (BENCHMARKS.md headline)",
            quick=True,
        )
    )
register(
    Configuration(
        "favor_causal_peak_memory_32768",
        training_step,
        {"level": "layer", "mode": "causal", "length": 32768, "repeats": 1},
        "FavorAttention, causal, forward + backward, L = 32768: peak resident memory",
        metric="peak_rss_mib",
        quick=True,
    )
)
for _mode in ("bidirectional", "causal"):
    register(
        Configuration(
            f"favor_train_step_{_mode}_1024",
            training_step,
            {"level": "layer", "mode": _mode, "length": 1024, "repeats": 15},
            f"FavorAttention, {_mode}, forward + backward, L = 1024",
        )
    )
# `local_window >= L`: FavorAttention runs exact attention
# (`keras.ops.dot_product_attention`), against `MultiHeadAttention`.
_EXACT_STEPS = {"train_step": "forward_backward", "forward": "forward"}
_EXACT_MODELS = {
    "favor_window": (
        {"local_window": 1024},
        "FavorAttention(local_window=1024)",
    ),
    "exact": (
        {"model": "exact"},
        "keras.layers.MultiHeadAttention (the same in every revision: "
        "the machine's drift)",
    ),
}
for _mode in ("bidirectional", "causal"):
    for _step, _pass in _EXACT_STEPS.items():
        for _model, (_options, _layer) in _EXACT_MODELS.items():
            register(
                Configuration(
                    f"{_model}_{_step}_{_mode}_1024",
                    training_step,
                    {
                        "level": "layer",
                        "mode": _mode,
                        "length": 1024,
                        "repeats": 15,
                        "pass_": _pass,
                        **_options,
                    },
                    f"{_layer}, {_mode}, {_pass.replace('_', ' + ')}, L = 1024",
                )
            )
register(
    Configuration(
        "favor_forward_causal_1024",
        training_step,
        {
            "level": "layer",
            "mode": "causal",
            "length": 1024,
            "repeats": 15,
            "pass_": "forward",
        },
        "FavorAttention, causal, forward only, L = 1024",
    )
)
register(
    Configuration(
        "performer_blocks_train_step_causal_2048",
        training_step,
        {"level": "stack", "mode": "causal", "length": 2048, "repeats": 5},
        "two causal PerformerBlocks (hidden 512), forward + backward, L = 2048",
    )
)

# Grouped recomputation, by mechanism: four groups of 4096 positions.
for _mode in ("bidirectional", "causal"):
    _parameters = {
        "level": "layer",
        "mode": _mode,
        "length": 16384,
        "repeats": 3,
        "recompute_length": 4096,
    }
    register(
        Configuration(
            f"recompute_custom_gradient_{_mode}_16384",
            training_step,
            _parameters,
            f"FavorAttention, {_mode}, forward + backward, L = 16384 in groups of 4096 "
            "recomputed by tf.custom_gradient (TensorFlow's path)",
        )
    )
    register(
        Configuration(
            f"recompute_keras_remat_{_mode}_16384",
            training_step_with_keras_remat,
            _parameters,
            "the same, the groups recomputed by keras.remat (tf.recompute_grad)",
        )
    )


def keras_hub_generate_step(**parameters):
    """One compiled keras-hub generation step of a GPT-2 CausalLM,
    converted or not (`keras_hub_generation.generate_step`)."""
    from benchmarks import keras_hub_generation

    return keras_hub_generation.generate_step(**parameters)


# keras-hub generation: the cost of a new token against the buffer length.
for _model in ("favor", "keras_hub"):
    for _length in (128, 2048):
        register(
            Configuration(
                f"keras_hub_gpt2_generate_step_{_model}_{_length}",
                keras_hub_generate_step,
                {"model": _model, "buffer_length": _length},
                f"one keras-hub generate step of a 2-layer GPT-2 (hidden 128), "
                f"{'FAVOR+ state' if _model == 'favor' else 'key/value cache'}"
                f", buffer {_length}",
            )
        )

# The smallest step, for the runner's own tests.
register(
    Configuration(
        "tiny_train_step_causal_64",
        training_step,
        {"level": "layer", "mode": "causal", "length": 64, "repeats": 2},
        "FavorAttention, causal, forward + backward, L = 64 (the runner's smoke test)",
    )
)

GROUPS = {
    "speed_memory_unchanged": tuple(quick_names()),
    "short_sequences": (
        "favor_train_step_bidirectional_1024",
        "favor_train_step_causal_1024",
        "exact_train_step_causal_1024",
        "favor_forward_causal_1024",
        "performer_blocks_train_step_causal_2048",
    ),
    "keras_hub_generation": tuple(
        f"keras_hub_gpt2_generate_step_{model}_{length}"
        for model in ("favor", "keras_hub")
        for length in (128, 2048)
    ),
    "causal_against_exact": (
        "favor_train_step_causal_1024",
        "exact_train_step_causal_1024",
        "favor_train_step_bidirectional_1024",
        "favor_train_step_causal_8192",
        "favor_train_step_bidirectional_8192",
    ),
    "exact_window": tuple(
        f"{model}_{step}_{mode}_1024"
        for mode in ("bidirectional", "causal")
        for step in _EXACT_STEPS
        for model in _EXACT_MODELS
    ),
    "recompute_custom_gradient_vs_remat": tuple(
        f"recompute_{mechanism}_{mode}_16384"
        for mode in ("bidirectional", "causal")
        for mechanism in ("custom_gradient", "keras_remat")
    ),
}
PAIRS = tuple(
    (
        f"recompute_custom_gradient_{mode}_16384",
        f"recompute_keras_remat_{mode}_16384",
    )
    for mode in ("bidirectional", "causal")
) + tuple(
    (f"exact_{step}_{mode}_1024", f"favor_window_{step}_{mode}_1024")
    for mode in ("bidirectional", "causal")
    for step in _EXACT_STEPS
)
