"""`bench freshness`'s goal (latency percentiles only count at the offered rate, kept up) and
the benchmarks' `--set` service settings."""

from __future__ import annotations

import pytest

from annstream.bench.freshness import goal_met, sustained
from annstream.bench.rig import Phase, parse_settings
from annstream.errors import AnnstreamError


def phase(*, rate: float, sent: int, lags: list[int], fresh_ms: int = 300) -> Phase:
    p = Phase(ad_rate=rate, engagement_rate=0, duration_s=10, sample_every_s=1)
    p.freshness.add([float(fresh_ms)] * 100)
    p.samples = [{"t_s": float(t), "ad_lag": lag} for t, lag in enumerate(lags)]
    p.ads_sent, p.stream_s, p.drained = sent, 10.0, True
    return p


def test_goal_met_at_the_offered_rate_with_a_flat_lag() -> None:
    p = phase(rate=300, sent=3000, lags=[40] * 8)
    assert p.achieved() == 1.0
    assert sustained(p) and goal_met(p, heads=100, want_heads=100)


def test_goal_not_met_when_the_feeder_fell_short_of_the_rate() -> None:
    p = phase(rate=300, sent=1610, lags=[40] * 8)  # 161/s of 300/s: the old false positive
    assert sustained(p) and round(p.achieved(), 2) == 0.54
    assert not goal_met(p, heads=100, want_heads=100)


def test_goal_not_met_when_the_lag_grows_or_heads_are_missing() -> None:
    growing = phase(rate=300, sent=3000, lags=[0, 0, 100, 200, 300, 400, 500, 600])
    assert not sustained(growing) and not goal_met(growing, heads=100, want_heads=100)
    flat = phase(rate=300, sent=3000, lags=[40] * 8)
    assert not goal_met(flat, heads=99, want_heads=100)
    slow = phase(rate=300, sent=3000, lags=[40] * 8, fresh_ms=600)
    assert not goal_met(slow, heads=100, want_heads=100)


def test_bench_settings_are_toml_values_by_section() -> None:
    got = parse_settings(["store.neighbour_metadata=false", "refresh.batch_ms = 100"])
    assert got == {"store": {"neighbour_metadata": False}, "refresh": {"batch_ms": 100}}
    assert parse_settings(["store.on_head_exit=delete"]) == {"store": {"on_head_exit": "delete"}}
    with pytest.raises(AnnstreamError, match=r"SECTION\.KEY=VALUE"):
        parse_settings(["batch_ms=100"])
