"""Smoke test: benchmarks/keras_hub_generation.py times one keras-hub
generation step of a tiny GPT-2, converted and original, at two buffer
lengths, and writes its CSV and Markdown table."""

import csv

import pytest

from benchmarks import keras_hub_generation
from benchmarks import registry

pytestmark = pytest.mark.tensorflow_only

TINY = dict(num_layers=1, hidden_dim=16, num_heads=2, repeats=2)


def test_keras_hub_generation_benchmark_times_both_caches(tmp_path):
    keras_hub_generation.main(
        [
            "--num-layers",
            "1",
            "--hidden-dim",
            "16",
            "--lengths",
            "8",
            "32",
            "--repeats",
            "2",
            "--output-dir",
            str(tmp_path),
        ]
    )
    with open(tmp_path / "keras_hub_generation.csv", newline="") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
    assert tuple(reader.fieldnames) == keras_hub_generation.FIELDS
    assert sorted((r["model"], int(r["buffer_length"])) for r in rows) == [
        ("favor", 8),
        ("favor", 32),
        ("keras_hub", 8),
        ("keras_hub", 32),
    ]
    cache = {
        (r["model"], int(r["buffer_length"])): int(r["cache_bytes"])
        for r in rows
    }
    # The FAVOR+ state does not grow with the buffer; the key/value cache
    # holds every position.
    assert cache["favor", 8] == cache["favor", 32]
    assert cache["keras_hub", 32] == 4 * cache["keras_hub", 8]
    for row in rows:
        assert 0 < float(row["min_ms"]) <= float(row["median_ms"])
    text = (tmp_path / "keras_hub_generation.md").read_text()
    assert "| 32 |" in text and "Load average" in text


def test_registry_entry_measures_one_generate_step():
    configuration = registry.get("keras_hub_gpt2_generate_step_favor_128")
    result = configuration.function(
        **{**configuration.parameters, **TINY, "buffer_length": 8}
    )
    assert result["status"] == "ok"
    assert 0 < result["min_s"] <= result["median_s"]
    assert result["peak_rss_mib"] >= result["baseline_rss_mib"]
