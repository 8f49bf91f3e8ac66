"""What arithmetic allows: the FLOPs of one training step and this machine's rate.

Counts the floating-point operations of the bidirectional forward + backward
step that `speed_memory.py` times for `FavorAttention` and for exact
`keras.layers.MultiHeadAttention`, measures how fast this machine multiplies
matrices, and reads the measured step times from the speed CSV. From these it
reports each model's achieved rate and the rate FAVOR+ would need for a given
speed-up over exact attention (issue 5's 10x at L = 8192), the causal
step's FLOPs (counted in its graph) beside the bidirectional step's, and at
L = 8192 how long each step's products take when run one by one, alone: a
floor under the step's time.

    python benchmarks/flop_bound.py          # after speed_memory.py

Only matrix products are counted (2 FLOPs per multiply-add); the elementwise
work (exponentials, softmax, normalisation) is left out, so a needed rate is
a lower bound on what the implementation would have to reach.
"""

import argparse
import csv
import os
import time

import common
import models
from keras_favor.ops import linear_attention

# (rows, inner, columns) of the products timed for the machine's rate: a
# projection of the benchmark at L = 8192, and a large square product.
RATE_SHAPES = ((8192, models.HIDDEN, models.HIDDEN), (4096, 4096, 4096))
# Causal steps whose products are counted from their graphs: one group each.
CAUSAL_LENGTHS = (8192, 16384, 32768)
# Steps whose products are also timed one by one: the speed-up target's length.
FLOOR_LENGTHS = (8192,)


def projection_flops(length):
    """Query, key, value and output projections, forward and backward.

    The query, key and value products, the four kernels' gradients and the
    output projection's input gradient. TensorFlow prunes the rest: the
    benchmark's input takes no gradient, and the timed step returns only
    gradients, which for a sum of outputs need no output projection.
    """
    return 8 * 2 * length * models.HIDDEN * models.HIDDEN


def favor_step_flops(length):
    """FavorAttention's bidirectional step, projections included.

    Forward: the query and key feature projections `(L, d) x (d, F)`, then
    `K'^T V` and `Q' (K'^T V)`. Backward: the gradients of `Q'`, `K'^T V`,
    `K'` and `V`, and of the query and key heads through the projections.
    Ten products of `2 L H F d` FLOPs each.
    """
    core = 10 * 2 * length * models.NUM_HEADS * models.NUM_FEATURES * models.KEY_DIM
    return projection_flops(length) + core


def chunk_prefix_flops(num_chunks):
    """Forward FLOPs per head of passing `num_chunks` chunk states on.

    As `inherited_states` does it: in blocks of `PREFIX_BLOCK` chunks (a
    `b x b` product per block and the blocks' sums), recursively, down to
    one dense `n x n` product, for the `(F, D)` states and the `F` sums.
    The last state, unused in a single group, is pruned.
    """
    state = models.NUM_FEATURES * models.KEY_DIM + models.NUM_FEATURES
    block = linear_attention.PREFIX_BLOCK
    if num_chunks > block and num_chunks % block == 0:
        blocks = num_chunks // block
        within = 2 * num_chunks * block * state + 2 * num_chunks * state
        return within + chunk_prefix_flops(blocks)
    return 2 * num_chunks * num_chunks * state


def favor_causal_step_flops(length, chunk_size):
    """FavorAttention's causal step in one group, projections included.

    The two feature projections with their gradients; for each chunk
    `K'^T V`, `Q' S` from the inherited states, the `C x C` scores
    `Q' K'^T` and their product with `V`, each with two gradients; the
    normalizer's `K'^T 1` (its weights, the per-position decay, take no
    gradient) and `Q' z`; the chunk-state prefix, whose decay factors take
    no gradient either.
    """
    heads, features, dim = models.NUM_HEADS, models.NUM_FEATURES, models.KEY_DIM
    per_position = (
        4 * features * dim
        + 6 * features * dim
        + 3 * chunk_size * (features + dim)
        + 5 * features
    )
    prefix = 2 * heads * chunk_prefix_flops(length // chunk_size)
    return projection_flops(length) + 2 * length * heads * per_position + prefix


def exact_step_flops(length):
    """Exact attention's step: `Q K^T` and `A V`, each with two gradients."""
    core = 6 * 2 * length * length * models.NUM_HEADS * models.KEY_DIM
    return projection_flops(length) + core


def product_transposes(op):
    """`(transpose_a, transpose_b)` of a MatMul or BatchMatMulV2 graph op."""
    names = ("transpose_a", "transpose_b")
    if op.type == "BatchMatMulV2":
        names = ("adj_x", "adj_y")
    return tuple(op.get_attr(name) for name in names)


def product_flops(op):
    """2 x multiply-adds of a MatMul, BatchMatMulV2 or Einsum graph op."""
    if op.type == "Einsum":
        inputs, _ = op.get_attr("equation").decode().split("->")
        sizes = {}
        for spec, tensor in zip(inputs.split(","), op.inputs):
            shape = tensor.shape.as_list()
            if "..." in spec:
                # The ellipsis' axes get digits as their letters.
                head, tail = spec.split("...")
                ellipsis = len(shape) - len(head) - len(tail)
                spec = head + "".join(map(str, range(ellipsis))) + tail
            sizes.update(zip(spec, shape))
        flops = 2
        for size in sizes.values():
            flops *= size
        return flops
    a, b = (tensor.shape.as_list() for tensor in op.inputs)
    transpose_a, transpose_b = product_transposes(op)
    rows, inner = (a[-1], a[-2]) if transpose_a else (a[-2], a[-1])
    columns = b[-2] if transpose_b else b[-1]
    batch = 1
    for size in (a[:-2] if len(a) >= len(b) else b[:-2]):
        batch *= size
    return 2 * batch * rows * inner * columns


def executed_products(graph):
    """The products (`MatMul`, `BatchMatMulV2`, `Einsum` ops) that the
    graph's outputs depend on."""
    seen, stack, products = set(), [t.op for t in graph.outputs], []
    while stack:
        op = stack.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        if op.type in ("MatMul", "BatchMatMulV2", "Einsum"):
            products.append(op)
        stack.extend(t.op for t in op.inputs)
        stack.extend(op.control_inputs)
    return products


def executed_product_flops(graph):
    """FLOPs of the products that the graph's outputs depend on."""
    return sum(product_flops(op) for op in executed_products(graph))


def step_graph(kind, mode, length):
    """The graph of the forward + backward step `speed_memory.py` times.

    Traced, not run, for the attention layer `kind` at `length`. Products
    inside nested functions are not in it: keep `length` within one group
    of `RECOMPUTE_GROUP_LENGTH`.
    """
    import timing

    layer = models.attention_layer(kind)
    x = timing.random_inputs(length, models.HIDDEN)
    layer.build(x.shape, x.shape)
    step = timing.compiled_step(
        lambda x: layer(x, x, use_causal_mask=mode == "causal"),
        layer.trainable_weights,
        "forward_backward",
    )
    return step.get_concrete_function(x).graph


def graph_step_flops(kind, mode, length):
    """Product FLOPs of the timed step, counted in its graph."""
    return executed_product_flops(step_graph(kind, mode, length))


def rebuilt_product(op):
    """A function computing the product `op` does, and random inputs for it.

    The same op type, shapes, transposes (or einsum equation) and dtype.
    """
    import tensorflow as tf

    inputs = [tf.random.normal(t.shape, dtype=t.dtype) for t in op.inputs]
    if op.type == "Einsum":
        equation = op.get_attr("equation").decode()
        return lambda a, b: tf.einsum(equation, a, b), inputs
    transpose_a, transpose_b = product_transposes(op)
    return (
        lambda a, b: tf.linalg.matmul(
            a, b, transpose_a=transpose_a, transpose_b=transpose_b
        ),
        inputs,
    )


def best_time_s(fn, inputs, repeats):
    """Best seconds of `fn(*inputs)` compiled, fetching one entry of it."""
    import tensorflow as tf

    run = tf.function(lambda *x: tf.reshape(fn(*x), [-1])[0])
    run(*inputs).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(*inputs).numpy()
        times.append(time.perf_counter() - start)
    return min(times)


def product_alone_s(op, repeats):
    """Best seconds of the product `op` computes, run alone."""
    return best_time_s(*rebuilt_product(op), repeats)


def products_alone_s(kind, mode, length, repeats=5):
    """Seconds the step's products take one after another, each run alone.

    A floor for the step on this machine: its time with no elementwise work
    at all.
    """
    return sum(
        product_alone_s(op, repeats)
        for op in executed_products(step_graph(kind, mode, length))
    )


def feature_passes_s(length, repeats=20):
    """Seconds of the fewest elementwise passes FAVOR+'s features need.

    Over `(1, H, L, F)` float32, each op timed alone: forward, the keys' max
    and shift and exp, the queries' added `log z`, max, shift and exp (the
    keys' `|k|^2 / 2` could be folded into their projection); backward, the
    two products of a gradient with the features, which is the exp's
    gradient. Two maxima, three broadcast subtractions, two exps, two
    products: what unfused TensorFlow ops cannot avoid.
    """
    import tensorflow as tf

    shape = (1, models.NUM_HEADS, length, models.NUM_FEATURES)
    x, y = tf.random.normal(shape), tf.random.normal(shape)
    row = tf.random.normal(shape[:-1] + (1,))
    seconds = {
        "max": best_time_s(lambda x: tf.reduce_max(x, -1), [x], repeats),
        "subtract": best_time_s(lambda x, r: x - r, [x, row], repeats),
        "exp": best_time_s(tf.exp, [x], repeats),
        "product": best_time_s(lambda x, y: x * y, [x, y], repeats),
    }
    counts = {"max": 2, "subtract": 3, "exp": 2, "product": 2}
    return sum(counts[name] * seconds[name] for name in counts), seconds


def matmul_rate(rows, inner, columns, repeats=20):
    """Best GFLOP/s of a float32 `(rows, inner) x (inner, columns)` product."""
    import tensorflow as tf

    a = tf.random.normal((rows, inner))
    b = tf.random.normal((inner, columns))
    seconds = best_time_s(tf.matmul, [a, b], repeats)
    return 2 * rows * inner * columns / seconds / 1e9


def measured_medians(csv_path):
    """`{(model, mode, length): median_s}` of the layer's training steps."""
    medians = {}
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            if (
                row["level"] == "layer"
                and row["pass"] == "forward_backward"
                and row["status"] == "ok"
            ):
                key = row["model"], row["mode"], int(row["length"])
                medians[key] = float(row["median_s"])
    return medians


def speedup_lines(medians, rates, target_speedup):
    """Lines comparing achieved rates with what `target_speedup` needs."""
    best_rate = max(rates.values())
    lines = []
    lengths = sorted(
        length
        for model, mode, length in medians
        if model == "favor"
        and mode == "bidirectional"
        and ("exact", mode, length) in medians
    )
    for length in lengths:
        favor_flops, exact_flops = favor_step_flops(length), exact_step_flops(length)
        favor_s = medians["favor", "bidirectional", length]
        exact_s = medians["exact", "bidirectional", length]
        needed_rate = favor_flops / (exact_s / target_speedup) / 1e9
        lines.append(
            f"L={length}: FAVOR+ {favor_flops / 1e9:.1f} GFLOP in {favor_s:.3f} s "
            f"= {favor_flops / favor_s / 1e9:.0f} GFLOP/s; exact {exact_flops / 1e9:.1f} GFLOP "
            f"in {exact_s:.3f} s = {exact_flops / exact_s / 1e9:.0f} GFLOP/s; "
            f"FLOP ratio {exact_flops / favor_flops:.1f}x, measured {exact_s / favor_s:.1f}x; "
            f"{target_speedup:g}x needs FAVOR+ at {needed_rate:.0f} GFLOP/s "
            f"({needed_rate / best_rate:.0%} of the best product rate) in matrix products alone"
        )
    return lines


def causal_lines(medians, causal_flops):
    """Lines comparing the causal and bidirectional steps' FLOPs and times."""
    lines = []
    for length, flops in sorted(causal_flops.items()):
        ratio = flops / favor_step_flops(length)
        line = (
            f"L={length}: causal FAVOR+ {flops / 1e9:.1f} GFLOP (from the step "
            f"graph), {ratio:.2f}x the bidirectional step's"
        )
        times = [medians.get(("favor", mode, length)) for mode in ("causal", "bidirectional")]
        if None not in times:
            line += f"; measured {times[0] / times[1]:.2f}x its time"
        lines.append(line)
    return lines


def floor_lines(medians, floors, target_speedup):
    """Lines comparing each step with its products and passes run alone."""
    lines = []
    for length, (favor_floor, exact_floor, passes_s, pass_s) in sorted(
        floors.items()
    ):
        favor_s = medians.get(("favor", "bidirectional", length))
        exact_s = medians.get(("exact", "bidirectional", length))
        lines.append(
            f"L={length}: products alone, one after another: FAVOR+ "
            f"{favor_floor:.3f} s, exact {exact_floor:.3f} s; one elementwise "
            "pass over the (1, H, L, F) features: "
            + ", ".join(f"{name} {s * 1e3:.1f} ms" for name, s in pass_s.items())
            + f"; the fewest FAVOR+ needs: {passes_s:.3f} s"
        )
        if favor_s is not None and exact_s is not None:
            allowed = exact_s / target_speedup
            lines.append(
                f"L={length}: {target_speedup:g}x needs the FAVOR+ step within "
                f"{allowed:.3f} s (exact: {exact_s:.3f} s); its products and "
                f"fewest passes alone take {favor_floor + passes_s:.3f} s "
                f"(the step: {favor_s:.3f} s)"
            )
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=os.path.join(common.RESULTS_DIR, "speed_memory_cpu.csv"))
    parser.add_argument("--target-speedup", type=float, default=10.0)
    parser.add_argument("--output", default=os.path.join(common.RESULTS_DIR, "flop_bound_cpu.txt"))
    args = parser.parse_args()
    rates = {shape: matmul_rate(*shape) for shape in RATE_SHAPES}
    medians = measured_medians(args.csv)
    causal_flops = {
        length: graph_step_flops("favor", "causal", length)
        for length in CAUSAL_LENGTHS
    }
    lines = [
        "matrix-product rate of this machine (float32, best of 20): "
        + ", ".join(f"{'x'.join(map(str, s))}: {r:.0f} GFLOP/s" for s, r in rates.items())
    ]
    lines += speedup_lines(medians, rates, args.target_speedup)
    lines += causal_lines(medians, causal_flops)
    floors = {
        length: (
            products_alone_s("favor", "bidirectional", length),
            products_alone_s("exact", "bidirectional", length),
            *feature_passes_s(length),
        )
        for length in FLOOR_LENGTHS
    }
    lines += floor_lines(medians, floors, args.target_speedup)
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
