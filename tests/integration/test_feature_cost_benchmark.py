"""Smoke test: benchmarks/feature_cost.py runs end to end at tiny sizes."""

import csv

from benchmarks import feature_cost


def test_feature_cost_times_every_configuration(tmp_path):
    feature_cost.main(
        [
            "--length",
            "32",
            "--num-features",
            "16",
            "--rounds",
            "2",
            "--warmup",
            "0",
            "--output-dir",
            str(tmp_path),
        ]
    )
    with open(tmp_path / "feature_cost.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == list(feature_cost.FIELDS)
    assert sorted((r["config"], r["mode"]) for r in rows) == sorted(
        (c, m) for c in feature_cost.CONFIGS for m in feature_cost.MODES
    )
    for row in rows:
        assert row["timed_runs"] == "2"
        assert (
            float(row["max_s"])
            >= float(row["median_s"])
            >= float(row["min_s"])
            > 0
        )
        assert float(row["ratio"]) > 0 and float(row["paired_ratio"]) > 0
        if row["config"] == feature_cost.BASELINE:
            assert float(row["ratio"]) == 1.0
    assert {r["feature_map"] for r in rows} == {"softmax", "favor++"}
    summary = (tmp_path / "feature_cost_summary.txt").read_text()
    assert summary.count("target <= 1.1x") == 4
    assert "tensorflow" in (tmp_path / "feature_cost.json").read_text()
