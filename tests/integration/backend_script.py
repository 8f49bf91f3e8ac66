"""Runs keras_favor on the backend of `KERAS_BACKEND`, in a fresh process,
for tests/integration/test_jax_backend.py: the checks that need two
backends in one test, or a process of their own (the rest of the suite
runs on each backend in turn, `make test`).

    KERAS_BACKEND=tensorflow python tests/integration/backend_script.py draw DIR
    KERAS_BACKEND=jax python tests/integration/backend_script.py forward DIR
    KERAS_BACKEND=jax python tests/integration/backend_script.py MODE DIR

`draw` makes inputs, and layers with their weights, and writes them with
the layers' outputs to `DIR/draw.npz`; `forward` loads those weights into
layers of the same configurations and writes its outputs to
`DIR/forward_<backend>.npz`. The other modes (`import`, `redraws`)
check things on their own and write `DIR/<mode>.json` (`redraws` also
writes `DIR/redraws_<backend>.npz`).
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402

BATCH, LENGTH, DIM = 2, 20, 8


def configurations():
    """`(name, layer kwargs, call kwargs, input scale)` of every compared
    forward pass: one of each code path that the weights pass through
    (each feature map against its float64 reference runs on every backend
    in tests/ops and tests/feature_maps)."""
    causal = dict(use_causal_mask=True)
    return [
        ("softmax_bidirectional", dict(chunk_size=8), {}, 1.0),
        ("softmax_causal", dict(chunk_size=8), causal, 1.0),
        ("relu_causal", dict(feature_map="relu", chunk_size=8), causal, 1.0),
        # Grouped recomputation (several groups), and a local window.
        (
            "softmax_causal_groups",
            dict(chunk_size=4, recompute_length=8),
            causal,
            1.0,
        ),
        (
            "softmax_causal_local_window",
            dict(chunk_size=4, local_window=3),
            causal,
            1.0,
        ),
        # Large inputs: attention logits in the hundreds, where the causal
        # kernel falls back to per-feature levels (docs/numerics.md, 5).
        (
            "softmax_causal_large",
            dict(chunk_size=4, recompute_length=8),
            causal,
            100.0,
        ),
        # Causal cross-attention with more keys than queries (masked keys
        # appended).
        (
            "softmax_causal_shorter_query",
            dict(chunk_size=4),
            dict(causal, cut="query"),
            1.0,
        ),
    ]


# Configurations whose gradients (inputs and weights) are compared too.
GRADIENT_CONFIGS = (
    "softmax_bidirectional",
    "softmax_causal",
    "softmax_causal_groups",
    "softmax_causal_local_window",
    "relu_causal",
)


def gradients(layer, query, value, mask, call_kwargs, cotangent):
    """Gradients of `sum(cotangent * layer(query, value))` with respect to
    the query, the value and the layer's trainable weights, as NumPy arrays
    (`tf.GradientTape` on TensorFlow, `jax.grad` of `stateless_call` on
    JAX)."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        query, value = tf.constant(query), tf.constant(value)
        with tf.GradientTape() as tape:
            tape.watch([query, value])
            output = layer(query, value, attention_mask=mask, **call_kwargs)
            loss = tf.reduce_sum(output * cotangent)
        grads = tape.gradient(loss, [query, value, *layer.trainable_variables])
        return [g.numpy() for g in grads]
    import jax

    call = stateless(layer, mask, call_kwargs)

    def loss(trainable, query, value):
        return jax.numpy.sum(call(trainable, query, value) * cotangent)

    # Compiled: one XLA program per configuration costs less than the
    # eager gradient's many small ones.
    trainable = [v.value for v in layer.trainable_variables]
    weights, query, value = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
        trainable, query, value
    )
    return [np.asarray(g) for g in [query, value, *weights]]


def forward(layer, query, value, mask, call_kwargs):
    """The layer's outputs as a NumPy array: a call on TensorFlow, one
    compiled `stateless_call` on JAX (one XLA program costs less than the
    eager call's many small ones)."""
    import keras

    if keras.backend.backend() == "tensorflow":
        output = layer(query, value, attention_mask=mask, **call_kwargs)
        return keras.ops.convert_to_numpy(output)
    import jax

    trainable = [v.value for v in layer.trainable_variables]
    call = stateless(layer, mask, call_kwargs)
    return np.asarray(jax.jit(call)(trainable, query, value))


def stateless(layer, mask, call_kwargs):
    """`call(trainable, query, value)`: the layer's outputs for the given
    trainable weights (its `stateless_call`, for `jax.jit` and
    `jax.grad`)."""
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def call(trainable, query, value):
        output, _ = layer.stateless_call(
            trainable,
            non_trainable,
            query,
            value,
            attention_mask=mask,
            **call_kwargs,
        )
        return output

    return call


def inputs():
    rng = np.random.default_rng(0)
    query = rng.normal(size=(BATCH, LENGTH, DIM)).astype("float32")
    value = rng.normal(size=(BATCH, LENGTH, DIM)).astype("float32")
    mask = np.ones((BATCH, LENGTH), bool)
    mask[1, 13:] = False
    return query, value, mask


def make_layer(layer_kwargs, seed=7):
    import keras_favor

    return keras_favor.FavorAttention(
        num_heads=2, key_dim=4, num_features=12, seed=seed, **layer_kwargs
    )


def run_forward(out_dir, load):
    import keras

    query, value, mask = inputs()
    results = {"query": query, "value": value, "mask": mask}
    stored = np.load(os.path.join(out_dir, "draw.npz")) if load else None
    for index, (name, layer_kwargs, call_kwargs, scale) in enumerate(
        configurations()
    ):
        keras.utils.set_random_seed(index)
        call_kwargs = dict(call_kwargs)
        cut = call_kwargs.pop("cut", None)
        q, v, m = query, value, mask
        if cut == "query":
            q = query[:, :13]
        elif cut == "key":
            v, m = value[:, :13], mask[:, :13]
        layer = make_layer(layer_kwargs)
        layer.build(q.shape, v.shape)
        if load:
            count = int(stored[f"{name}/count"])
            layer.set_weights([stored[f"{name}/w{i}"] for i in range(count)])
        else:
            weights = layer.get_weights()
            results[f"{name}/count"] = np.array(len(weights))
            for i, w in enumerate(weights):
                results[f"{name}/w{i}"] = w
        output = forward(layer, scale * q, scale * v, m, call_kwargs)
        results[f"{name}/output"] = output
        if name in GRADIENT_CONFIGS:
            cotangent = (
                np.random.default_rng(index)
                .normal(size=output.shape)
                .astype("float32")
            )
            for i, g in enumerate(
                gradients(layer, q, v, m, call_kwargs, cotangent)
            ):
                results[f"{name}/grad{i}"] = g
    file = "draw.npz" if not load else f"forward_{keras.backend.backend()}.npz"
    np.savez(os.path.join(out_dir, file), **results)


def run_import(out_dir):
    import keras

    import keras_favor

    result = {
        "backend": keras.backend.backend(),
        "tensorflow_imported": "tensorflow" in sys.modules,
        "version": keras_favor.__version__,
    }
    try:
        keras_favor.distribute.enable_multi_worker_fit()
        result["distribute_error"] = None
    except RuntimeError as error:
        result["distribute_error"] = str(error)
    result["multi_worker_fit_enabled"] = (
        keras_favor.distribute.multi_worker_fit_enabled()
    )
    return result


def redraw_sequence():
    """The projections of a small Performer's FavorAttention layers (by
    index path) as built (layer seed 3), and after each of two
    `FeatureRedraw(seed=1)` redraws, as NumPy arrays."""
    import keras

    import keras_favor

    model = keras_favor.build_performer(
        vocabulary_size=20,
        max_length=12,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        num_features=8,
        seed=3,
    )
    model(np.ones((1, 12), "int32"))
    callback = keras_favor.FeatureRedraw(interval=1, seed=1)
    callback.set_model(model)
    layers = callback.layers_to_redraw()
    draws = {}
    for k in range(3):
        if k:
            callback.redraw()
        for path, layer in layers.items():
            draws[f"{path}/{k}"] = keras.ops.convert_to_numpy(layer.projection)
    return draws


def run_redraws(out_dir):
    """`redraw_sequence()` twice in this process (fresh models), written to
    `DIR/redraws_<backend>.npz`; the JSON says whether the two agree."""
    import keras

    first, second = redraw_sequence(), redraw_sequence()
    np.savez(
        os.path.join(out_dir, f"redraws_{keras.backend.backend()}.npz"), **first
    )
    return {
        "names": sorted(first),
        "identical_in_process": all(
            np.array_equal(first[name], second[name]) for name in first
        ),
    }


def main(mode, out_dir):
    import keras

    if mode == "draw":
        run_forward(out_dir, load=False)
        return
    if mode == "forward":
        run_forward(out_dir, load=True)
        return
    result = {"import": run_import, "redraws": run_redraws}[mode](out_dir)
    result["backend"] = keras.backend.backend()
    with open(os.path.join(out_dir, f"{mode}.json"), "w") as file:
        json.dump(result, file)


if __name__ == "__main__":
    main(*sys.argv[1:])
