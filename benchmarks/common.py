"""What every benchmark shares: options, timing, memory, the environment, result files.

Importing it does not import TensorFlow, so the sweep's parent process stays
free of it (and of the GPU).
"""

import argparse
import csv
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
REPOSITORY_DIR = os.path.dirname(BENCHMARKS_DIR)
RESULTS_DIR = os.path.join(BENCHMARKS_DIR, "results")


def parse_args(doc, argv=None, **options):
    """The options `--name` of `name=default` or `name=(default, help)`, and
    `--output-dir` (`benchmarks/results/`): of the default's type, a flag for
    `False`, one value or more for a list (of strings: its own values only)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, value in dict(options, output_dir=RESULTS_DIR).items():
        default, help_ = value if isinstance(value, tuple) else (value, None)
        many = isinstance(default, list)
        kind = type(default[0] if many else default)
        parser.add_argument(
            "--" + name.replace("_", "-"),
            default=default,
            help=help_,
            **(
                {"action": "store_true"}
                if default is False
                else {
                    "type": kind,
                    "nargs": "+" if many else None,
                    "choices": default if many and kind is str else None,
                }
            ),
        )
    return parser.parse_args(argv)


def time_calls(fn, inputs, repeats, warmup=1, budget_s=math.inf, min_repeats=1):
    """Seconds of the first call of `fn(*inputs)` (tracing), and of each timed call.

    Each call ends by fetching its result to NumPy, which waits for the
    device. After `warmup` untimed calls come `repeats` timed calls, fewer
    once `min_repeats` of them have used `budget_s` seconds.
    """
    times = []
    while len(times) < 1 + warmup + min_repeats or (
        len(times) < 1 + warmup + repeats
        and sum(times[1 + warmup :]) < budget_s
    ):
        start = time.perf_counter()
        numpy.asarray(fn(*inputs))
        times.append(time.perf_counter() - start)
    return times[0], times[1 + warmup :]


def peak_rss_mib():
    """This process's peak resident memory so far (`ru_maxrss`), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def proc_field(path, field, mib=False):
    """The text after `field:` in a /proc file, or None; with `mib`, a
    `field: N kB` entry in MiB (`VmRSS`, `MemAvailable`...)."""
    try:
        with open(path) as file:
            text = next(
                (
                    line.split(":", 1)[1].strip()
                    for line in file
                    if line.split(":")[0].strip() == field
                ),
                None,
            )
    except OSError:
        return None
    return int(text.split()[0]) / 1024 if mib and text else text


def git(*args, check=False):
    """The output of `git *args` in the repository; with `check`, a failed
    command raises `subprocess.CalledProcessError`."""
    return subprocess.run(
        ["git", *args],
        cwd=REPOSITORY_DIR,
        capture_output=True,
        text=True,
        check=check,
    ).stdout.strip()


def git_commit():
    """The checked-out commit, marked when keras_favor has uncommitted changes."""
    dirty = git("status", "--porcelain", "--", "keras_favor")
    return (git("rev-parse", "--short", "HEAD") or "unknown") + (
        "+uncommitted keras_favor changes" if dirty else ""
    )


def describe():
    """The machine, versions and code, read in this process (imports the Keras
    backend: TensorFlow unless `KERAS_BACKEND` names another)."""
    return _with_host(_backend_description())


def _backend_description():
    """The Keras backend, its version and GPU, and Keras's version."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        details = (
            tf.config.experimental.get_device_details(gpus[0]) if gpus else {}
        )
        gpu = details.get("device_name", gpus[0].name) if gpus else None
        versions = {"tensorflow": tf.__version__}
    else:
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        gpu = gpus[0].device_kind if gpus else None
        versions = {"jax": jax.__version__}
    return {
        "gpu": gpu,
        "backend": backend,
        **versions,
        "keras": keras.__version__,
    }


def _with_host(backend_description):
    """`backend_description` among the date, machine, load and code now."""
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"
        ),
        "cpu": proc_field("/proc/cpuinfo", "model name")
        or platform.processor(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "memory_gib": round(
            proc_field("/proc/meminfo", "MemTotal", mib=True) / 1024, 1
        ),
        "python": platform.python_version(),
        **backend_description,
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get(
            "TF_ENABLE_ONEDNN_OPTS", "unset (on)"
        ),
        "numpy": numpy.__version__,
        "keras_favor_commit": git_commit(),
    }


# The backend descriptions read by `environment()`, by backend settings.
_BACKEND_DESCRIPTIONS = {}


def environment():
    """`describe()` with the backend's part read in a subprocess, so that this
    process stays free of the backend (and of the GPU): once per process and
    backend settings; the date, load and commit are read at each call. A
    process that already runs the workers' backend reads it itself."""
    settings = tuple(
        os.environ.get(name)
        for name in ("KERAS_BACKEND", "CUDA_VISIBLE_DEVICES", "JAX_PLATFORMS")
    )
    if settings not in _BACKEND_DESCRIPTIONS:
        _BACKEND_DESCRIPTIONS[settings] = (
            _backend_description()
            if _runs_the_workers_backend()
            else _backend_description_in_a_subprocess()
        )
    return _with_host(_BACKEND_DESCRIPTIONS[settings])


def _backend_description_in_a_subprocess():
    """`_backend_description()`, read by a new Python process."""
    code = (
        "import json; from benchmarks import common; "
        "print(json.dumps(common._backend_description()))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=worker_env(TF_CPP_MIN_LOG_LEVEL="3"),
    )
    return json.loads(output.stdout.strip().splitlines()[-1])


def _runs_the_workers_backend():
    """Whether this process has imported Keras on TensorFlow, the backend
    that `KERAS_BACKEND` gives the workers (where it is unset, both read
    Keras's configuration file). Listing TensorFlow's GPUs takes none of
    their memory; JAX's would claim most of it, so a JAX parent asks a
    subprocess."""
    keras = sys.modules.get("keras")
    if keras is None or keras.backend.backend() != "tensorflow":
        return False
    return os.environ.get("KERAS_BACKEND") in (None, "tensorflow")


def worker_env(**variables):
    """This process's environment with `variables`, and with the repository
    last on `PYTHONPATH`, so that a worker started as `python -m
    benchmarks.NAME` finds the benchmarks from any working directory (and
    keras_favor first in that directory or on the caller's `PYTHONPATH`)."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(paths + [REPOSITORY_DIR]),
        **variables,
    )


def module_command(module, *args):
    """The command that runs `benchmarks.<module>` with `args` in a new interpreter."""
    return [sys.executable, "-m", f"benchmarks.{module}", *args]


def write_environment(path, environment, settings, keep_earlier=False):
    """Writes the run's environment and settings to the JSON file `path` (and
    makes its folder), after the earlier runs with `keep_earlier` (partial
    reruns update a CSV)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    runs = []
    if keep_earlier and os.path.exists(path):
        with open(path) as file:
            runs = json.load(file)["runs"]
    with open(path, "w") as file:
        run = {"environment": environment, "settings": settings}
        file.write(json.dumps({"runs": runs + [run]}, indent=1) + "\n")


def write_csv(path, fields, rows):
    """Writes `rows` (dicts) under the header `fields`; missing values stay empty."""
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fields, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_results(args, name, fields, rows, summary_lines, environment):
    """Writes `NAME.json` (environment and settings), `NAME.csv` and
    `NAME_summary.txt` to `args.output_dir`, and prints the summary.

    `environment` is `describe()` taken before the runs, so that its load
    average is the one they started at, not the one they made."""
    stem = os.path.join(args.output_dir, name)
    write_environment(stem + ".json", environment, vars(args))
    write_csv(stem + ".csv", fields, rows)
    write_lines(stem + "_summary.txt", summary_lines)


def write_lines(path, lines):
    """Writes a summary's lines to `path`, and prints them."""
    with open(path, "w") as file:
        file.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def run_worker(command, env, args, address_space_limit=None, cwd=None):
    """Runs a benchmark worker under a watchdog and returns its result.

    The worker prints `RESULT <json>`. The watchdog kills it when its
    resident memory passes `args.memory_cap_gb`, when the machine has less
    than `args.reserve_gb` left (status `machine_busy`: rerun it), or after
    `args.timeout_s`; `address_space_limit` (bytes) backs it up where given.
    It runs in the directory `cwd` (this process's by default).

    Returns:
        The worker's result dict, or one with `status` (`out_of_memory`,
        `machine_busy`, `timeout` or `error`) and a `note`.
    """
    limit = address_space_limit
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
        preexec_fn=(
            lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        )
        if limit
        else None,
    )
    deadline, stopped, rss = time.monotonic() + args.timeout_s, None, 0.0
    while stopped is None and process.poll() is None:
        time.sleep(0.05)
        rss = (
            proc_field(f"/proc/{process.pid}/status", "VmRSS", mib=True) or rss
        )
        if rss > args.memory_cap_gb * 1024:
            stopped = "out_of_memory", f"killed at {rss:.0f} MiB RSS"
        elif (
            proc_field("/proc/meminfo", "MemAvailable", mib=True)
            < args.reserve_gb * 1024
        ):
            stopped = (
                "machine_busy",
                f"killed: machine below {args.reserve_gb} GB free",
            )
        elif time.monotonic() > deadline:
            stopped = "timeout", f"killed after {args.timeout_s:.0f} s"
    if stopped:
        process.kill()
    stdout, stderr = process.communicate()
    if stopped:
        return {
            "status": stopped[0],
            "note": stopped[1],
            "peak_rss_mib": round(rss, 1),
        }
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    # Under the address-space limit an allocation fails without a Python error.
    memory = any(
        word in stderr
        for word in ("bad_alloc", "Cannot allocate", "OOM", "out of memory")
    )
    note = (stderr.strip().splitlines() or ["no output"])[-1][:160]
    return {"status": "out_of_memory" if memory else "error", "note": note}


def timing_fields(times, first_call_s, time_cap_s):
    """A worker's result fields for its timed runs: `status` (`ok`, or
    `over_time_cap` when the median step passes `time_cap_s`), the median,
    fastest and slowest seconds, their count and the first (tracing) call's."""
    median = statistics.median(times)
    return dict(
        status="over_time_cap" if median > time_cap_s else "ok",
        median_s=round(median, 5),
        min_s=round(min(times), 5),
        max_s=round(max(times), 5),
        timed_runs=len(times),
        first_call_s=round(first_call_s, 3),
    )
