"""Smoke tests: every example runs end to end at a tiny size."""

import importlib
import pathlib
import random
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
    quickstart = examples("quickstart")
    result = quickstart.main(
        TINY_MODEL
        + [
            "--max-length", "16", "--corpus-bytes", "60000",
            "--validation-windows", "8", "--redraw-interval", "1",
            "--generate-bytes", "4", "--export-dir", str(tmp_path / "lm"),
        ]
    )
    models = [row["model"] for row in result["rows"]]
    assert models == ["Performer (FAVOR+)", "Exact softmax"]
    for row in result["rows"]:
        assert 0 < float(row["val bits/byte"]) < 10
    assert result["max_diff"] < 1e-5
    assert (tmp_path / "lm" / "saved_model.pb").exists()
    assert len(result["continuation"]) >= 1
    assert result["served_same"]
    assert "Summary" in capsys.readouterr().out


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
