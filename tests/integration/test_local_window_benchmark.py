"""Smoke test: benchmarks/local_window_cost.py runs end to end at tiny sizes."""

import csv

from benchmarks import local_window_cost


def test_local_window_cost_times_every_window(tmp_path):
    local_window_cost.main(
        [
            "--windows",
            "4",
            "16",
            "--rounds",
            "2",
            "--warmup",
            "0",
            "--num-heads",
            "2",
            "--key-dim",
            "8",
            "--num-features",
            "16",
            "--output-dir",
            str(tmp_path),
        ]
    )
    with open(tmp_path / "local_window_cost.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == list(local_window_cost.FIELDS)
    assert sorted(
        (r["kind"], r["mode"], int(r["window"])) for r in rows
    ) == sorted(
        [
            ("call", m, w)
            for m in ("causal", "bidirectional")
            for w in (0, 4, 16)
        ]
        + [(k, "causal", w) for k in ("step", "capped_step") for w in (4, 16)]
    )
    for row in rows:
        assert row["timed_runs"] == "2"
        assert (
            float(row["max_s"])
            >= float(row["median_s"])
            >= float(row["min_s"])
            > 0
        )
        assert row["length"] == ("8" if row["kind"] == "call" else "1")
        if row["window"] == "4":
            assert float(row["ratio"]) == 1.0
    summary = (tmp_path / "local_window_cost_summary.txt").read_text()
    assert summary.count("MultiHeadAttention") == 2
    assert "tensorflow" in (tmp_path / "local_window_cost.json").read_text()
