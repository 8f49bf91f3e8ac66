"""Attention transfer for examples/convert_pretrained.py: each FavorAttention
of a converted model trained to reproduce its softmax teacher layer's
outputs.

`convert_pretrained.py` measures it against plain finetuning at equal
compute; it did not recover faster there (BENCHMARKS.md, "Converting a
trained model"), so it is part of the example, not of `keras_favor`.
"""

import inspect
import math
import time

import keras
import numpy as np

from examples.example_utils import StepTimer
from keras_favor import FavorAttention

# The call arguments of MultiHeadAttention that carry tensors a student
# layer is called with; the others are fixed per layer.
_TENSORS = ("query", "value", "key", "query_mask", "value_mask", "key_mask")


def _attention_layers(model, cls):
    """`[(path, layer)]` for every layer of class `cls` in `model`: its
    layers, nested models and the layers held as attributes, depth first in
    the model's order, once each. A path is the names from the model down
    to the layer, joined by "/" (a name repeated by a wrapper once)."""
    found, seen = [], set()

    def visit(layer, names):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        if not names or names[-1] != layer.name:
            names = names + [layer.name]
        if isinstance(layer, cls):
            found.append(("/".join(names), layer))
            return
        children = list(layer.layers) if isinstance(layer, keras.Model) else []
        children += [
            value
            for value in vars(layer).values()
            if isinstance(value, keras.layers.Layer)
        ]
        for child in children:
            visit(child, names)

    for layer in model.layers:
        visit(layer, [])
    return found


def _pairs(teacher, student):
    """`[(mha, favor, path)]`: the teacher's MultiHeadAttention layers and the
    student's FavorAttention layers, paired by their order in the models;
    a `ValueError` unless they pair one to one with equal names and
    head sizes."""
    teachers = _attention_layers(teacher, keras.layers.MultiHeadAttention)
    students = _attention_layers(student, FavorAttention)
    if not students:
        raise ValueError(
            "`student` has no FavorAttention layer: pass the model that "
            "`keras_favor.convert.performerize(teacher)` returned."
        )
    if len(teachers) != len(students):
        raise ValueError(
            f"`teacher` has {len(teachers)} MultiHeadAttention layers "
            f"({[path for path, _ in teachers]}) but `student` has "
            f"{len(students)} FavorAttention layers "
            f"({[path for path, _ in students]}): they must pair one to "
            "one, as in a model and its `performerize` conversion."
        )
    for (teacher_path, mha), (student_path, favor) in zip(teachers, students):
        same = (
            mha.name == favor.name
            and mha.num_heads == favor.num_heads
            and mha.key_dim == favor.key_dim
        )
        if not same:
            raise ValueError(
                f"The teacher's MultiHeadAttention {teacher_path!r} "
                f"({mha.num_heads} heads of {mha.key_dim}) and the "
                f"student's FavorAttention {student_path!r} "
                f"({favor.num_heads} heads of {favor.key_dim}) are at the "
                "same place in their models but do not match: the student "
                "must be `performerize(teacher)`."
            )
        if not mha.built:
            raise ValueError(
                f"The teacher's MultiHeadAttention {teacher_path!r} is not "
                "built: call `teacher` on data first."
            )
    return [
        (mha, favor, path)
        for (_, mha), (path, favor) in zip(teachers, students)
    ]


class _Recorder:
    """Records the inputs and outputs of a MultiHeadAttention's calls by
    wrapping its `call` method, which `close` restores."""

    def __init__(self, mha):
        self.mha = mha
        self.calls = []
        self.signature = inspect.signature(type(mha).call)
        original = mha.call

        def call(*args, **kwargs):
            outputs = original(*args, **kwargs)
            self.calls.append((args, kwargs, outputs))
            return outputs

        mha.call = call

    def close(self):
        del self.mha.call

    def arrays(self):
        """`(tensors, fixed, outputs)`: the tensor arguments of every call
        stacked over the calls (`value` left out where it was the query),
        the other arguments (equal in every call) and the outputs."""
        name = self.mha.name
        if not self.calls:
            raise ValueError(
                f"The teacher's MultiHeadAttention {name!r} was not called "
                "when `teacher` ran on `data`."
            )
        tensors, fixed = {}, None
        outputs = []
        for args, kwargs, output in self.calls:
            bound = self.signature.bind(self.mha, *args, **kwargs).arguments
            if bound.get("attention_mask") is not None:
                raise ValueError(
                    f"The teacher's MultiHeadAttention {name!r} was called "
                    "with an `attention_mask`, which has no linear-time "
                    "form: only padding masks and `use_causal_mask` "
                    "transfer."
                )
            if bound.get("return_attention_scores"):
                raise ValueError(
                    f"The teacher's MultiHeadAttention {name!r} was called "
                    "with `return_attention_scores=True`, which "
                    "FavorAttention cannot return."
                )
            shared_value = bound.get("value") is bound["query"]
            this_fixed = {
                "use_causal_mask": bool(bound.get("use_causal_mask", False)),
                "shared_value": shared_value,
                "present": tuple(
                    key
                    for key in _TENSORS
                    if bound.get(key) is not None
                    and not (key == "value" and shared_value)
                ),
            }
            if fixed is not None and this_fixed != fixed:
                raise ValueError(
                    f"The teacher's MultiHeadAttention {name!r} was called "
                    "with different arguments on different batches "
                    f"({fixed} and {this_fixed}): it cannot be paired with "
                    "one student call."
                )
            fixed = this_fixed
            for key in fixed["present"]:
                tensors.setdefault(key, []).append(
                    keras.ops.convert_to_numpy(bound[key])
                )
            outputs.append(keras.ops.convert_to_numpy(output))
        tensors = {key: np.concatenate(parts) for key, parts in tensors.items()}
        return tensors, fixed, np.concatenate(outputs)


class _Attentions(keras.Model):
    """The student attention layers side by side: input `i/query`, ... of
    layer `i` gives its output `i`."""

    def __init__(self, attentions, fixed, **kwargs):
        super().__init__(**kwargs)
        self.attentions = attentions
        self.fixed = fixed

    def call(self, inputs, training=None):
        outputs = []
        for index, (layer, fixed) in enumerate(
            zip(self.attentions, self.fixed)
        ):
            arguments = {
                key: inputs[f"{index}/{key}"] for key in fixed["present"]
            }
            if fixed["shared_value"]:
                arguments["value"] = arguments["query"]
            outputs.append(
                layer(
                    **arguments,
                    use_causal_mask=fixed["use_causal_mask"],
                    training=training,
                )
            )
        return tuple(outputs)


def _check_positive_int(value, name):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < 1
    ):
        raise ValueError(
            f"`{name}` must be a positive int. Received: {name}={value!r}"
        )
    return int(value)


def _layer_mse(model, inputs, targets, batch_size):
    predicted = model.predict(inputs, batch_size=batch_size, verbose=0)
    return [
        float(np.mean(np.square(p - t))) for p, t in zip(predicted, targets)
    ]


def transfer_attention(
    teacher,
    student,
    data,
    steps=100,
    batch_size=16,
    learning_rate=1e-3,
    verbose=1,
):
    """Trains each FavorAttention of `student` to reproduce its teacher's.

    `student` is `keras_favor.convert.performerize(teacher, ...)` (or a
    model of the same layers). Each of its FavorAttention layers is paired
    with the teacher's MultiHeadAttention at the same place (the same order
    in the models, the same name and head sizes). The teacher runs once on
    `data` (`training=False`), recording every attention layer's inputs,
    padding masks and outputs. Then each FavorAttention is trained on the
    teacher's inputs of its layer to give the teacher's outputs: the
    mean squared error of every layer, summed, with Adam, for `steps`
    steps of `batch_size` recorded sequences (a Keras progress bar shows
    the loss). Only the FavorAttention layers' trainable weights change;
    the teacher and every other weight of `student` stay as they are.

    A step runs the attention layers alone, forward and backward, on the
    recorded inputs: it costs less than a training step of the model. It
    is a start for finetuning the whole student, not a replacement.

    Args:
        teacher: the softmax-attention `keras.Model` that `student` was
            converted from, built.
        student: the converted `keras.Model`.
        data: the teacher's inputs: an array or a list or dict of arrays
            that `teacher(data)` takes, such as token ids `(N, length)`.
        steps: int, training steps.
        batch_size: int, sequences per step (and per teacher call).
        learning_rate: float, Adam's learning rate.
        verbose: 0 (silent) or 1 (a progress bar).

    Returns:
        A dict: `"steps"`; `"seconds"`, the time of recording the teacher
        and of training, compilation included (the two error measurements
        left out); `"record_seconds"`, the recording's part;
        `"step_seconds"`, the median time of one training step after the
        first (compilation left out; the first step's time when there is
        one step); and
        `"mse_before"` and `"mse_after"`, each `{layer path: mean squared
        error against the teacher's outputs on data}`, where a path is the
        layer names from the student model down, joined by "/".

    Raises:
        ValueError: when the models' attention layers do not pair, when a
            teacher layer is called with an `attention_mask` (no
            linear-time form), or for an argument outside what is allowed.

    Example:

    ```python
    student = keras_favor.convert.performerize(teacher, local_window=16)
    transfer_attention(teacher, student, token_ids[:256], steps=200)
    student.compile("adam", loss)
    student.fit(data)  # finetune the whole model
    ```
    """
    for model, name in ((teacher, "teacher"), (student, "student")):
        if not isinstance(model, keras.Model):
            raise ValueError(
                f"`{name}` must be a keras.Model. Received: {name}={model!r}"
            )
    if student is teacher:
        raise ValueError(
            "`student` must be a converted copy of `teacher`, not "
            "`teacher` itself."
        )
    steps = _check_positive_int(steps, "steps")
    batch_size = _check_positive_int(batch_size, "batch_size")
    if isinstance(learning_rate, bool) or not (
        isinstance(learning_rate, (int, float))
        and learning_rate > 0
        and math.isfinite(learning_rate)
    ):
        raise ValueError(
            "`learning_rate` must be a positive number. Received: "
            f"learning_rate={learning_rate!r}"
        )
    if verbose not in (0, 1):
        raise ValueError(
            f"`verbose` must be 0 or 1. Received: verbose={verbose!r}"
        )
    pairs = _pairs(teacher, student)
    start = time.perf_counter()
    tensors, fixed, targets = _record(teacher, pairs, data, batch_size)
    seconds = record_seconds = time.perf_counter() - start
    inputs = {
        f"{index}/{key}": value
        for index, layer_tensors in enumerate(tensors)
        for key, value in layer_tensors.items()
    }
    model = _Attentions(
        [favor for _, favor, _ in pairs], fixed, name="attention_transfer"
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=["mse"] * len(pairs),
    )
    names = [path for _, _, path in pairs]
    before = _layer_mse(model, inputs, targets, batch_size)
    if verbose:
        print(
            f"Attention transfer: {len(pairs)} layers, {len(targets[0])} "
            f"recorded sequences, {steps} steps"
        )
    timer = StepTimer()
    start = time.perf_counter()
    model.fit(
        _Batches(inputs, targets, batch_size, steps),
        verbose=verbose,
        callbacks=[timer],
    )
    seconds += time.perf_counter() - start
    after = _layer_mse(model, inputs, targets, batch_size)
    return {
        "steps": steps,
        "seconds": seconds,
        "record_seconds": record_seconds,
        "step_seconds": timer.median(),
        "mse_before": dict(zip(names, before)),
        "mse_after": dict(zip(names, after)),
    }


def _record(teacher, pairs, data, batch_size):
    """The recorded inputs, fixed arguments and outputs of every teacher
    attention layer on `data`, in batches of `batch_size`."""
    recorders = [_Recorder(mha) for mha, _, _ in pairs]
    try:
        for batch in _input_batches(data, batch_size):
            teacher(batch, training=False)
    finally:
        for recorder in recorders:
            recorder.close()
    recorded = [recorder.arrays() for recorder in recorders]
    return (
        [tensors for tensors, _, _ in recorded],
        [fixed for _, fixed, _ in recorded],
        [outputs for _, _, outputs in recorded],
    )


def _input_batches(data, batch_size):
    """`data` (an array, or a list or dict of arrays) in batches."""
    if isinstance(data, dict):
        size = _length(next(iter(data.values())))
        for begin in range(0, size, batch_size):
            yield {k: v[begin : begin + batch_size] for k, v in data.items()}
    elif isinstance(data, (list, tuple)):
        size = _length(data[0])
        for begin in range(0, size, batch_size):
            yield [v[begin : begin + batch_size] for v in data]
    else:
        size = _length(data)
        for begin in range(0, size, batch_size):
            yield data[begin : begin + batch_size]


def _length(array):
    if not hasattr(array, "shape") or not len(array.shape):
        raise ValueError(
            "`data` must be an array, or a list or dict of arrays, of the "
            f"teacher's inputs. Received: data={array!r}"
        )
    return int(array.shape[0])


class _Batches(keras.utils.PyDataset):
    """`steps` batches of the recorded sequences, as a dataset `fit`
    takes: passes over them, each in a new seeded shuffled order."""

    def __init__(self, inputs, targets, batch_size, steps):
        super().__init__()
        self.inputs, self.targets = inputs, targets
        size = len(targets[0])
        batch_size = min(batch_size, size)
        per_pass = size // batch_size
        rng = np.random.default_rng(0)
        orders = [
            rng.permutation(size) for _ in range(math.ceil(steps / per_pass))
        ]
        self.indices = [
            order[begin * batch_size : (begin + 1) * batch_size]
            for order in orders
            for begin in range(per_pass)
        ][:steps]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        index = self.indices[index]
        return (
            {key: value[index] for key, value in self.inputs.items()},
            tuple(target[index] for target in self.targets),
        )
