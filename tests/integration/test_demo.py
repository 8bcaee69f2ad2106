from __future__ import annotations

import json

import pytest

from annstream.cli import main
from producers.sources import MIXTURE_VERSION


def test_demo_json_summary_on_real_vectors(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--json", "--ads", "20000", "--stream-ads", "1000"]
    argv += ["--engagements", "20000", "--queries", "3000", "--nlist", "128", "--rate", "0"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("ads_indexed", "head_queries", "records_written", "recall_at_k", "events_per_s"):
        assert key in summary
    assert set(summary["freshness_ms"]) == {"p50", "p99"}
    assert summary["ad_events"] == 20000 + 1000 + 1000 // 10  # catalogue, new ads, deletes
    assert summary["engagement_events"] == 20000
    assert summary["head_queries"] > 100
    assert summary["records_written"] >= summary["head_queries"]
    assert summary["recall_at_k"] >= 0.9
    assert summary["dim"] == 50 and summary["vectors"] == "glove-6B-50d"


def test_demo_at_384_dimensions_runs_on_clustered_vectors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--dim 384` alone switches to the clustered synthetic vectors (GloVe is 50-d); the text
    summary prints its values as JSON."""
    argv = ["demo", "--dim", "384", "--ads", "6000", "--stream-ads", "500"]
    argv += ["--engagements", "6000", "--queries", "1000", "--nlist", "64", "--nprobe", "16"]
    assert main([*argv, "--rate", "0"]) == 0
    lines = [line.split(None, 1) for line in capsys.readouterr().out.strip().splitlines()]
    summary = {key: value for key, value in lines}
    assert summary["vectors"] == MIXTURE_VERSION and json.loads(summary["dim"]) == 384
    freshness = json.loads(summary["freshness_ms"])
    assert set(freshness) == {"p50", "p99"}
    assert json.loads(summary["ad_events"]) == 6000 + 500 + 500 // 10
    assert json.loads(summary["head_queries"]) > 50
    assert json.loads(summary["recall_at_k"]) >= 0.9
