"""`annstream bench ingest` end to end at a tiny size: its own broker, one JSON object out."""

from __future__ import annotations

import json

import pytest

from annstream.cli import main
from producers.sources import MIXTURE_VERSION

KEYS = {
    "ingest_events_per_s",
    "raw_consume_events_per_s",
    "ratio",
    "bulk_add_vectors_per_s",
    "bytes_per_indexed_ad",
    "bytes_goal",
    "produce_events_per_s",
}


@pytest.mark.parametrize(("dim", "vectors"), [(50, "glove-6B-50d"), (384, MIXTURE_VERSION)])
def test_bench_ingest_prints_positive_figures(
    capsys: pytest.CaptureFixture[str], dim: int, vectors: str
) -> None:
    argv = ["bench", "ingest", "--json", "--ads", "3000", "--dim", str(dim), "--nlist", "16"]
    argv += ["--train", "1000", "--batch", "500", "--partitions", "2"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["benchmark"] == "ingest"
    assert result.keys() >= KEYS
    for key in KEYS:
        assert result[key] > 0, key
    assert result["ads"] == 3000 and result["dim"] == dim and result["vectors"] == vectors
    assert result["dead_lettered"] == 0
    assert result["bytes_goal"] == pytest.approx(1.3 * (4 * dim + 8))
