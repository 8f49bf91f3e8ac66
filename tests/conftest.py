"""Shared fixtures: deterministic, small inputs; the markers.

The folders mirror the package (tests/ops for keras_favor/ops, ...);
tests/integration holds the README, example, benchmark and cross-backend
runs, marked `integration` here.

The suite runs on the Keras backend of `KERAS_BACKEND` (TensorFlow unless
set). `make test` runs all of it on TensorFlow, then the modules marked
`backend_independent` (`pytestmark = pytest.mark.backend_independent`) on
JAX: `KERAS_BACKEND=jax pytest -m backend_independent`. Those modules use
`keras.ops` and NumPy references only (gradients: `tests.reference.
gradients`); a test among them that needs the TensorFlow backend says so
with `@pytest.mark.tensorflow_only` and is skipped on another backend, and
one that needs JAX (`jax.shard_map` over devices) with
`@pytest.mark.jax_only`. A parametrized test marked
`@pytest.mark.backend_samples(n)` runs every case on TensorFlow and `n` of
them, spread evenly, on JAX, where compiling each case costs seconds (no
test is skipped for any other reason). On JAX the host CPU shows 8
devices (`XLA_FLAGS`), for the context-parallel tests; on TensorFlow 4
logical CPUs, for those of `tf.distribute` replicas. `make test-fast`
runs the unit tests of the core on TensorFlow (Makefile).
"""

import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow 2.21's oneDNN batch matmul corrupts the heap on some broadcast
# shapes (tensorflow/tensorflow#117700, #123109; uxlfoundation/oneDNN#4396):
# 4 of 16 full runs here aborted or segfaulted inside oneDNN's brgemm matmul.
# The tests check keras_favor's numbers, so they run TensorFlow's own kernels;
# set TF_ENABLE_ONEDNN_OPTS=1 to run them with oneDNN.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# With a pytest-xdist worker per core (make test: `-n 2` on 2 cores), each
# worker's TensorFlow runs an op on one thread rather than splitting it
# across cores the other worker keeps busy; the subprocesses of its tests
# inherit the setting. (A 2000 x 2000 matmul here: 15 % less CPU on one
# thread; on the whole TensorFlow pass the gain was within the noise.)
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) >= (
    os.cpu_count() or 1
):
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")


def _add_xla_flag(flag, value):
    """Appends `flag=value` to `XLA_FLAGS`, read when XLA starts, unless the
    flag is given."""
    flags = os.environ.get("XLA_FLAGS", "")
    if flag not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {flag}={value}".strip()


# Eight emulated CPU devices for the sequence-sharded tests, set before JAX
# starts.
DEVICES_FLAG = "--xla_force_host_platform_device_count"
if os.environ.get("KERAS_BACKEND") == "jax":
    _add_xla_flag(DEVICES_FLAG, 8)
# The tests check numbers, not speed: XLA compiles each small program
# without its costly optimization passes (on TensorFlow, `jit_compile=True`
# steps; on JAX, every step), which take most of its compile time (one fit
# step of a causal layer: seconds to compile, milliseconds to run): the
# flags of `jax_disable_most_optimizations`, the CPU's loop emitters instead
# of its fusion emitters, and one LLVM module per program. Together they
# more than halve a causal layer's compile time. The subprocesses of the
# tests inherit them.
_add_xla_flag("--xla_backend_optimization_level", 0)
_add_xla_flag("--xla_llvm_disable_expensive_passes", "true")
_add_xla_flag("--xla_cpu_use_fusion_emitters", "false")
_add_xla_flag("--xla_cpu_parallel_codegen_split_count", 1)
# JAX's lowering gives each operation the location of the frame that made
# it instead of its whole Python traceback (locations only name the source
# in compiler messages): about 2 % of the JAX pass's CPU in a profile here.
os.environ.setdefault("JAX_INCLUDE_FULL_TRACEBACKS_IN_LOCATIONS", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Four logical CPUs for the tf.distribute replicas of the sequence-sharded
# tests, set before TensorFlow's runtime starts; ops without a device scope
# still run on the first.
TF_CPUS = 4


def _runs_tests(config):
    """Whether this process runs tests: not pytest-xdist's controller, which
    only hands them to its workers and so never imports Keras (on 2 cores,
    its import of TensorFlow would delay the workers' start by seconds)."""
    return hasattr(config, "workerinput") or not config.getoption(
        "numprocesses", default=None
    )


def _start_keras():
    """Imports Keras and, on TensorFlow, splits the CPU into `TF_CPUS`
    logical devices."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration()] * TF_CPUS,
        )


def pytest_configure(config):
    if _runs_tests(config):
        _start_keras()
    config.addinivalue_line(
        "markers",
        "backend_independent: the module runs on every Keras backend "
        "(make test also runs it with KERAS_BACKEND=jax)",
    )
    config.addinivalue_line(
        "markers",
        "tensorflow_only: needs the TensorFlow backend (tf.function, "
        "tf.distribute, SavedModel); skipped on another backend",
    )
    config.addinivalue_line(
        "markers",
        "jax_only: needs the JAX backend (jax.shard_map over devices); "
        "skipped on another backend",
    )
    config.addinivalue_line(
        "markers",
        "backend_samples(n): a parametrized test of a backend_independent "
        "module runs n of its cases, spread evenly, on JAX (all of them on "
        "TensorFlow)",
    )
    config.addinivalue_line(
        "markers",
        "integration: a long run (all of tests/integration: README, "
        "examples, benchmarks, cross-backend subprocesses; and trainings "
        "and multi-process runs elsewhere); make test-fast leaves them out",
    )


INTEGRATION = os.path.join(os.path.dirname(__file__), "integration")

# Modules of long tests (subprocesses, whole trainings), run first so that
# `pytest -n 2` does not end with one worker busy and the other idle.
LONG_MODULES = (
    "test_jax_backend.py",
    "test_readme.py",
    "test_distributed.py",
    "test_convert_pretrained.py",
    "test_examples.py",
    "test_generation.py",
    "test_quality_benchmark.py",
    "test_benchmarks.py",
    "test_feature_redraw.py",
    "test_ops_against_reference.py",
    "test_benchmark_registry.py",
    "test_keras_hub_generate.py",
    "test_context_parallel_exactness.py",
)


def pytest_ignore_collect(collection_path, config):
    """Under `-m backend_independent` (make test's JAX pass), a test module
    that never names the marker has no test to run, so it is not imported:
    the keras-hub and benchmark modules would import TensorFlow into each
    JAX worker (about 5 s of CPU)."""
    if config.getoption("markexpr") != "backend_independent":
        return None
    path = collection_path
    if path.suffix == ".py" and path.name.startswith("test_"):
        if "backend_independent" not in path.read_text():
            return True
    return None


# First, so that `-m "not integration"` sees the marker.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    import keras

    items.sort(key=lambda item: item.path.name not in LONG_MODULES)
    for item in items:
        if str(item.path).startswith(INTEGRATION + os.sep):
            item.add_marker(pytest.mark.integration)
    backend = keras.backend.backend()
    for marker, needed in (
        ("tensorflow_only", "tensorflow"),
        ("jax_only", "jax"),
    ):
        if backend == needed:
            continue
        skip = pytest.mark.skip(
            reason=f"{marker}: the Keras backend is {backend!r}"
        )
        for item in items:
            if item.get_closest_marker(marker):
                item.add_marker(skip)
    if backend != "tensorflow":
        _sample_cases(items)


def pytest_collection_finish(session):
    """Exempts the objects alive after collection (TensorFlow's, Keras's,
    the test modules': half a million) from garbage collection, for good.
    Each full collection then walks only what the tests made since: Keras
    collects at every variable a layer drops (quantization) and Python
    whenever traced graphs pile up, and on TensorFlow each of those took
    about 0.3 s."""
    gc.freeze()


@pytest.fixture(scope="module", autouse=True)
def objects_of_earlier_modules_frozen():
    """After each module (and its fixtures), collects its garbage and
    exempts what stays alive (caches of TensorFlow, Keras and the test
    helpers) from later collections, as `pytest_collection_finish` does
    for the objects made before the tests. Without it, every full
    collection walks everything the earlier modules left alive: here,
    collections took 47 s of the TensorFlow pass's worker time without it
    and 17 s with it (JAX: 21 s and 11 s), at the same peak memory."""
    yield
    gc.collect()
    gc.freeze()


def _sample_cases(items):
    """Off TensorFlow, a test marked `backend_samples(n)` runs `n` of its
    parametrized cases, spread evenly; TensorFlow runs them all."""
    import keras

    cases = {}
    for item in items:
        marker = item.get_closest_marker("backend_samples")
        if marker is not None:
            key = (item.path, item.originalname)
            cases.setdefault(key, (marker.args[0], []))[1].append(item)
    for count, group in cases.values():
        step = max(1, -(-len(group) // count))
        skip = pytest.mark.skip(
            reason=f"backend_samples: {count} of {len(group)} cases run on "
            f"{keras.backend.backend()!r}, all of them on TensorFlow"
        )
        for index, item in enumerate(group):
            if index % step:
                item.add_marker(skip)


SEED = 1234


@pytest.fixture(autouse=True)
def fixed_random_state():
    """Every test starts from the same global seeds and float32 policy."""
    import keras

    _set_random_seed(SEED)
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")


def _set_random_seed(seed):
    """`keras.utils.set_random_seed(seed)`, except that on TensorFlow the
    global seed is set again only after a test set another one.

    Setting TensorFlow's seed clears its kernel caches, and building them
    again in every test cost a tenth of the TensorFlow pass. Python's,
    NumPy's and Keras's seeds are set every time; keras_favor and Keras
    draw their random numbers with stateless ops from Keras's seeds, and
    TensorFlow's own random ops in traced functions (`tf.data` shuffles)
    take their seeds from the global seed and the function, not from the
    tests that ran before.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        keras.utils.set_random_seed(seed)
        return
    import tensorflow as tf

    # The global seed (an explicit operation seed draws nothing).
    if tf.compat.v1.random.get_seed(0)[0] != seed:
        keras.utils.set_random_seed(seed)
        return
    set_seed = tf.random.set_seed
    tf.random.set_seed = lambda seed: None
    try:
        keras.utils.set_random_seed(seed)
    finally:
        tf.random.set_seed = set_seed


@pytest.fixture(autouse=True)
def optimizer_built_before_fit(monkeypatch):
    """`fit` builds the optimizer before its first traced step, on
    TensorFlow (tests/optimizer_first.py)."""
    import keras

    from tests.optimizer_first import fit_with_a_built_optimizer

    if keras.backend.backend() == "tensorflow":
        monkeypatch.setattr(
            keras.Model, "fit", fit_with_a_built_optimizer(keras.Model.fit)
        )


@pytest.fixture
def rng():
    return np.random.default_rng(0)
