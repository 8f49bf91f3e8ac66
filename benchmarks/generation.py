"""Time per generated token with a decoding cache: FAVOR+ against exact attention.

For each position p and batch size, one compiled decoding step (`tf.function`
around `keras_favor.generation.call_with_cache` for one token at index p, and
the argmax of its logits) of a `build_performer(task="language_model")` model,
with FAVOR+ attention and its recurrent cache, and the same model with
`attention="exact"` and its key/value cache. The two models' steps alternate
(favor, exact, favor, ...), each step timed on its own and fed the cache and
token the previous one returned, so the steps run at positions p, p + 1, ...
and the ratios come from the same minutes of a machine whose speed drifts.

The caches of p positions:

- FAVOR+: a real prefill (`call_with_cache` over p random tokens, one
  chunked linear pass at batch 1, continued from the previous position's
  cache), its state repeated over the batch. The state has the same shapes
  at every position; only its values depend on the tokens.
- exact: `empty_cache` of a model built with `max_length` = p + 1 + warm-up
  + timed steps (the first call traces) (a key/value cache just large enough for the positions the
  run reaches, which is what a real implementation attends over), its keys
  and values filled with random values and its mask True for the first p
  positions. The quadratic prefill is not what is measured (and at 32768
  positions it would not fit).

The cache's memory is the bytes of its tensors. Writes `generation.csv`,
`generation.json` (machine, versions, settings, rows, the targets) and
`generation.png` (time per token against position) to `--output-dir`.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from benchmarks import common

MODELS = ("favor", "exact")
FIELDS = (
    "model",
    "batch",
    "position",
    "cache_length",
    "cache_bytes",
    "median_ms",
    "min_ms",
    "max_ms",
    "steps",
    "warmup",
    "trace_s",
    "cache_fill_s",
    "num_layers",
    "hidden_dim",
    "num_heads",
    "num_features",
    "jit_compile",
    "load_average",
    "keras_favor_commit",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--positions",
        type=int,
        nargs="+",
        default=[64, 1024, 8192, 32768],
        help="positions p of the timed token (the cache holds p positions)",
    )
    add(
        "--batches",
        type=int,
        nargs="+",
        default=[1, 8],
        help="batch sizes (a panel of the plot each)",
    )
    add(
        "--models",
        nargs="+",
        choices=MODELS,
        default=list(MODELS),
        help="attention of the models timed",
    )
    add(
        "--steps",
        type=int,
        default=20,
        help="timed decoding steps per model, position and batch (median)",
    )
    add(
        "--warmup",
        type=int,
        default=3,
        help="untimed steps after the first (tracing) call",
    )
    add("--num-layers", type=int, default=4, help="Performer blocks")
    add("--hidden-dim", type=int, default=512, help="hidden size")
    add("--num-heads", type=int, default=8, help="attention heads")
    add(
        "--intermediate-dim",
        type=int,
        default=None,
        help="feed-forward width; None: 4 x hidden (default: %(default)s)",
    )
    add("--num-features", type=int, default=256, help="FAVOR+ random features")
    add(
        "--vocabulary-size",
        type=int,
        default=257,
        help="vocabulary (257: bytes and padding)",
    )
    add(
        "--max-cache-gib",
        type=float,
        default=8.0,
        help="skip a configuration whose exact key/value cache would be "
        "larger (it is copied once a step)",
    )
    add("--seed", type=int, default=0, help="seed of weights and tokens")
    add(
        "--output-dir",
        default=common.RESULTS_DIR,
        help="where generation.csv, .json and .png go",
    )
    return parser.parse_args(argv)


def build_model(args, attention, max_length):
    import keras_favor

    return keras_favor.build_performer(
        args.vocabulary_size,
        max_length,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        hidden_dim=args.hidden_dim,
        intermediate_dim=args.intermediate_dim,
        task="language_model",
        num_features=args.num_features,
        attention=attention,
        seed=args.seed,
    )


def cache_bytes(cache):
    return int(
        sum(
            int(np.prod(x.shape)) * x.dtype.size
            for block in cache
            for x in block
        )
    )


def make_step(model):
    """The compiled step: `(token (B, 1), cache, index)` to the argmax token
    `(B, 1)` and the new cache."""
    import tensorflow as tf
    from keras import ops

    from keras_favor import generation

    # Not XLA: with `jit_compile=True` each new position compiles the step
    # again (seconds), which is not a decoding step's cost.
    @tf.function(reduce_retracing=True)
    def step(token, cache, index):
        logits, cache = generation.call_with_cache(
            model, token, cache, index, ops.ones(ops.shape(token), "bool")
        )
        return ops.cast(ops.argmax(logits[:, -1], axis=-1), "int32")[
            :, None
        ], cache

    return step


class Stepper:
    """One model's decoding from position `position`: `__call__` runs and
    times one step, then moves to the next position."""

    def __init__(self, step, cache, position, token):
        import tensorflow as tf

        self.tf, self.step, self.cache = tf, step, cache
        self.position, self.token = position, token

    def __call__(self):
        index = self.tf.constant(self.position, "int32")
        start = time.perf_counter()
        token, self.cache = self.step(self.token, self.cache, index)
        self.token = np.asarray(token)
        seconds = time.perf_counter() - start
        self.position += 1
        return seconds


class FavorCaches:
    """FAVOR+'s cache after p random tokens, by prefill at batch 1, each
    position's prefill continuing from the previous one's cache."""

    def __init__(self, model, seed, vocabulary_size):
        from keras_favor import generation

        self.model, self.generation = model, generation
        self.rng = np.random.default_rng(seed)
        self.vocabulary_size = vocabulary_size
        self.position, self.cache = 0, generation.empty_cache(model, 1)

    def at(self, position):
        """`(cache, seconds of prefill)` at `position` (increasing)."""
        start = time.perf_counter()
        if position > self.position:
            tokens = self.rng.integers(
                1, self.vocabulary_size, (1, position - self.position)
            ).astype("int32")
            _, self.cache = self.generation.call_with_cache(
                self.model, tokens, self.cache, self.position
            )
            self.position = position
        return self.cache, time.perf_counter() - start


def repeat_batch(cache, batch):
    import tensorflow as tf

    return tuple(
        tuple(tf.repeat(x, batch, axis=0) for x in block) for block in cache
    )


def exact_cache(model, batch, position, seed):
    """A key/value cache of `max_length` slots, random keys and values, the
    first `position` of them marked as keys."""
    import tensorflow as tf

    from keras_favor import generation

    cache = []
    for layer, block in enumerate(generation.empty_cache(model, batch)):
        keys, values, mask = block
        filled = [
            tf.random.stateless_normal(
                x.shape, (seed, 2 * layer + i), dtype=x.dtype
            )
            for i, x in enumerate((keys, values))
        ]
        length = mask.shape[1]
        mask = tf.tile(tf.range(length)[None] < position, (batch, 1))
        cache.append((*filled, mask))
    return tuple(cache)


def run(args, environment):
    import tensorflow as tf

    # Each model and batch size gets its own step function, traced once:
    # TensorFlow's warning about functions traced in a loop is expected.
    tf.get_logger().setLevel("ERROR")
    rows = []
    # The tracing call, the warm-up and the timed steps each take a position.
    total = 1 + args.warmup + args.steps
    positions = sorted(args.positions)
    favor = None
    if "favor" in args.models:
        favor_model = build_model(args, "favor", positions[-1] + total)
        favor = FavorCaches(favor_model, args.seed, args.vocabulary_size)
    heads = args.num_heads
    head_dim = args.hidden_dim // heads
    for position in positions:
        length = position + total
        exact_model = None
        if "exact" in args.models:
            exact_model = build_model(args, "exact", length)
        if favor is not None:
            favor_cache, prefill_s = favor.at(position)
            print(f"favor prefill to {position}: {prefill_s:.1f} s", flush=True)
        for batch in args.batches:
            rng = np.random.default_rng([args.seed, position, batch])
            token = rng.integers(1, args.vocabulary_size, (batch, 1)).astype(
                "int32"
            )
            steppers, info = {}, {}
            for name in args.models:
                if name == "favor":
                    start = time.perf_counter()
                    cache = repeat_batch(favor_cache, batch)
                    fill_s = prefill_s + time.perf_counter() - start
                    step, cache_length = make_step(favor.model), ""
                else:
                    kv_bytes = (
                        batch
                        * length
                        * (2 * heads * head_dim * 4 + 1)
                        * args.num_layers
                    )
                    if kv_bytes > args.max_cache_gib * 2**30:
                        print(
                            f"exact at {position}, batch {batch}: cache of "
                            f"{kv_bytes / 2**30:.1f} GiB > --max-cache-gib, skipped"
                        )
                        continue
                    start = time.perf_counter()
                    cache = exact_cache(exact_model, batch, position, args.seed)
                    fill_s = time.perf_counter() - start
                    step, cache_length = make_step(exact_model), length
                steppers[name] = Stepper(step, cache, position, token)
                info[name] = dict(
                    cache_bytes=cache_bytes(cache),
                    cache_length=cache_length,
                    cache_fill_s=round(fill_s, 3),
                )
                del cache
            load = os.getloadavg()[0]
            # The first call traces; then warm-up and timed steps alternate
            # between the models, one step each.
            for name, stepper in steppers.items():
                info[name]["trace_s"] = round(stepper(), 3)
            times = {name: [] for name in steppers}
            for i in range(args.warmup + args.steps):
                for name, stepper in steppers.items():
                    seconds = stepper()
                    if i >= args.warmup:
                        times[name].append(seconds)
            for name in steppers:
                ms = [1000 * t for t in times[name]]
                row = dict(
                    model=name,
                    batch=batch,
                    position=position,
                    **info[name],
                    median_ms=round(statistics.median(ms), 4),
                    min_ms=round(min(ms), 4),
                    max_ms=round(max(ms), 4),
                    steps=args.steps,
                    warmup=args.warmup,
                    num_layers=args.num_layers,
                    hidden_dim=args.hidden_dim,
                    num_heads=heads,
                    num_features=args.num_features,
                    jit_compile=False,
                    load_average=round(load, 2),
                    keras_favor_commit=environment["keras_favor_commit"],
                )
                rows.append(row)
                print(
                    f"{name:5s} batch {batch} position {position:6d}: "
                    f"{row['median_ms']:9.3f} ms/token (min {row['min_ms']:.3f}), "
                    f"cache {row['cache_bytes'] / 2**20:9.2f} MiB",
                    flush=True,
                )
            del steppers
        del exact_model
    return rows


def summarize(rows, positions):
    """The ratios the targets read (issue 14): FAVOR+'s token at 8192 (or the
    second-largest position measured) over its token at the first position,
    and exact over FAVOR+ at each position, per batch."""
    median = {
        (r["model"], r["batch"], r["position"]): r["median_ms"] for r in rows
    }
    first = min(positions)
    target_position = 8192 if 8192 in positions else max(positions)
    summary = {"ratios": [], "targets": []}
    for batch in sorted({r["batch"] for r in rows}):
        for position in sorted(positions):
            f, e = (
                median.get(("favor", batch, position)),
                median.get(("exact", batch, position)),
            )
            summary["ratios"].append(
                dict(
                    batch=batch,
                    position=position,
                    favor_over_favor_first=None
                    if f is None or ("favor", batch, first) not in median
                    else round(f / median[("favor", batch, first)], 3),
                    exact_over_favor=None
                    if f is None or e is None
                    else round(e / f, 2),
                )
            )
        f, e = (
            median.get(("favor", batch, target_position)),
            median.get(("exact", batch, target_position)),
        )
        f0 = median.get(("favor", batch, first))
        if f is not None and f0 is not None:
            summary["targets"].append(
                dict(
                    target=f"favor at {target_position} <= 1.2 x favor at {first}",
                    batch=batch,
                    measured=round(f / f0, 3),
                    met=f / f0 <= 1.2,
                )
            )
        if f is not None and e is not None:
            summary["targets"].append(
                dict(
                    target=f"exact / favor at {target_position} >= 3",
                    batch=batch,
                    measured=round(e / f, 2),
                    met=e / f >= 3,
                )
            )
    return summary


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    batches = sorted({r["batch"] for r in rows})
    figure, axes = plt.subplots(
        1,
        len(batches),
        figsize=(5.5 * len(batches), 4.2),
        sharey=True,
        squeeze=False,
    )
    labels = {
        "favor": "FAVOR+ (recurrent state)",
        "exact": "exact (key/value cache)",
    }
    for ax, batch in zip(axes[0], batches):
        for name, marker in (("favor", "o"), ("exact", "s")):
            points = sorted(
                (r["position"], r["median_ms"])
                for r in rows
                if r["model"] == name and r["batch"] == batch
            )
            if points:
                ax.plot(*zip(*points), marker=marker, label=labels[name])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        positions = sorted({r["position"] for r in rows})
        ax.set_xticks(positions, [str(p) for p in positions])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("position of the generated token")
        ax.set_title(f"batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("time per token (ms, median of steps)")
    r = rows[0]
    figure.suptitle(
        f"Cached decoding step: {r['num_layers']} blocks, hidden "
        f"{r['hidden_dim']}, {r['num_heads']} heads, {r['num_features']} features"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)


def main(argv=None):
    args = parse_args(argv)
    if (
        args.steps < 1
        or args.warmup < 0
        or min(args.positions) < 1
        or min(args.batches) < 1
    ):
        raise SystemExit(
            "--steps, --positions and --batches must be >= 1, --warmup >= 0"
        )
    environment = common.describe()
    started = time.perf_counter()
    rows = run(args, environment)
    summary = summarize(rows, args.positions)
    os.makedirs(args.output_dir, exist_ok=True)
    common.write_csv(
        os.path.join(args.output_dir, "generation.csv"), FIELDS, rows
    )
    settings = {k: v for k, v in vars(args).items() if k != "output_dir"}
    settings.update(
        run_s=round(time.perf_counter() - started, 1),
        favor_cache="prefill at batch 1, repeated over the batch",
        exact_cache="random keys and values, mask True below the position, "
        "max_length = position + 1 + warmup + steps",
    )
    common.write_environment(
        os.path.join(args.output_dir, "generation.json"),
        environment,
        dict(settings, **summary),
    )
    plot(rows, os.path.join(args.output_dir, "generation.png"))
    for line in summary["targets"]:
        print(
            f"batch {line['batch']}: {line['target']}: {line['measured']} "
            f"({'met' if line['met'] else 'not met'})"
        )
    return rows, summary


if __name__ == "__main__":
    main()
