"""Smoke tests: every example runs end to end at a tiny size."""

import csv
import importlib
import io
import math
import pathlib
import random
import re
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
TINY_MODEL = [
    "--num-layers", "1", "--num-heads", "2", "--hidden-dim", "16",
    "--intermediate-dim", "32", "--num-features", "16", "--batch-size", "4",
    "--steps", "2", "--epochs", "2",
]


@pytest.fixture(scope="module")
def examples():
    sys.path.insert(0, str(EXAMPLES))
    yield lambda name: importlib.import_module(name)
    sys.path.remove(str(EXAMPLES))


def test_quickstart(examples, tmp_path, capsys):
    """The demo at a tiny size: both models train for a second each, and
    every file it promises is written."""
    quickstart = examples("quickstart")
    output_dir = tmp_path / "demo"
    result = quickstart.main(
        [
            "--num-layers", "1", "--num-heads", "2", "--hidden-dim", "16",
            "--intermediate-dim", "32", "--num-features", "16",
            "--batch-size", "4", "--max-length", "32", "--budget", "1",
            "--validation-points", "2", "--validation-windows", "2",
            "--corpus-bytes", "60000", "--lengths", "16", "32",
            "--timed-steps", "1", "--redraw-interval", "2",
            "--generate-bytes", "4", "--in-process",
            "--output-dir", str(output_dir),
        ]
    )
    for name in ("model.keras", "saved_model/saved_model.pb", "demo.csv"):
        assert (output_dir / name).is_file(), name
    assert (output_dir / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(output_dir / "demo.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    models = ["Exact softmax", "Performer (FAVOR+)"]
    results = [row for row in rows if row["kind"] == "result"]
    assert [row["model"] for row in results] == models
    uniform = math.log2(quickstart.VOCABULARY_SIZE)
    for row in results:
        # Trained: below the 8.0 bits of a uniform guess over 257 tokens.
        assert 0 < float(row["val_bits_per_byte"]) < uniform
        assert int(row["steps"]) >= 2
        assert float(row["seconds"]) >= 1
        assert float(row["peak_memory_mib"]) > 0
    for model in models:
        points = [
            row for row in rows
            if row["kind"] == "validation" and row["model"] == model
        ]
        assert len(points) == 2
        seconds = [float(row["seconds"]) for row in points]
        assert seconds == sorted(seconds)
        timings = {
            int(row["length"]): float(row["ms_per_step"])
            for row in rows
            if row["kind"] == "step_time" and row["model"] == model
        }
        assert sorted(timings) == [16, 32]
        assert all(ms > 0 for ms in timings.values())
    assert result["max_diff"] < 1e-5
    assert len(result["continuation"]) >= 1
    out = capsys.readouterr().out
    assert "What was compared" in out and "Caveats:" in out


def test_quickstart_corpus_is_the_stdlib_split_by_file(examples):
    quickstart = examples("quickstart")
    train, validation, num_files = quickstart.load_corpus(200_000, 4, seed=0)
    assert len(train) + len(validation) == 200_000
    assert num_files > 1 and len(validation) > 0
    assert train.min() >= 1 and train.max() <= 256
    # Deterministic: the same seed reads the same bytes.
    again, _, _ = quickstart.load_corpus(200_000, 4, seed=0)
    np.testing.assert_array_equal(train, again)
    text = bytes((train[:2000] - 1).astype(np.uint8)).decode("utf-8", "replace")
    assert "def " in text or "import " in text


def test_listops(examples, capsys):
    listops = examples("listops")
    result = listops.main(
        TINY_MODEL
        + ["--train-size", "32", "--test-size", "16", "--max-length", "40",
           "--min-length", "8", "--max-depth", "4", "--max-args", "4",
           "--local-windows", "4"]
    )
    assert [row["model"] for row in result["rows"]] == [
        "Performer (FAVOR+)", "Exact softmax",
        "Performer (FAVOR+), exact window 4", "Chance (majority class)",
    ]
    for row in result["rows"]:
        assert 0 <= float(row["test accuracy"]) <= 1
    assert "Summary" in capsys.readouterr().out


@pytest.mark.parametrize(
    "expression, value",
    [
        (["[MAX", "4", "3", "[MIN", "2", "3", "]", "1", "0", "]"], 4),
        (["[MED", "1", "5", "8", "9", "]"], 6),
        (["[SM", "9", "[MAX", "2", "7", "]", "5", "]"], 1),
    ],
)
def test_listops_evaluation(examples, expression, value):
    listops = examples("listops")
    assert evaluate(listops, expression) == value


def evaluate(listops, tokens):
    """A reference evaluator of token lists, independent of the generator."""
    stack = [[]]
    for token in tokens:
        if token in listops.OPERATORS:
            stack.append([token])
        elif token == listops.CLOSE:
            operator, *values = stack.pop()
            stack[-1].append(listops.OPERATORS[operator](values))
        else:
            stack[-1].append(int(token))
    return stack[0][0]


def test_listops_generator_respects_the_caps_and_labels(examples):
    listops = examples("listops")
    args = listops.parse_args(
        ["--min-length", "10", "--max-length", "30", "--max-depth", "3",
         "--max-args", "4"]
    )
    token_ids, labels = listops.generate_listops(50, args, random.Random(0))
    lengths = (token_ids != 0).sum(axis=1)
    assert lengths.min() >= 10 and lengths.max() <= 30
    for ids, label in zip(token_ids, labels):
        tokens = [listops.VOCABULARY[i] for i in ids if i]
        assert evaluate(listops, tokens) == label
        assert depth(listops, tokens) <= 3
    again, _ = listops.generate_listops(50, args, random.Random(0))
    np.testing.assert_array_equal(token_ids, again)


def depth(listops, tokens):
    current = deepest = 0
    for token in tokens:
        current += token in listops.OPERATORS
        current -= token == listops.CLOSE
        deepest = max(deepest, current)
    return deepest


def help_entries(text):
    """The option entries of an argparse `--help` text: a dict from each
    entry's first flag to its text, and the list of those flags in order."""
    options = text.split("\noptions:\n", 1)[1]
    entries = re.split(r"\n(?=  -)", options.strip("\n"))
    flags = [entry.split()[0].rstrip(",") for entry in entries]
    return dict(zip(flags, entries)), flags


# The scripts among the examples (not their helper modules).
SCRIPTS = sorted(
    path.stem for path in EXAMPLES.glob("*.py")
    if 'if __name__ == "__main__":' in path.read_text()
)


def test_the_scripts_are_found():
    assert {"quickstart", "listops", "distributed_training"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_lists_each_flag_once_with_a_help_text(
    examples, name, capsys, monkeypatch
):
    monkeypatch.setenv("COLUMNS", "100")
    module = examples(name)
    with pytest.raises(SystemExit) as stop:
        module.parse_args(["--help"])
    assert stop.value.code == 0
    entries, flags = help_entries(capsys.readouterr().out)
    assert len(flags) == len(set(flags)), flags
    assert "-h" in entries and len(flags) > 3
    for flag, entry in entries.items():
        # The flags and metavars, then (after 2 spaces or a new line) the
        # help text, with at most one default that is not all of it.
        invocation = re.split(r"\s{2,}", entry.strip().splitlines()[0])[0]
        help_text = entry.strip()[len(invocation):]
        assert help_text.count("(default:") <= 1, entry
        assert re.search(
            "[a-z]", re.sub(r"\(default: [^)]*\)", "", help_text)
        ), f"{flag} has no help text: {entry!r}"


def test_distributed_example_prefixes_each_line_with_its_worker(
    examples, monkeypatch
):
    distributed = examples("distributed_training")
    stream = io.StringIO()
    lines = distributed.PrefixedLines(stream, "[worker 1] ")
    lines.write("Epoch 1/2\nloss: 0.5")
    lines.write(" - accuracy: 0.9\n\nDone")
    lines.write("\n")
    assert stream.getvalue() == (
        "[worker 1] Epoch 1/2\n[worker 1] loss: 0.5 - accuracy: 0.9\n"
        "[worker 1] \n[worker 1] Done\n"
    )
    captured = io.StringIO()
    monkeypatch.setattr(sys, "stdout", captured)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setenv(
        "TF_CONFIG",
        '{"cluster": {"worker": ["localhost:1", "localhost:2"]}, '
        '"task": {"type": "worker", "index": 1}}',
    )
    distributed.prefix_output_with_worker()
    print("2 replica(s) in sync")
    print("Done; redraw count per attention layer: [1, 1]")
    assert captured.getvalue().splitlines() == [
        "[worker 1] 2 replica(s) in sync",
        "[worker 1] Done; redraw count per attention layer: [1, 1]",
    ]
