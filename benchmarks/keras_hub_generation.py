"""One keras-hub generation step of a converted GPT-2 against the original.

For each buffer length L, one compiled `call_with_cache` of a
`keras_hub.models.GPT2CausalLM` on the token at position L - 1: the step
that keras-hub's `generate()` runs for each new token. The original task
attends over its `(B, layers, 2, L, heads, head_dim)` key/value cache; the
converted task (`keras_favor.convert.performerize`) carries the FAVOR+
state, whose size does not depend on L. The two models alternate at each
length, so that both read the same minutes of a loaded machine. Writes
`keras_hub_generation.csv` and `keras_hub_generation.md` (the table, with
the machine's load average) to `--output-dir`.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from benchmarks import common

MODELS = ("favor", "keras_hub")
FIELDS = (
    "model",
    "buffer_length",
    "batch",
    "cache_bytes",
    "median_ms",
    "min_ms",
    "max_ms",
    "timed_runs",
    "num_layers",
    "hidden_dim",
    "num_heads",
    "load_average",
    "keras_favor_commit",
)


def build_tasks(num_layers, hidden_dim, num_heads, max_length, seed=0):
    """`{"keras_hub": GPT2CausalLM, "favor": its converted form}` of a
    randomly initialized GPT-2 backbone holding `max_length` positions."""
    import keras
    import keras_hub

    from keras_favor.convert import performerize

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=512,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        intermediate_dim=4 * hidden_dim,
        dropout=0.0,
        max_sequence_length=max_length,
    )
    task = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    return {"keras_hub": task, "favor": performerize(task, seed=seed)}


def empty_cache(model, task, batch, buffer_length):
    """The cache that `task`'s `generate()` carries for a buffer of
    `buffer_length` tokens: the FAVOR+ state, or keras-hub's zeros of
    `(B, layers, 2, L, heads, head_dim)`."""
    from keras import ops

    if model == "favor":
        return task._empty_state(batch)
    backbone = task.backbone
    head_dim = backbone.hidden_dim // backbone.num_heads
    return ops.zeros(
        (
            batch,
            backbone.num_layers,
            2,
            buffer_length,
            backbone.num_heads,
            head_dim,
        )
    )


def compiled_step(task):
    """`task.call_with_cache` on one token, compiled by the backend
    (TensorFlow: `tf.function`; JAX: `jax.jit`), returning the logits."""
    import keras

    def step(token, cache, index):
        return task.call_with_cache(token, cache, index)[0]

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(step)
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(step)
    return step


def time_step(task, model, batch, buffer_length, repeats):
    """Timing fields (`common.timing_fields`) of the step on the token at
    position `buffer_length - 1`, and the cache's bytes."""
    from keras import ops

    cache = empty_cache(model, task, batch, buffer_length)
    token = ops.zeros((batch, 1), "int32")
    index = ops.convert_to_tensor(buffer_length - 1, "int32")
    first, times = common.time_calls(
        compiled_step(task), [token, cache, index], repeats
    )
    fields = common.timing_fields(times, first, float("inf"))
    fields["cache_bytes"] = int(np.prod(cache.shape)) * 4
    return fields


def generate_step(
    model="favor",
    buffer_length=512,
    batch=1,
    num_layers=2,
    hidden_dim=128,
    num_heads=2,
    repeats=20,
):
    """The registry's measurement: `time_step` of one model at one buffer
    length, with the process's peak memory before and after."""
    result = {"baseline_rss_mib": round(common.peak_rss_mib(), 1)}
    tasks = build_tasks(num_layers, hidden_dim, num_heads, buffer_length)
    result.update(time_step(tasks[model], model, batch, buffer_length, repeats))
    result["peak_rss_mib"] = round(common.peak_rss_mib(), 1)
    return result


def run(args):
    """The rows of both models at each buffer length, alternating."""
    tasks = build_tasks(
        args.num_layers, args.hidden_dim, args.num_heads, max(args.lengths)
    )
    commit = common.git_commit()
    rows = []
    for length in args.lengths:
        for model in MODELS:
            fields = time_step(
                tasks[model], model, args.batch, length, args.repeats
            )
            rows.append(
                dict(
                    model=model,
                    buffer_length=length,
                    batch=args.batch,
                    cache_bytes=fields["cache_bytes"],
                    median_ms=round(1e3 * fields["median_s"], 3),
                    min_ms=round(1e3 * fields["min_s"], 3),
                    max_ms=round(1e3 * fields["max_s"], 3),
                    timed_runs=fields["timed_runs"],
                    num_layers=args.num_layers,
                    hidden_dim=args.hidden_dim,
                    num_heads=args.num_heads,
                    load_average=round(os.getloadavg()[0], 2),
                    keras_favor_commit=commit,
                )
            )
            print(rows[-1], flush=True)
    return rows


def markdown(rows, args):
    """The result file's lines: the table of median milliseconds per step
    by buffer length, and the conditions."""
    loads = [row["load_average"] for row in rows]
    cpus = os.cpu_count()
    draft = max(loads) > 0.5 * cpus
    lines = [
        "# keras-hub generation step: converted GPT-2 against the original"
        + (" (draft, read under load)" if draft else ""),
        "",
        f"GPT-2 of {args.num_layers} layers, hidden {args.hidden_dim}, "
        f"{args.num_heads} heads, batch {args.batch}; median of "
        f"{args.repeats} compiled `call_with_cache` steps at position L - 1 "
        "(`python -m benchmarks.keras_hub_generation`).",
        "",
        "| buffer L | FAVOR+ state (ms) | keras-hub key/value cache (ms) "
        "| FAVOR+ cache (KiB) | key/value cache (KiB) |",
        "|---:|---:|---:|---:|---:|",
    ]
    by = {(r["model"], r["buffer_length"]): r for r in rows}
    for length in args.lengths:
        favor, original = by["favor", length], by["keras_hub", length]
        lines.append(
            f"| {length} | {favor['median_ms']:.3f} | "
            f"{original['median_ms']:.3f} | "
            f"{favor['cache_bytes'] / 1024:.0f} | "
            f"{original['cache_bytes'] / 1024:.0f} |"
        )
    lines += [
        "",
        f"Load average (1 min) during the runs: {min(loads)} to "
        f"{max(loads)} on {cpus} CPUs"
        + (": a draft, the machine was shared." if draft else "."),
    ]
    return lines


def main(argv=None):
    args = common.parse_args(
        __doc__,
        argv,
        lengths=([128, 512, 2048, 8192], "buffer lengths L"),
        batch=1,
        num_layers=2,
        hidden_dim=128,
        num_heads=2,
        repeats=20,
    )
    rows = run(args)
    os.makedirs(args.output_dir, exist_ok=True)
    stem = os.path.join(args.output_dir, "keras_hub_generation")
    common.write_csv(stem + ".csv", FIELDS, rows)
    common.write_lines(stem + ".md", markdown(rows, args))
    return rows


if __name__ == "__main__":
    main()
