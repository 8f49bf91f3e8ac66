"""Smoke tests of the benchmark registry and its runner (`benchmarks/run.py`):
the plumbing at the tiniest size, not speed."""

import json
import os

import numpy as np
import pytest

from benchmarks import registry
from benchmarks import run

REPOSITORY_DIR = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
TINY = "tiny_train_step_causal_64"


def run_module(capsys, *argv):
    """`python -m benchmarks.run ARGV` in this process (its workers are
    processes of their own); what it printed."""
    capsys.readouterr()
    cwd = os.getcwd()
    os.chdir(REPOSITORY_DIR)
    try:
        run.main(list(argv))
    finally:
        os.chdir(cwd)
    return capsys.readouterr().out


def test_groups_expand_to_registered_names_and_unknown_names_are_refused():
    assert (
        registry.expand(["recompute_custom_gradient_vs_remat", TINY])[-1]
        == TINY
    )
    assert len(registry.expand(["speed_memory_unchanged"] * 2)) == 3
    # A pair measures two layers, or two mechanisms, on the same work.
    size = ("level", "mode", "length", "repeats", "pass_", "recompute_length")
    for a, b in registry.PAIRS:
        first, second = registry.get(a), registry.get(b)
        assert [first.parameters.get(k) for k in size] == [
            second.parameters.get(k) for k in size
        ]
        assert (first.function, first.parameters) != (
            second.function,
            second.parameters,
        )
    with pytest.raises(ValueError, match="No configuration named 'nothing'"):
        registry.expand(["nothing"])


@pytest.mark.skipif(
    not os.path.isdir(os.path.join(REPOSITORY_DIR, ".git"))
    and not os.path.isfile(os.path.join(REPOSITORY_DIR, ".git")),
    reason="compares commits of a git checkout",
)
def test_runner_writes_per_commit_results_and_compares_two_revisions(
    tmp_path, capsys, monkeypatch
):
    output = str(tmp_path)
    label = run.revision_label("worktree")
    head = run.revision_label("HEAD")
    measured = []
    measure_once = run.run_once

    def recorded(name, source, args):
        measured.append(measure_once(name, source, args))
        return measured[-1]

    monkeypatch.setattr(run, "run_once", recorded)
    # The two revisions alternate in one run, each in a worker process;
    # each gets its own file (or, for one commit twice, two runs in its
    # file).
    printed = run_module(
        capsys,
        "--compare",
        "HEAD",
        "worktree",
        "--configs",
        TINY,
        "--rounds",
        "1",
        "--output-dir",
        output,
    )
    header = f"| configuration | metric | A: {head} | B: {label} | B / A (rounds) | verdict |"
    assert header in printed
    row = next(
        line
        for line in printed.splitlines()
        if line.startswith(f"| {TINY} | median_s")
    )
    assert row.count(" s") >= 2 and "x (" in row
    table = (tmp_path / "comparisons" / f"{head}_vs_{label}.md").read_text()
    assert header in table and row in table
    shown = run_module(
        capsys,
        "--show",
        "HEAD",
        "worktree",
        "--configs",
        TINY,
        "--output-dir",
        output,
    )
    assert shown.splitlines()[0] == header
    assert shown.splitlines()[2].startswith(f"| {TINY} | median_s | ")

    # One revision: its table and its file. The worker's result is the one
    # the comparison measured on the working tree (a third worker process
    # would measure the same again).
    assert len(measured) == 2
    monkeypatch.setattr(run, "run_once", lambda *args: dict(measured[1]))
    printed = run_module(
        capsys, "--configs", TINY, "--rounds", "1", "--output-dir", output
    )
    assert f"| {TINY} | median_s |" in printed
    stored = json.loads((tmp_path / "commits" / f"{label}.json").read_text())
    # Before the run alone, the comparison's (two when the working tree is
    # HEAD: both revisions have its label).
    compared, alone = stored["runs"][-2:]
    assert len(stored["runs"]) == (3 if label == head else 2)
    assert compared["alternated_with"] == head
    assert alone["alternated_with"] is None
    environment = alone["environment"]
    for key in ("date_utc", "cpu", "load_average", "keras", "tensorflow"):
        assert key in environment
    for measured_run in (compared, alone):
        summary = measured_run["configurations"][TINY]
        assert summary["status"] == "ok" and summary["rounds"] == 1
        assert summary["median_s"] > 0
        assert summary["peak_rss_mib"] >= summary["baseline_rss_mib"] > 0


def test_keras_remat_path_gives_the_custom_gradient_path_gradients(monkeypatch):
    # The recomputation benchmark's second mechanism computes what the first
    # does: the same outputs and gradients, in four recomputed groups.
    pytest.importorskip("tensorflow")
    import keras
    import tensorflow as tf

    import keras_favor
    from keras_favor.ops import grouped_recompute

    if keras.backend.backend() != "tensorflow":
        pytest.skip("compares TensorFlow's two mechanisms")
    x = tf.constant(
        np.random.default_rng(0).standard_normal((2, 64, 16)), tf.float32
    )
    layer = keras_favor.FavorAttention(
        2, 8, num_features=16, seed=0, recompute_length=16
    )
    layer.build(x.shape, x.shape)
    results = {}
    for mechanism in ("custom_gradient", "keras_remat"):
        if mechanism == "keras_remat":
            for name in ("backend", "keras"):
                monkeypatch.setattr(
                    grouped_recompute, name, getattr(grouped_recompute, name)
                )
            registry.use_keras_remat_for_groups()
        for causal in (False, True):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, x, use_causal_mask=causal)
                loss = tf.reduce_sum(y * tf.cos(y))
            grads = tape.gradient(loss, [x, *layer.trainable_variables])
            results[mechanism, causal] = [y.numpy()] + [
                g.numpy() for g in grads
            ]
    for causal in (False, True):
        for a, b in zip(
            results["custom_gradient", causal], results["keras_remat", causal]
        ):
            np.testing.assert_allclose(
                b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max()
            )


def test_verdict_needs_a_difference_beyond_each_revisions_own_rounds():
    # A commit against itself under load (2 rounds, load average 9-11):
    # both rounds of B above A, yet by less than A's rounds differ.
    assert (
        run.verdict(1.090, [1.054, 1.133], [3.269, 3.868], [3.703, 4.076])
        == "within noise"
    )
    assert (
        run.verdict(0.959, [0.956, 0.963], [1928, 2018], [1857, 1930])
        == "within noise"
    )
    # Rounds that straddle 1 are noise whatever the medians.
    assert (
        run.verdict(1.3, [0.99, 1.6], [1.0, 1.01], [1.0, 1.6]) == "within noise"
    )
    assert (
        run.verdict(1.2, [1.19, 1.21], [1.0, 1.01], [1.19, 1.22]) == "B higher"
    )
    assert (
        run.verdict(0.8, [0.79, 0.81], [1.0, 1.01], [0.79, 0.82]) == "B lower"
    )
