"""Smoke test of examples/convert_pretrained.py at a tiny size: it writes
its CSV and plot, every number is finite, and the exact model's bits per
byte are the cross-entropy of its logits."""

import csv
import math

import numpy as np
import pytest


@pytest.fixture
def example():
    from examples import convert_pretrained

    return convert_pretrained


def bits_per_byte(logits, targets):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, targets[..., None], -1)
    return -picked.mean() / math.log(2.0)


def test_convert_pretrained_runs_tiny(example, tmp_path, capsys):
    result = example.main(
        [
            "--steps",
            "6",
            "--finetune-steps",
            "1,2",
            "--transfer-steps",
            "1",
            "--transfer-sequences",
            "4",
            "--variants",
            "favor",
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
            "16",
            "--corpus-bytes",
            "60000",
            "--validation-windows",
            "8",
            "--output-dir",
            str(tmp_path),
        ]
    )
    with open(tmp_path / "convert_pretrained.csv") as f:
        rows = list(csv.DictReader(f))
    assert (tmp_path / "convert_pretrained.png").stat().st_size > 10_000
    methods = {(r["method"], int(r["finetune_steps"])) for r in rows}
    # Finetuning without transfer also runs the transfer's step more, so
    # that its curve reaches the compute of the curve with transfer.
    assert methods == {
        ("exact", 0),
        ("converted", 3),
        *(
            (m, n)
            for m in ("converted", "converted+transfer", "scratch")
            for n in (0, 1, 2)
        ),
    }
    for row in rows:
        for key in ("seconds", "compute_steps", "bits_per_byte"):
            assert math.isfinite(float(row[key])), row
        assert 0 < float(row["bits_per_byte"]) < 10
    # (a): the teacher's validation cross-entropy, computed here.
    inputs, targets = result["validation"]
    want = bits_per_byte(result["teacher"].predict(inputs, verbose=0), targets)
    (exact,) = [
        float(r["bits_per_byte"]) for r in rows if r["method"] == "exact"
    ]
    np.testing.assert_allclose(exact, want, rtol=1e-3)
    # The transfer brought the attention outputs closer to the teacher's.
    transfer = result["transfers"]["favor"]
    assert sum(transfer["mse_after"].values()) < sum(
        transfer["mse_before"].values()
    )
    assert "Validation bits per byte" in capsys.readouterr().out
