"""Smoke tests: every example runs end to end at a tiny size."""

import csv
import importlib
import io
import math
import os
import pathlib
import random
import re
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
TINY_MODEL = [
    "--num-layers",
    "1",
    "--num-heads",
    "2",
    "--hidden-dim",
    "16",
    "--intermediate-dim",
    "32",
    "--num-features",
    "16",
    "--batch-size",
    "4",
    "--steps",
    "2",
    "--epochs",
    "2",
]


@pytest.fixture(scope="module")
def examples():
    return lambda name: importlib.import_module(f"examples.{name}")


def test_quickstart(examples, tmp_path):
    """The one-screen quickstart at a tiny size: it trains, saves a model
    that loads, and generates the prompt's continuation from the loaded
    model."""
    quickstart = examples("quickstart")
    loss, text = quickstart.main(str(tmp_path), steps=3, batch_size=2)
    assert (tmp_path / "performer.keras").is_file()
    assert math.isfinite(loss) and loss > 0
    assert text.startswith("def ") and len(text) > len("def ")


def test_long_context_lm(examples, tmp_path, capsys):
    """The demo at a tiny size: both models train for a second each, and
    every file it promises is written."""
    long_context_lm = examples("long_context_lm")
    output_dir = tmp_path / "demo"
    result = long_context_lm.main(
        [
            "--num-layers",
            "1",
            "--num-heads",
            "2",
            "--hidden-dim",
            "16",
            "--intermediate-dim",
            "32",
            "--num-features",
            "16",
            "--batch-size",
            "4",
            "--max-length",
            "32",
            "--budget",
            "1",
            "--validation-points",
            "2",
            "--validation-windows",
            "2",
            "--corpus-bytes",
            "60000",
            "--lengths",
            "16",
            "32",
            "--timed-steps",
            "1",
            "--redraw-interval",
            "2",
            "--generate-bytes",
            "4",
            "--in-process",
            "--output-dir",
            str(output_dir),
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
    uniform = math.log2(long_context_lm.VOCABULARY_SIZE)
    for row in results:
        # Trained: below the 8.0 bits of a uniform guess over 257 tokens.
        assert 0 < float(row["val_bits_per_byte"]) < uniform
        assert int(row["steps"]) >= 2
        assert float(row["seconds"]) >= 1
        assert float(row["peak_memory_mib"]) > 0
    for model in models:
        points = [
            row
            for row in rows
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


def test_summary_says_which_layer_was_faster_at_the_shortest_length(examples):
    demo = examples("long_context_lm")
    results = [
        {
            "attention": attention,
            "steps": steps,
            "ms_per_step": 1000 / steps,
            "bits_per_byte": 4.0,
            "peak_memory_mib": 900.0,
            "memory_before_training_mib": 800.0,
        }
        for attention, steps in (("favor", 20), ("exact", 10))
    ]
    # The demo's own settings: its defaults.
    args = demo.parse_args([])
    for favor_ms, exact_ms, claim in (
        (15.0, 23.0, "FAVOR+'s step was not slower even at 16 bytes"),
        (30.0, 23.0, "On short sequences exact attention is faster"),
    ):
        times = {
            "favor": {16: favor_ms, 32: favor_ms * 2},
            "exact": {16: exact_ms, 32: exact_ms * 4},
        }
        text = "\n".join(demo.summary_lines(results, times, args, 0.5))
        assert claim in text
        assert ("exact attention is faster" in text) == (exact_ms < favor_ms)


def test_corpus_is_the_stdlib_split_by_file(examples):
    corpus = examples("corpus")
    train, validation, num_files = corpus.load_corpus(200_000, 4, seed=0)
    assert len(train) + len(validation) == 200_000
    assert num_files > 1 and len(validation) > 0
    assert train.min() >= 1 and train.max() <= 256
    # Deterministic: the same seed reads the same bytes.
    again, _, _ = corpus.load_corpus(200_000, 4, seed=0)
    np.testing.assert_array_equal(train, again)
    text = bytes((train[:2000] - 1).astype(np.uint8)).decode("utf-8", "replace")
    assert "def " in text or "import " in text


def test_listops(examples, capsys):
    listops = examples("listops")
    result = listops.main(
        TINY_MODEL
        + [
            "--train-size",
            "32",
            "--test-size",
            "16",
            "--max-length",
            "40",
            "--min-length",
            "8",
            "--max-depth",
            "4",
            "--max-args",
            "4",
            "--local-windows",
            "4",
        ]
    )
    assert [row["model"] for row in result["rows"]] == [
        "Performer (FAVOR+)",
        "Exact softmax",
        "Performer (FAVOR+), exact window 4",
        "Chance (majority class)",
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
        [
            "--min-length",
            "10",
            "--max-length",
            "30",
            "--max-depth",
            "3",
            "--max-args",
            "4",
        ]
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


# The scripts among the examples that take flags (not their helper modules,
# nor the quickstart, which takes none).
SCRIPTS = sorted(
    path.stem
    for path in EXAMPLES.glob("*.py")
    if "def parse_args(" in path.read_text()
)


def test_the_scripts_are_found():
    assert {"long_context_lm", "listops", "distributed_training"} <= set(
        SCRIPTS
    )


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
        help_text = entry.strip()[len(invocation) :]
        assert help_text.count("(default:") <= 1, entry
        assert re.search(
            "[a-z]", re.sub(r"\(default: [^)]*\)", "", help_text)
        ), f"{flag} has no help text: {entry!r}"


@pytest.mark.parametrize(
    "package, name",
    [
        (path.parent.name, path.stem)
        for folder in (EXAMPLES, EXAMPLES.parent / "benchmarks")
        for path in sorted(folder.glob("*.py"))
        if path.stem != "__init__"
    ],
)
def test_importing_a_module_leaves_the_environment_as_it_is(package, name):
    """Scripts that pick a backend or emulated devices do so when run, not
    when imported (the tests import them, and later subprocesses inherit
    the environment)."""
    before = dict(os.environ)
    sys.modules.pop(f"{package}.{name}", None)
    importlib.import_module(f"{package}.{name}")
    assert dict(os.environ) == before


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


def test_bio_data_names_the_data_extra_when_a_package_is_missing(
    examples, monkeypatch
):
    bio_data = examples("bio_data")
    real_find_spec = bio_data.importlib.util.find_spec
    monkeypatch.setattr(
        bio_data.importlib.util,
        "find_spec",
        lambda name: None if name == "aaanalysis" else real_find_spec(name),
    )
    with pytest.raises(bio_data.MissingDataPackage) as error:
        bio_data.load_proteins("capsid")
    assert "aaanalysis" in str(error.value)
    assert "pip install keras-favor[data]" in str(error.value)
    # The chromosome's package is still found.
    assert bio_data.chromosome_path().is_file()


def test_bio_data_reads_the_installed_sequences(examples):
    bio_data = examples("bio_data")
    tokens, description = bio_data.load_chromosome()
    assert "NCTC11397" in description and "chromosome" in description
    assert len(tokens) == 2_463_666
    assert set(np.unique(tokens)) == {1, 2, 3, 4}
    sequences, labels = bio_data.load_proteins("capsid")
    assert len(sequences) == len(set(sequences)) > 7000
    assert set(np.unique(labels)) == {0, 1}
    tokens = bio_data.encode_protein("MKX" + bio_data.AMINO_ACIDS)
    vocabulary = bio_data.PROTEIN_VOCABULARY
    assert "".join(vocabulary[t] for t in tokens) == "MKX" + "".join(
        bio_data.AMINO_ACIDS
    )
    assert (
        bio_data.encode_protein("BUZO").tolist() == [bio_data.OTHER_RESIDUE] * 4
    )


def test_proteins_no_sequence_in_two_splits(examples):
    proteins = examples("proteins")
    bio_data = examples("bio_data")
    splits = proteins.split_sequences(["soluble", "capsid", "tail"])
    by_split = {name: set(s) for name, (s, _) in splits.items()}
    assert sum(len(s) for s in by_split.values()) == sum(
        len(s) for s, _ in splits.values()
    )
    assert not by_split["train"] & by_split["validation"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["validation"] & by_split["test"]
    everything = set()
    for name in ("soluble", "capsid", "tail"):
        everything |= set(bio_data.load_proteins(name)[0])
    assert set().union(*by_split.values()) == everything
    total = len(everything)
    assert 0.08 < len(by_split["validation"]) / total < 0.12


def test_proteins_masking_picks_residues_only(examples):
    proteins = examples("proteins")
    bio_data = examples("bio_data")
    rng = np.random.default_rng(0)
    token_lists = [rng.integers(3, 23, size=n) for n in (1, 5, 300, 800)]
    tokens = proteins.pad(token_lists)
    assert tokens.shape == (4, 800)
    inputs, targets = proteins.mask_residues(tokens, 0.15, rng)
    picked = targets != 0
    np.testing.assert_array_equal(targets[picked], tokens[picked])
    assert np.all(inputs[picked] == bio_data.MASK)
    np.testing.assert_array_equal(inputs[~picked], tokens[~picked])
    assert not np.any(picked & (tokens == bio_data.PAD))
    assert np.all(picked.any(axis=1))
    # 15 % of the 1,100 residues of the two long sequences: a binomial
    # count with standard deviation 12; 5 deviations either side.
    assert abs(picked[2:].sum() - 165) < 60


def test_proteins_tiny(examples, tmp_path, capsys):
    proteins = examples("proteins")
    result = proteins.main(
        TINY_MODEL[:-4]
        + [
            "--steps",
            "3",
            "--classify-steps",
            "3",
            "--eval-points",
            "1",
            "--eval-sequences",
            "6",
            "--train-sequences",
            "16",
            "--max-length",
            "64",
            "--classify-max-length",
            "64",
            "--seeds",
            "0",
            "--attentions",
            "softmax",
            "relu",
            "--causal-attentions",
            "relu",
            "--classify-attentions",
            "exact",
            "--csv",
            str(tmp_path / "p.csv"),
            "--plot",
            str(tmp_path / "p.png"),
        ]
    )
    runs = {(r["task"], r["attention"]) for r in result["rows"]}
    assert runs == {
        ("mlm", "softmax"),
        ("mlm", "relu"),
        ("causal", "relu"),
        ("classify", "exact"),
    }
    for run in runs:
        points = [
            r for r in result["rows"] if (r["task"], r["attention"]) == run
        ]
        # Evaluated after the first step (0 s on the clock) and the last.
        assert [p["step"] for p in points] == [1, 3]
        assert points[0]["seconds"] == 0 < points[1]["seconds"]
    for row in result["rows"]:
        assert 0 <= row["accuracy"] <= 1
        if row["task"] != "classify":
            # Near the 23-token vocabulary's uniform guess after 2 steps.
            assert 5 < row["perplexity"] < 60
    assert len(result["equal_steps"]) == len(result["equal_time"]) == 4
    # One causal model: only the masked LM has two to compare.
    [line] = result["verdict"]
    assert line.startswith("masked LM: Performer-ReLU ")
    with open(tmp_path / "p.csv", newline="") as file:
        assert len(list(csv.DictReader(file))) == len(result["rows"])
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert "Equal time" in capsys.readouterr().out


def test_proteins_verdict(examples):
    """The verdict's sentences on final accuracies: whether Performer-ReLU
    leads the other random-feature models and whether FAVOR+ matches exact
    attention, by more than the noise floor (0.005 with one seed)."""
    proteins = examples("proteins")
    accuracy = {
        ("mlm", "exact"): 0.3,
        ("mlm", "softmax"): 0.302,
        ("mlm", "relu"): 0.4,
        ("causal", "exact"): 0.3,
        ("causal", "softmax"): 0.5,
        ("causal", "relu"): 0.4,
    }
    rows = [
        {"task": task, "attention": attention, "seed": 0, "accuracy": value}
        for (task, attention), value in accuracy.items()
    ]
    mlm_lead, mlm_match, causal_lead, causal_match = proteins.verdict(
        rows, None
    )
    assert mlm_lead.startswith("masked LM: Performer-ReLU leads the ")
    assert "(FAVOR+ (softmax) 0.302, Performer-ReLU 0.400)" in mlm_lead
    assert mlm_match.startswith("masked LM: FAVOR+ matches exact attention")
    assert "(+0.002;" in mlm_match
    assert causal_lead.startswith("causal LM: Performer-ReLU does not lead")
    assert causal_match.startswith("causal LM: FAVOR+ does not match exact")


def test_training_clock_evaluates_at_its_steps_and_stops_at_its_budget(
    examples,
):
    example_utils = examples("example_utils")
    keras = example_utils.keras
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    data = (np.ones((14, 2)), np.ones((14, 1)))
    calls = []
    clock = example_utils.TrainingClock(
        lambda m: {"calls": float(len(calls.append(1) or calls))},
        every_steps=3,
        evaluate_first=True,
    )
    model.fit(*data, batch_size=2, epochs=1, callbacks=[clock], verbose=0)
    assert [p["step"] for p in clock.history] == [1, 3, 6, 7]
    assert clock.history[0]["seconds"] == 0
    seconds = [p["seconds"] for p in clock.history]
    assert seconds == sorted(seconds)
    budget = example_utils.TrainingClock(lambda m: {}, budget_s=1e-9)
    model.fit(*data, batch_size=2, epochs=1, callbacks=[budget], verbose=0)
    # The clock starts after the first step: the second ends the budget.
    assert [p["step"] for p in budget.history] == [2]


def test_proteins_equal_time_interpolates_between_evaluations(examples):
    proteins = examples("proteins")
    points = [
        {"step": 1, "seconds": 0.0, "accuracy": 0.1},
        {"step": 51, "seconds": 10.0, "accuracy": 0.3},
        {"step": 101, "seconds": 30.0, "accuracy": 0.4},
    ]
    assert proteins.at_time(points, 5.0, "accuracy") == pytest.approx(0.2)
    assert proteins.at_time(points, 20.0, "step") == pytest.approx(76)
    assert proteins.at_time(points, 30.0, "accuracy") == pytest.approx(0.4)
    assert proteins.at_time(points[1:], 5.0, "accuracy") is None


def test_genome_validation_and_markov_reference(examples):
    genome = examples("genome")
    rng = np.random.default_rng(0)
    held_out = rng.integers(1, 5, size=1000).astype(np.int32)
    for context in (8, 64):
        inputs, targets = genome.validation_windows(held_out, context, 512)
        # The same 512 bases at every context, each predicted once.
        np.testing.assert_array_equal(inputs.reshape(-1), held_out[:512])
        np.testing.assert_array_equal(targets.reshape(-1), held_out[1:513])
    # Order 1 on a training sequence that always follows A with C.
    train = np.array([1, 2] * 50 + [3, 4] * 50, np.int32)
    test = np.array([1, 2, 1, 2, 1], np.int32)
    counts = {}
    for a, b in zip(train[:-1], train[1:]):
        counts[(a, b)] = counts.get((a, b), 0) + 1
    expected = np.mean(
        [
            -math.log2(
                (counts.get((a, b), 0) + 1)
                / (sum(counts.get((a, c), 0) for c in range(1, 5)) + 4)
            )
            for a, b in zip(test[:-1], test[1:])
        ]
    )
    bits = genome.markov_bits_per_base(train, test, 1, 4)
    assert bits == pytest.approx(expected, rel=1e-12)


def test_genome_tiny(examples, tmp_path):
    """The genome example at a tiny size, end to end: exact attention is
    turned away where its matrices do not fit, the Performer with an exact
    window trains (one model: the FAVOR+ models' training step is what
    costs seconds to trace), and the table, CSV and plot are written."""
    genome = examples("genome")
    argv = [
        *TINY_MODEL[: TINY_MODEL.index("--batch-size")],
        "--contexts",
        "128",
        "--tokens-per-batch",
        "128",
        "--attentions",
        "exact",
        "window",
        "--budget",
        "0.2",
        "--max-steps",
        "3",
        "--window",
        "8",
        "--validation-bases",
        "256",
        "--exact-memory-gib",
        "0.0001",
        "--csv",
        str(tmp_path / "g.csv"),
        "--plot",
        str(tmp_path / "g.png"),
    ]
    # Exact attention's matrices: 4 windows x 2 heads x 32^2 x 12 bytes
    # fit in 0.0001 GiB (107 kB); at 128 bases (1 window) they need 393 kB.
    args = genome.parse_args(argv)
    assert genome.exact_memory_gib(32, args) * 2**30 == 4 * 2 * 32**2 * 12
    assert genome.exact_memory_gib(128, args) * 2**30 == 2 * 128**2 * 12
    fits, too_big = (genome.exact_memory_gib(c, args) for c in (32, 128))
    assert fits < args.exact_memory_gib < too_big
    result = genome.main(argv)
    rows = {(r["attention"], r["context"]): r for r in result["rows"]}
    assert set(rows) == {("Exact softmax", 128), ("FAVOR+ + exact window", 128)}
    assert rows[("Exact softmax", 128)]["status"] == "does not fit"
    trained = rows[("FAVOR+ + exact window", 128)]
    assert trained["status"] == "trained"
    assert 1 <= trained["steps"] <= 3
    # Three steps from the initial weights: above what the bases'
    # statistics allow (the Markov models' ~1.9 bits), and within twice a
    # uniform guess over the 6 tokens (log2 6 = 2.58 bits), as small initial
    # logits keep an untrained model near it.
    assert 1.5 < trained["bits_per_base"] < 2 * math.log2(6)
    assert all(1.5 < bits < 2.5 for bits in result["markov"].values())
    headers, lines = result["table"]
    assert headers == ["attention", "128"]
    assert "does not fit" in lines[0][1]
    assert lines[1][1].endswith(f"({trained['steps']} st)")
    with open(tmp_path / "g.csv", newline="") as file:
        assert [row["status"] for row in csv.DictReader(file)] == [
            "does not fit",
            "trained",
        ]
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
