"""`export_language_model`: a SavedModel that serves logits and generates."""

from keras_favor import backend
from keras_favor.generation import language_model_cache
from keras_favor.generation.generate import decode
from keras_favor.generation.generate import decoding_options


def _checked_lengths(prompt_ids, max_new_tokens, max_length):
    """`max_new_tokens`, after run-time checks that it is >= 1 and that the
    prompt and the new tokens fit in `max_length` positions (a served
    model's inputs are unknown until it runs)."""
    import tensorflow as tf

    total = tf.shape(prompt_ids)[1] + max_new_tokens
    checks = [
        tf.debugging.assert_greater_equal(
            max_new_tokens, 1, message="`max_new_tokens` must be >= 1"
        ),
        tf.debugging.assert_less_equal(
            total,
            max_length,
            message=(
                "The prompt and `max_new_tokens` make more positions than "
                f"the model's `max_length` ({max_length})"
            ),
        ),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(max_new_tokens)


def export_language_model(
    model,
    filepath,
    sampler="greedy",
    temperature=1.0,
    top_k=None,
    top_p=None,
    end_token_id=None,
    padding_id=0,
    verbose=False,
):
    """Exports a language model as a SavedModel with two endpoints.

    - `serve(token_ids)`: `(batch, length)` int32 ids to `(batch, length,
      vocabulary_size)` logits, as `model.export` writes it.
    - `generate(prompt_ids, max_new_tokens, seed)`: `(batch, length)` int32
      prompts (left-padded with `padding_id`), a scalar int32 number of new
      tokens and a `(2,)` int64 stateless seed (used by
      `sampler="random"`), to the `(batch, length + max_new_tokens)` int32
      tokens of `keras_favor.generate` with the same options and seed.

    A client needs TensorFlow only, not keras_favor:
    `tf.saved_model.load(filepath).generate(prompt, 32, [seed, 0])`.
    Sampling options are fixed at export. TensorFlow backend only.

    Args:
        model: a causal language model from `build_performer(task=
            "language_model")`.
        filepath: str, the SavedModel directory to write.
        sampler, temperature, top_k, top_p, end_token_id, padding_id: as
            for `keras_favor.generate`.
        verbose: bool, whether to print the endpoints' signatures.

    Example:

    ```python
    keras_favor.generation.export_language_model(lm, "lm_savedmodel")
    served = tf.saved_model.load("lm_savedmodel")
    tokens = served.generate(prompt_ids, 32, tf.constant([0, 0], tf.int64))
    ```
    """
    backend.require_tensorflow("export_language_model (a SavedModel)")
    import tensorflow as tf

    max_length = language_model_cache.max_length(model)
    options = decoding_options(
        model, sampler, temperature, top_k, top_p, end_token_id, padding_id
    )

    def generate(prompt_ids, max_new_tokens, seed):
        max_new_tokens = _checked_lengths(
            prompt_ids, max_new_tokens, max_length
        )
        return decode(model, prompt_ids, max_new_tokens, seed, **options)

    tokens = tf.TensorSpec((None, None), tf.int32)
    endpoints = {
        "serve": (model.__call__, [tokens]),
        "generate": (
            generate,
            [
                tf.TensorSpec((None, None), tf.int32, name="prompt_ids"),
                tf.TensorSpec((), tf.int32, name="max_new_tokens"),
                tf.TensorSpec((2,), tf.int64, name="seed"),
            ],
        ),
    }
    artifact = _artifact(model, endpoints)
    signatures = {name: getattr(artifact, name) for name in endpoints}
    signatures["serving_default"] = artifact.serve
    tf.saved_model.save(artifact, filepath, signatures=signatures)
    if verbose:
        print(_endpoints_summary(filepath, endpoints))


def _artifact(model, endpoints):
    """What the SavedModel holds: the model's variables, in the lists
    `Model.export` writes, and one `tf.function` per endpoint.

    Each endpoint is traced once, while TensorFlow saves it (Keras's
    `ExportArchive` would trace each once more beforehand, to list the
    variables it uses).
    """
    import tensorflow as tf

    artifact = tf.__internal__.tracking.AutoTrackable()
    artifact.variables = list(model.variables)
    artifact.trainable_variables = list(model.trainable_variables)
    artifact.non_trainable_variables = list(model.non_trainable_variables)
    for name, (fn, signature) in endpoints.items():
        setattr(
            artifact,
            name,
            tf.function(fn, input_signature=signature, autograph=False),
        )
    return artifact


def _endpoints_summary(filepath, endpoints):
    """The endpoints and their inputs (an unnamed one is `args_i` in the
    signature), as `verbose=True` prints them."""
    lines = [f"Saved artifact at '{filepath}'. Endpoints:"]
    for name, (_, signature) in endpoints.items():
        inputs = ", ".join(
            f"{spec.name or f'args_{i}'}: {spec.dtype.name} {tuple(spec.shape)}"
            for i, spec in enumerate(signature)
        )
        lines.append(f"* {name}({inputs})")
    return "\n".join(lines)
