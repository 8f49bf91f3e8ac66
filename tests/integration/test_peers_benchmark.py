"""Smoke tests of benchmarks/peers.py: its plumbing at tiny sizes, not speed.

The test environment lacks the other implementations' packages (PyTorch,
performer-pytorch, Model Garden): their rows must say "not installed".
"""

import csv
import sys

from benchmarks import peers


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_sweep_measures_keras_layers_and_reports_missing_peers(
    tmp_path, monkeypatch
):
    # Measured in this process (no workers, so no TensorFlow start-up each).
    monkeypatch.setattr(
        peers,
        "run_isolated",
        lambda args, row: peers.measure(dict(row, **vars(args))),
    )
    # A worker sets its threads before TensorFlow starts; this process's
    # TensorFlow may have started already (other tests of the session).
    monkeypatch.setattr(peers, "set_threads", lambda framework, threads: None)
    monkeypatch.setattr(peers.common, "environment", peers.common.describe)
    monkeypatch.setattr(
        peers,
        "missing_modules",
        lambda name: [] if name.startswith("keras") else ["torch"],
    )
    monkeypatch.setattr(
        sys,
        "argv",
        [
            peers.__file__,
            "--implementations",
            "keras_favor",
            "keras_mha",
            "torch_sdpa",
            "--modes",
            "bidirectional",
            "--passes",
            "forward_backward",
            "--lengths",
            "16",
            "--rounds",
            "1",
            "--repeats",
            "1",
            "--min-repeats",
            "1",
            "--output-dir",
            str(tmp_path),
        ],
    )
    peers.main()
    rows = read_csv(tmp_path / "peers.csv")
    assert list(rows[0]) == list(peers.FIELDS)
    found = {(r["implementation"], r["mode"]): r for r in rows}
    names = ("keras_favor", "keras_mha", "torch_sdpa")
    assert set(found) == {(name, "bidirectional") for name in names}
    for name in ("keras_favor", "keras_mha"):
        row = found[name, "bidirectional"]
        assert row["status"] == "ok" and row["rounds"] == "1"
        assert (
            float(row["max_s"])
            >= float(row["median_s"])
            >= float(row["min_s"])
            > 0
        )
        assert float(row["peak_rss_mib"]) >= float(row["baseline_rss_mib"]) > 0
    assert found["torch_sdpa", "bidirectional"]["status"] == "not_installed"
    assert "missing torch" in found["torch_sdpa", "bidirectional"]["note"]
    table = (tmp_path / "peers_table.md").read_text()
    assert "not installed" in table and "keras_favor FAVOR+ | " in table
    assert (tmp_path / "peers.png").stat().st_size > 0
    assert len(read_csv(tmp_path / "peers_runs.csv")) == len(rows)


def test_missing_modules_are_found_without_importing():
    # The test environment has keras_favor and not PyTorch.
    assert peers.missing_modules("keras_favor") == []
    assert "torch" in peers.missing_modules("torch_sdpa")


def test_longer_lengths_are_skipped_by_the_estimated_step_time():
    args = peers.parse_args(["--time-cap-s", "10"])
    measured_at = {
        ("keras_favor", "causal", "forward"): (4096, 1.0),
        ("keras_mha", "causal", "forward"): (4096, 1.0),
    }
    stops = {("performer_pytorch", "causal", "forward"): 2048}

    def reason(name, length):
        return peers.skip_reason(
            args, stops, measured_at, name, "causal", "forward", length
        )

    # Linear attention grows as L: 1 s at 4096 is 4 s at 16384, 16 s at 65536.
    assert reason("keras_favor", 16384) is None
    assert "estimated 16 s" in reason("keras_favor", 65536)
    # Exact attention grows as L^2: 16 s at 16384.
    assert "estimated 16 s" in reason("keras_mha", 16384)
    assert reason("performer_pytorch", 4096) == "out of budget from L=2048"
    assert reason("torch_sdpa", 65536) is None  # nothing measured yet


def test_rounds_combine_into_the_median_of_their_medians():
    base = {
        "implementation": "keras_favor",
        "mode": "causal",
        "pass": "forward",
        "length": 512,
        "baseline_rss_mib": "100",
    }
    runs = [
        dict(
            base,
            round=i,
            status="ok",
            median_s=m,
            min_s=m - 0.1,
            max_s=m + 0.1,
            timed_runs=3,
            peak_rss_mib=p,
            load_average=2,
            note="",
        )
        for i, (m, p) in enumerate([(1.0, 150), (3.0, 170), (2.0, 160)])
    ]
    runs.append(dict(base, round=4, status="timeout", note="killed after 1 s"))
    runs.append(
        dict(base, length=1024, round=1, status="out_of_memory", note="killed")
    )
    short, long = peers.combine(runs)
    assert (short["median_s"], short["min_s"], short["max_s"]) == (
        2.0,
        0.9,
        3.1,
    )
    assert (short["rounds"], short["timed_runs"], short["peak_rss_mib"]) == (
        3,
        9,
        170,
    )
    assert short["status"] == "ok" and short["note"] == "killed after 1 s"
    assert (long["status"], long["rounds"]) == ("out_of_memory", 0)


def test_append_numbers_rounds_on_and_keeps_the_budget(tmp_path, monkeypatch):
    # A stand-in worker: exact attention takes 1 s at L=512 and runs out of
    # memory at 1024; FAVOR+ always takes 1 s.
    def fake_worker(args, row):
        if row["implementation"] == "keras_mha" and row["length"] > 512:
            return {"status": "out_of_memory", "note": "killed"}
        return {
            "status": "ok",
            "median_s": 1.0,
            "min_s": 1.0,
            "max_s": 1.0,
            "timed_runs": 1,
            "baseline_rss_mib": 1.0,
            "peak_rss_mib": 2.0,
        }

    monkeypatch.setattr(peers, "run_isolated", fake_worker)
    monkeypatch.setattr(peers, "missing_modules", lambda name: [])
    runs_path = str(tmp_path / "runs.csv")
    options = [
        "--implementations",
        "keras_favor",
        "keras_mha",
        "--modes",
        "causal",
        "--passes",
        "forward",
        "--lengths",
        "512",
        "1024",
        "2048",
        "--time-cap-s",
        "5",
    ]
    first = peers.sweep(
        peers.parse_args(options + ["--rounds", "1"]), runs_path
    )
    # Under the 5 s cap: exact attention at 1024 (1 s at 512, times 4), and
    # FAVOR+ at 2048 (1 s at 1024, times 2).
    assert [(r["implementation"], r["length"], r["status"]) for r in first] == [
        ("keras_favor", 512, "ok"),
        ("keras_mha", 512, "ok"),
        ("keras_favor", 1024, "ok"),
        ("keras_mha", 1024, "out_of_memory"),
        ("keras_favor", 2048, "ok"),
        ("keras_mha", 2048, "skipped"),
    ]
    both = peers.sweep(
        peers.parse_args(options + ["--rounds", "1", "--append"]), runs_path
    )
    second = both[len(first) :]
    assert {int(r["round"]) for r in second} == {2}
    # The second round runs in the other order and skips what the first ran out of.
    assert [r["implementation"] for r in second[:2]] == [
        "keras_mha",
        "keras_favor",
    ]
    assert [
        r["status"] for r in second if r["implementation"] == "keras_mha"
    ] == ["ok", "skipped", "skipped"]
    combined = peers.combine(both)
    assert [int(r["rounds"]) for r in combined] == [2, 2, 2, 2, 0, 0]
