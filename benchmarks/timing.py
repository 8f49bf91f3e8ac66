"""Compiled benchmark steps, their timing, and the process's peak memory."""

import resource
import time

import numpy as np
import tensorflow as tf

PASSES = ("forward", "forward_backward")


def peak_rss_mib():
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_name():
    """The first GPU's name, or None on a CPU-only machine."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    details = tf.config.experimental.get_device_details(gpus[0])
    return details.get("device_name", gpus[0].name)


def grow_gpu_memory():
    """Lets the GPU allocator grow on demand, so its peak means something."""
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)


def reset_gpu_peak():
    if gpu_name() is not None:
        tf.config.experimental.reset_memory_stats("GPU:0")


def gpu_peak_mib():
    if gpu_name() is None:
        return None
    return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20


def random_inputs(length, dim, seed=0):
    values = np.random.default_rng(seed).standard_normal((1, length, dim))
    return tf.constant(values, tf.float32)


def compiled_step(forward, variables, pass_, jit_compile=False):
    """A `tf.function` running `forward` (and its gradient) to one scalar.

    The scalar depends on every output (and every gradient), so fetching it
    waits for the whole step on any device and nothing is pruned.
    """
    if pass_ == "forward":

        def step(x):
            return tf.reduce_sum(forward(x))

    elif pass_ == "forward_backward":

        def step(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(forward(x))
            gradients = tape.gradient(loss, variables)
            return tf.add_n([tf.reduce_sum(g) for g in gradients])

    else:
        raise ValueError(f"`pass_` must be one of {PASSES}. Received: {pass_!r}")
    return tf.function(step, jit_compile=jit_compile)


def time_step(step, x, repeats, warmup=1, budget_s=float("inf"), min_repeats=1):
    """Seconds of the first call (tracing included) and of each timed call.

    Runs `warmup` untimed calls after the first, then up to `repeats` timed
    calls, stopping early once `min_repeats` are done and the timed calls
    have used `budget_s` seconds.
    """
    start = time.perf_counter()
    step(x).numpy()
    first = time.perf_counter() - start
    for _ in range(warmup):
        step(x).numpy()
    times = []
    while len(times) < repeats:
        start = time.perf_counter()
        step(x).numpy()
        times.append(time.perf_counter() - start)
        if len(times) >= min_repeats and sum(times) >= budget_s:
            break
    return first, times
