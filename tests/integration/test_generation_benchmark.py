"""Smoke test: benchmarks/generation.py times both models' cached decoding
steps at a tiny size and writes its CSV, JSON and plot."""

import csv
import json

from benchmarks import generation

TINY = [
    "--num-layers",
    "1",
    "--hidden-dim",
    "32",
    "--num-heads",
    "2",
    "--num-features",
    "8",
    "--positions",
    "8",
    "16",
    "--batches",
    "1",
    "2",
    "--steps",
    "2",
    "--warmup",
    "1",
]


def test_generation_benchmark_times_both_models(tmp_path):
    generation.main(TINY + ["--output-dir", str(tmp_path)])
    with open(tmp_path / "generation.csv", newline="") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
    assert tuple(reader.fieldnames) == generation.FIELDS
    assert sorted(
        (row["model"], int(row["batch"]), int(row["position"])) for row in rows
    ) == sorted(
        (model, batch, position)
        for model in ("favor", "exact")
        for batch in (1, 2)
        for position in (8, 16)
    )
    for row in rows:
        for field in ("median_ms", "min_ms", "max_ms", "cache_bytes"):
            assert float(row[field]) > 0, (field, row)
        assert float(row["min_ms"]) <= float(row["median_ms"])
    favor = {
        (int(r["batch"]), int(r["position"])): int(r["cache_bytes"])
        for r in rows
        if r["model"] == "favor"
    }
    exact = {
        (int(r["batch"]), int(r["position"])): int(r["cache_bytes"])
        for r in rows
        if r["model"] == "exact"
    }
    # FAVOR+'s state has one size at every position; the key/value cache
    # grows with it (position + the 4 steps run), and both with the batch.
    assert favor[(1, 8)] == favor[(1, 16)] == favor[(2, 8)] // 2
    assert exact[(1, 16)] * 12 == exact[(1, 8)] * 20
    assert exact[(2, 8)] == 2 * exact[(1, 8)]
    [run] = json.loads((tmp_path / "generation.json").read_text())["runs"]
    assert run["environment"]["keras"]
    assert run["settings"]["positions"] == [8, 16]
    assert {t["batch"] for t in run["settings"]["targets"]} == {1, 2}
    assert (tmp_path / "generation.png").stat().st_size > 0


def test_help_lists_every_flag_once(capsys):
    try:
        generation.parse_args(["--help"])
    except SystemExit:
        pass
    options = capsys.readouterr().out.split("options:")[1]
    lines = [line.split() for line in options.splitlines()]
    flags = [words[0] for words in lines if words and words[0].startswith("--")]
    assert len(flags) == len(set(flags))
    assert {
        "--positions",
        "--batches",
        "--models",
        "--steps",
        "--warmup",
        "--num-layers",
        "--hidden-dim",
        "--num-heads",
        "--num-features",
        "--output-dir",
    } <= set(flags)
    # Each flag has a help text (the line after a long flag, or its own).
    assert options.count("(default:") == len(flags)
