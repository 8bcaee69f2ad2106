"""`annstream bench freshness` and `bench load` end to end at a tiny size: keys, no timings."""

from __future__ import annotations

import json
from typing import Any

import pytest

from annstream.cli import main
from producers.sources import MIXTURE_VERSION

SMALL = ["--ads", "5000", "--heads", "300", "--nlist", "32", "--nprobe", "8", "--k", "10"]
SMALL += ["--margin", "5", "--partitions", "2", "--engagement-rate", "200"]


def _bench(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, Any]:
    assert main(["bench", *argv, "--json", *SMALL]) == 0
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    return result


def test_bench_freshness_prints_goal_baseline_and_sweep(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["freshness", "--rate", "500", "--duration", "3", "--baseline-duration", "2"]
    argv += ["--dim", "384"]
    result = _bench(capsys, [*argv, "--sweep", "--rates", "300,600", "--step-duration", "2"])
    assert result["benchmark"] == "freshness"
    assert result["config"]["dim"] == 384 and result["config"]["vectors"] == MIXTURE_VERSION
    assert result.keys() >= {
        "ad_events_per_s",
        "head_queries",
        "freshness_ms",
        "goal_met",
        "baseline",
        "ratio_p99",
        "sweep",
        "max_sustained_ad_events_per_s",
    }
    assert set(result["freshness_ms"]) == {"p50", "p99"}
    assert result["head_queries"] >= 297
    assert result["config"]["store"] == "sqlite" and 0 < result["achieved_ratio"] < 2
    assert 1 <= len(result["sweep"]) <= 3


def test_bench_load_prints_samples_and_growth(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["load", "--minutes", "0.1", "--rate", "500", "--sample-every", "1"]
    result = _bench(capsys, [*argv, "--store", "aerospike-test"])
    assert result["benchmark"] == "load" and result["store"] == "aerospike-test"
    assert result["dim"] == 50 and result["vectors"] == "glove-6B-50d"
    assert result.keys() >= {"samples", "rss_growth_mb", "lag_growth", "flat", "totals"}
    samples = result["samples"]
    assert len(samples) >= 3
    assert samples[0].keys() >= {"t_s", "rss_mb", "ad_lag", "engagement_lag", "freshness_p99_ms"}
    assert set(result["flat"]) == {"rss", "lag"}
    totals = result["totals"]
    assert totals["ads_consumed"] >= totals["ads_sent"] > 0
