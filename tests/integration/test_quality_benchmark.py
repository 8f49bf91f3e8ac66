"""Smoke test: benchmarks/quality.py trains every configuration end to end
at a tiny size and writes its CSV, JSON and table."""

import csv
import json
import math

import pytest

from benchmarks import quality

TINY = [
    "--steps",
    "6",
    "--epochs",
    "2",
    "--seeds",
    "0",
    "--context",
    "16",
    "--batch-size",
    "4",
    "--num-layers",
    "1",
    "--num-heads",
    "2",
    "--hidden-dim",
    "16",
    "--intermediate-dim",
    "16",
    "--num-features",
    "8",
    "--redraw-interval",
    "2",
    "--corpus-bytes",
    "60000",
    "--validation-windows",
    "8",
]
# Every kind of configuration once: the other windows differ only in size.
CONFIGS = [
    "exact",
    "favor",
    "favor_redraw",
    "favor_window16",
    "favor_redraw_to_end",
]


def test_quality_benchmark_runs_every_configuration(tmp_path, capsys):
    quality.main(TINY + ["--configs", *CONFIGS, "--output-dir", str(tmp_path)])
    with open(tmp_path / "quality.csv", newline="") as file:
        rows = {row["config"]: row for row in csv.DictReader(file)}
    assert set(CONFIGS) < set(quality.CONFIGS)
    assert list(rows) == CONFIGS
    assert list(next(iter(rows.values()))) == list(quality.FIELDS)
    for row in rows.values():
        assert 0 < float(row["val_bits_per_byte"]) < 10
        assert float(row["ms_per_step"]) > 0
        assert math.isfinite(float(row["train_s"]))
    # 6 steps, redraws due every 2: the new rule skips the one at the end.
    assert {name: row["redraw_steps"] for name, row in rows.items()} == {
        "exact": "",
        "favor": "",
        "favor_redraw": "2 4",
        "favor_window16": "",
        "favor_redraw_to_end": "2 4 6",
    }
    favor_sizes = {
        row["parameters"] for name, row in rows.items() if name != "exact"
    }
    assert len(favor_sizes) == 1
    [run] = json.loads((tmp_path / "quality.json").read_text())["runs"]
    assert run["environment"]["tensorflow"]
    assert run["settings"]["steps"] == 6
    quality.plot([tmp_path / "quality.csv"], tmp_path / "quality.png")
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    table = capsys.readouterr().out.split("change against favor")[-1]
    for name in CONFIGS:
        assert name in table


def test_epochs_must_divide_the_steps():
    with pytest.raises(SystemExit):
        quality.parse_args(["--steps", "10", "--epochs", "4"])
