"""What the benchmarks share: where results go and what machine made them.

Run as a script it prints the environment as JSON; the benchmarks call it
in a subprocess so that the parent process never initialises a GPU.
"""

import datetime
import json
import os
import platform
import subprocess
import sys

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
REPOSITORY_DIR = os.path.dirname(BENCHMARKS_DIR)
RESULTS_DIR = os.path.join(BENCHMARKS_DIR, "results")


def cpu_model():
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor() or "unknown CPU"
    for line in output.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def memory_gb():
    with open("/proc/meminfo") as file:
        for line in file:
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def git_commit():
    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=REPOSITORY_DIR, capture_output=True, text=True
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "keras_favor")
    return commit + ("+uncommitted keras_favor changes" if dirty else "")


def describe():
    """The machine and versions, gathered in this process (imports TF)."""
    import keras
    import numpy
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    gpu = None
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        gpu = details.get("device_name", gpus[0].name)
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": memory_gb(),
        "load_average": os.getloadavg(),
        "gpu": gpu,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": numpy.__version__,
        "keras_favor_commit": git_commit(),
    }


def environment():
    """`describe()` from a subprocess, so this process stays GPU-free."""
    output = subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def write_environment(csv_path, environment, settings):
    """Appends this run's environment and settings to the JSON beside the CSV.

    A CSV can hold rows of several runs (partial reruns replace rows), so
    the JSON keeps every run, in order.
    """
    path = csv_path[: -len(".csv")] + ".json"
    runs = []
    if os.path.exists(path) and not settings.get("fresh"):
        with open(path) as file:
            runs = json.load(file)["runs"]
    runs.append({"environment": environment, "settings": settings})
    with open(path, "w") as file:
        json.dump({"runs": runs}, file, indent=1)
        file.write("\n")


if __name__ == "__main__":
    print(json.dumps(describe()))
