"""A result computed again by a slower algorithm where a check flags it.

`with_fallback(main_fn, fallback_fn, inputs)` runs `main_fn`, which also
returns a flag, and where the flag holds, returns `fallback_fn`'s results
instead; gradients are those of the branch taken. The causal kernel uses
it for the groups of positions whose one-level normalizers may be lost
(`causal_attention`).

On TensorFlow, `tf.cond`'s gradient makes each branch output the other
branch's intermediates, as zeros where that branch did not run, and
Grappler folds those zeros into constants of their full size that live as
long as the traced step: a causal training step over 65536 positions kept
1.1 GiB of them, one set per group of positions. So on TensorFlow the
selection is a `tf.custom_gradient`: the main results' gradients come from
a tape over `main_fn`, the fallback's from `fallback_fn` recomputed in the
backward pass, under a conditional whose branches both return real
gradients. On JAX, whose `cond` under `jax.grad` likewise hands the
untaken branch's residuals (zeros) to the backward pass, the selection is a
`jax.custom_vjp` built the same way: the main results' pullback is kept,
and the fallback's is recomputed in the backward pass only where it ran.
On JAX the selection is therefore differentiated in reverse mode only
(`jax.jvp` of it raises). Other backends differentiate `keras.ops.cond` as
it is.

The fallback is in every traced step, whether it runs or not, and the
backward pass recomputes it: on TensorFlow it runs through `trace_cache`,
traced once per signature of its inputs for every later trace (each `fit`,
`predict` and export, the forward and the backward pass, a recomputed
group of positions). So `fallback_fn` must be a function of its inputs
alone: a function without a closure, or a `functools.partial` of one with
hashable keyword arguments.
"""

from keras_favor import backend
from keras_favor.ops.trace_cache import call_traced
from keras_favor.ops.trace_cache import pure_function_and_keywords


def with_fallback(main_fn, fallback_fn, inputs):
    """`main_fn(inputs)`, or `fallback_fn(inputs)` where it flags itself.

    Args:
        main_fn: `main_fn(inputs)` returns `(results, flag)`: a list of
            floating tensors and a scalar bool tensor.
        fallback_fn: `fallback_fn(inputs)` returns a list of tensors of the
            results' shapes and dtypes. A function of `inputs` alone
            (`trace_cache`): a function without a closure, or a
            `functools.partial` of one with hashable keyword arguments.
        inputs: a list of tensors (None for an absent one) that both
            functions read; gradients flow to its floating tensors. The
            functions read no trainable variable (on TensorFlow their
            gradients would be lost). A tensor that `main_fn` captures
            gets no gradient on TensorFlow; on JAX, whose backward pass
            runs outside the enclosing transformation, it must come in
            `inputs` instead.

    Returns:
        The list of results of `fallback_fn` if the flag holds, else those
        of `main_fn`.
    """
    pure_function_and_keywords(fallback_fn, "fallback_fn")
    inputs = list(inputs)
    if backend.name() == "jax":
        return _jax_fallback(main_fn, fallback_fn, inputs)
    if not backend.is_tensorflow():
        results, flag = main_fn(inputs)
        return list(
            backend.cond(
                flag, lambda: list(fallback_fn(inputs)), lambda: list(results)
            )
        )
    return _tensorflow_fallback(main_fn, fallback_fn, inputs)


def recomputed_gradients(fn, sources, upstream):
    """The gradients of `fn(*sources)` given `upstream`, with `fn`
    computed again under a TensorFlow tape.

    Sources that are None or not floating get a None gradient.
    """
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch([x for x in sources if _differentiable(x)])
        results = fn(*sources)
    return _tape_gradients(tape, results, sources, upstream)


def _differentiable(x):
    return x is not None and x.dtype.is_floating


def _tape_gradients(tape, results, sources, upstream):
    """`tape`'s gradients of `results` given `upstream`, one per source:
    None for a source that is None or not floating, zeros for one that
    `results` do not depend on."""
    import tensorflow as tf

    watched = [x for x in sources if _differentiable(x)]
    grads = iter(
        tape.gradient(
            results,
            watched,
            output_gradients=upstream,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
    )
    return [next(grads) if _differentiable(x) else None for x in sources]


def _tensorflow_fallback(main_fn, fallback_fn, inputs):
    import tensorflow as tf

    # NumPy arrays (an eager call's inputs) as tensors, which have a dtype
    # that says whether they are differentiable.
    inputs = [None if x is None else tf.convert_to_tensor(x) for x in inputs]
    present = [x is not None for x in inputs]

    def complete(args):
        values = iter(args)
        return [next(values) if p else None for p in present]

    @tf.custom_gradient
    def select(*args):
        # Persistent: an outer persistent tape, or a second-order gradient,
        # calls `gradient` more than once.
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([x for x in args if _differentiable(x)])
            results, flag = main_fn(complete(args))
        results = list(results)
        chosen = tf.nest.flatten(
            tf.cond(
                flag,
                lambda: call_traced(fallback_fn, complete(args)),
                lambda: [tf.identity(x) for x in results],
            )
        )

        def gradient(*upstream):
            upstream = [
                tf.zeros_like(result) if grad is None else grad
                for result, grad in zip(chosen, upstream)
            ]
            # The main results' gradients, also where the fallback ran:
            # under the conditional they would be its intermediates again.
            main = _tape_gradients(tape, results, args, upstream)

            def fallback():
                return recomputed_gradients(
                    lambda *args: call_traced(fallback_fn, complete(args)),
                    list(args),
                    upstream,
                )

            taken = tf.cond(
                flag,
                lambda: [g for g in fallback() if g is not None],
                lambda: [g for g in main if g is not None],
            )
            taken = iter(tf.nest.flatten(taken))
            return [next(taken) if g is not None else None for g in main]

        return chosen, gradient

    return list(select(*[x for x in inputs if x is not None]))


def _jax_fallback(main_fn, fallback_fn, inputs):
    """`with_fallback` on JAX: a `jax.custom_vjp` over the floating
    inputs."""
    import jax
    import jax.numpy as jnp

    inputs = [None if x is None else jnp.asarray(x) for x in inputs]
    floating = [
        x is not None and jnp.issubdtype(x.dtype, jnp.floating) for x in inputs
    ]
    # The floating inputs are differentiated; the others (a mask, a seed)
    # ride along with no cotangent.
    sources = [x if f else None for x, f in zip(inputs, floating)]
    others = [None if f else x for x, f in zip(inputs, floating)]

    def complete(sources, others):
        return [s if f else o for s, o, f in zip(sources, others, floating)]

    def main(sources, others):
        results, flag = main_fn(complete(sources, others))
        return list(results), flag

    def choose(flag, sources, others, results):
        return list(
            backend.cond(
                flag,
                lambda: list(fallback_fn(complete(sources, others))),
                lambda: list(results),
            )
        )

    @jax.custom_vjp
    def select(sources, others):
        results, flag = main(sources, others)
        return choose(flag, sources, others, results)

    def forward(sources, others):
        results, main_pullback, flag = jax.vjp(
            lambda s: main(s, others), sources, has_aux=True
        )
        chosen = choose(flag, sources, others, results)
        return chosen, (sources, others, main_pullback, flag)

    def backward(residuals, upstream):
        sources, others, main_pullback, flag = residuals

        def fallback():
            _, pullback = jax.vjp(
                lambda s: list(fallback_fn(complete(s, others))), sources
            )
            return pullback(upstream)[0]

        grads = backend.cond(flag, fallback, lambda: main_pullback(upstream)[0])
        return grads, None

    select.defvjp(forward, backward)
    return select(sources, others)
