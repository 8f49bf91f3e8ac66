"""What arithmetic allows: the matrix products of a training step, and their speed.

Counts the matrix products (2 FLOPs per multiply-add) in the graph of the
attention layer's forward + backward step that `speed_memory.py` times,
FAVOR+ and exact, and times this machine's products. With the step times of
the speed CSV it reports each model's GFLOP/s, the FLOP ratio against the
measured speed-up and the rate `--target-speedup` needs; the causal step's
FLOPs against the bidirectional step's; and at L = 8192 a floor under each
step: its products rebuilt and run one after another, alone, and the fewest
elementwise passes FAVOR+'s features need.

    python -m benchmarks.flop_bound          # after speed_memory.py
"""

import math
import os

from benchmarks import common
from benchmarks import models
from benchmarks import speed_memory

# (rows, inner, columns) of the products timed for the machine's rate: a
# projection of the benchmark at L = 8192, and a large square product.
RATE_SHAPES = ((8192, models.HIDDEN, models.HIDDEN), (4096, 4096, 4096))
CAUSAL_LENGTHS = (8192, 16384, 32768)
FLOOR_LENGTH = 8192


def step_graph(kind, mode, length):
    """The graph of the layer's forward + backward step, traced, not run.

    Products in nested functions are not in it, so FAVOR+ must run in one
    group: `length` at most the layer's `recompute_length`.
    """
    layer, forward = models.build("layer", kind, mode == "causal", length)
    if length > getattr(layer, "recompute_length", length):
        raise ValueError(
            f"L={length} runs in recomputed groups, whose products are not counted."
        )
    step = models.compiled_step(
        forward, layer.trainable_variables, "forward_backward"
    )
    return step.get_concrete_function(models.random_inputs(length)).graph


def products(graph):
    """The product ops (MatMul, BatchMatMulV2, Einsum) the graph's outputs depend on."""
    seen, stack, found = set(), [t.op for t in graph.outputs], []
    while stack:
        op = stack.pop()
        if op.name not in seen:
            seen.add(op.name)
            found += (
                [op] if op.type in ("MatMul", "BatchMatMulV2", "Einsum") else []
            )
            stack += [t.op for t in op.inputs] + list(op.control_inputs)
    return found


def flops(op):
    """2 x the multiply-adds of a product op: 2 x its output's size x the contracted size."""
    if op.type == "Einsum":
        inputs, output = op.get_attr("equation").decode().split("->")
        sizes = {}
        for spec, tensor in zip(inputs.split(","), op.inputs):
            head, _, tail = spec.partition(
                "..."
            )  # the ellipsis' axes are never contracted
            shape = tensor.shape.as_list()
            sizes.update(
                zip(head, shape),
                **dict(zip(tail, shape[len(shape) - len(tail) :])),
            )
        contracted = math.prod(
            size for name, size in sizes.items() if name not in output
        )
    else:  # the first input's last two axes: the output's rows and the contracted axis
        a, rows = op.inputs[0].shape.as_list(), op.outputs[0].shape[-2]
        contracted = a[-2] * a[-1] // rows
    return 2 * op.outputs[0].shape.num_elements() * contracted


def step_flops(kind, mode, length):
    return sum(flops(op) for op in products(step_graph(kind, mode, length)))


def rebuilt_product(op):
    """A function doing the product `op` does (same type, shapes, transposes,
    equation, dtype), and random inputs for it."""
    import tensorflow as tf

    inputs = [tf.random.normal(t.shape, dtype=t.dtype) for t in op.inputs]
    if op.type == "Einsum":
        equation = op.get_attr("equation").decode()
        return (lambda a, b: tf.einsum(equation, a, b)), inputs
    names = (
        ("adj_x", "adj_y")
        if op.type == "BatchMatMulV2"
        else ("transpose_a", "transpose_b")
    )
    transposes = [op.get_attr(name) for name in names]
    return (lambda a, b: tf.linalg.matmul(a, b, *transposes)), inputs


def best_time_s(fn, inputs, repeats=5):
    """Fastest of `repeats` calls of `fn(*inputs)` compiled, fetching one entry."""
    import tensorflow as tf

    run = tf.function(lambda *x: tf.reshape(fn(*x), [-1])[0])
    return min(common.time_calls(run, inputs, repeats)[1])


def feature_passes_s(length, repeats=20):
    """Seconds of the fewest elementwise passes FAVOR+'s features need, and of each.

    Each op timed alone over `(1, H, L, F)` float32: the keys' and the
    queries' max, shift (the queries' twice) and exp, and the exps'
    gradients, two products: what unfused TensorFlow ops cannot avoid.
    """
    import tensorflow as tf

    x, y = tf.random.normal(
        (2, 1, models.NUM_HEADS, length, models.NUM_FEATURES)
    )
    row = tf.random.normal((1, models.NUM_HEADS, length, 1))
    passes = {
        "max": (2, lambda x: tf.reduce_max(x, -1), [x]),  # (count, op, inputs)
        "subtract": (3, tf.subtract, [x, row]),
        "exp": (2, tf.exp, [x]),
        "product": (2, tf.multiply, [x, y]),
    }
    seconds = {
        name: best_time_s(fn, inputs, repeats)
        for name, (_, fn, inputs) in passes.items()
    }
    return sum(passes[name][0] * s for name, s in seconds.items()), seconds


def report(medians, target):
    """The lines of the report, from `{(model, mode): {length: median_s}}`."""
    import tensorflow as tf

    rates = {
        shape: 2
        * shape[0]
        * shape[1]
        * shape[2]
        / 1e9
        / best_time_s(
            tf.matmul,
            [tf.random.normal(shape[:2]), tf.random.normal(shape[1:])],
            20,
        )
        for shape in RATE_SHAPES
    }
    lines = [
        "matrix-product rate of this machine (float32, best of 20): "
        + ", ".join(
            f"{'x'.join(map(str, shape))}: {rate:.0f} GFLOP/s"
            for shape, rate in rates.items()
        )
    ]
    favor, exact = (
        medians["favor", "bidirectional"],
        medians["exact", "bidirectional"],
    )
    for length in sorted(set(favor) & set(exact)):
        favor_flops, exact_flops = (
            step_flops(kind, "bidirectional", length)
            for kind in ("favor", "exact")
        )
        needed = favor_flops / (exact[length] / target) / 1e9
        lines.append(
            f"L={length}: FAVOR+ {favor_flops / 1e9:.1f} GFLOP in {favor[length]:.3f} s = "
            f"{favor_flops / favor[length] / 1e9:.0f} GFLOP/s; exact {exact_flops / 1e9:.1f} "
            f"GFLOP in {exact[length]:.3f} s = {exact_flops / exact[length] / 1e9:.0f} GFLOP/s; "
            "FLOP ratio "
            f"{exact_flops / favor_flops:.1f}x, measured {exact[length] / favor[length]:.1f}x; "
            f"{target:g}x needs FAVOR+ at {needed:.0f} GFLOP/s ({needed / max(rates.values()):.0%} "
            "of the best product rate) in matrix products alone"
        )
    for length in CAUSAL_LENGTHS:
        causal_flops = step_flops("favor", "causal", length)
        line = (
            f"L={length}: causal FAVOR+ {causal_flops / 1e9:.1f} GFLOP, "
            f"{causal_flops / step_flops('favor', 'bidirectional', length):.2f}x the "
            "bidirectional step's"
        )
        if length in favor and length in medians["favor", "causal"]:
            line += f"; measured {medians['favor', 'causal'][length] / favor[length]:.2f}x its time"
        lines.append(line)
    (
        favor_alone,
        exact_alone,
    ) = (  # the step's products one after another, each run alone
        sum(
            best_time_s(*rebuilt_product(op))
            for op in products(step_graph(kind, "bidirectional", FLOOR_LENGTH))
        )
        for kind in ("favor", "exact")
    )
    passes, each = feature_passes_s(FLOOR_LENGTH)
    lines.append(
        f"L={FLOOR_LENGTH}: products alone, one after another: FAVOR+ {favor_alone:.3f} s, exact "
        f"{exact_alone:.3f} s; one elementwise pass over the (1, H, L, F) features: "
        + ", ".join(f"{name} {s * 1e3:.1f} ms" for name, s in each.items())
        + f"; the fewest FAVOR+ needs: {passes:.3f} s"
    )
    if FLOOR_LENGTH in favor and FLOOR_LENGTH in exact:
        lines.append(
            f"L={FLOOR_LENGTH}: {target:g}x needs the FAVOR+ step within "
            f"{exact[FLOOR_LENGTH] / target:.3f} s (exact: {exact[FLOOR_LENGTH]:.3f} s); its "
            f"products and fewest passes alone take {favor_alone + passes:.3f} s (the step: "
            f"{favor[FLOOR_LENGTH]:.3f} s)"
        )
    return lines


def main():
    args = common.parse_args(__doc__, target_speedup=10.0)
    environment = common.describe()
    device = "gpu" if environment["gpu"] else "cpu"
    stem = os.path.join(args.output_dir, f"flop_bound_{device}")
    csv_path = os.path.join(args.output_dir, f"speed_memory_{device}.csv")
    rows = speed_memory.read_rows(csv_path) if os.path.exists(csv_path) else []
    medians = {
        (model, mode): speed_memory.measured(
            rows, "layer", model, mode, "forward_backward"
        )
        for model in ("favor", "exact")
        for mode in speed_memory.MODES
    }
    lines = report(medians, args.target_speedup)
    common.write_environment(stem + ".json", environment, vars(args))
    common.write_lines(stem + ".txt", lines)


if __name__ == "__main__":
    main()
