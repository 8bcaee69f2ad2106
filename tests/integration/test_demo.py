from __future__ import annotations

import json

import pytest

from annstream.cli import main


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
