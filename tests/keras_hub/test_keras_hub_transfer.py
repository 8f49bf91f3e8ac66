"""Smoke test of examples/keras_hub_transfer.py at a tiny size: every arm
is in the table with finite bits per byte, the teacher's figure is the
cross-entropy of its logits, and a conversion whose local window covers
the whole sequence starts exactly where the teacher is."""

import csv
import json
import math

import numpy as np
import pytest

ARMS = {
    "teacher",
    "converted FAVOR+",
    "converted FAVOR+ window 16",
    "scratch FAVOR+",
    "scratch FAVOR+ window 16",
}


def reference_bits_per_byte(logits, targets):
    """Mean cross-entropy in bits, in float64."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, targets[..., None], -1)
    return -picked.mean() / math.log(2.0)


@pytest.mark.integration
def test_keras_hub_transfer_runs_tiny(tmp_path, capsys):
    from examples import keras_hub_transfer

    # The window (16) covers the whole sequence (16 bytes), so the
    # windowed conversion is exact softmax attention.
    result = keras_hub_transfer.main(
        [
            "--steps",
            "10",
            "--finetune-steps",
            "1",
            "--local-window",
            "16",
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
            "--learning-rate",
            "1e-2",
            "--corpus-bytes",
            "60000",
            "--validation-windows",
            "8",
            "--output-dir",
            str(tmp_path),
        ]
    )
    with open(tmp_path / "keras_hub_transfer.csv") as f:
        rows = list(csv.DictReader(f))
    with open(tmp_path / "keras_hub_transfer.json") as f:
        assert json.load(f)["rows"] == result["rows"]
    assert (tmp_path / "keras_hub_transfer.png").stat().st_size > 10_000
    assert {r["arm"] for r in rows} == ARMS
    for row in rows:
        assert 0 < float(row["bits_per_byte"]) < 10, row
        assert math.isfinite(float(row["seconds"])), row

    def bpb(arm, finetune_steps):
        (value,) = [
            r["bits_per_byte"]
            for r in result["rows"]
            if r["arm"] == arm and r["finetune_steps"] == finetune_steps
        ]
        return value

    # The teacher's last figure is the cross-entropy of its logits.
    inputs, targets = result["validation"]
    logits = result["teacher"].predict(
        {"token_ids": inputs, "padding_mask": np.ones(inputs.shape, bool)},
        verbose=0,
    )
    np.testing.assert_allclose(
        bpb("teacher", 1), reference_bits_per_byte(logits, targets), rtol=1e-5
    )
    teacher = bpb("teacher", 0)
    # The conversion itself, checked to float32 round-off: its logits and
    # its bits per byte are the teacher's.
    changes = result["summary"]["largest_logit_change"]
    assert changes["FAVOR+ window 16"] < 1e-5
    np.testing.assert_allclose(
        bpb("converted FAVOR+ window 16", 0), teacher, rtol=1e-6
    )
    out = capsys.readouterr().out
    assert "Validation bits per byte" in out
    for arm in ARMS:
        assert arm in out
