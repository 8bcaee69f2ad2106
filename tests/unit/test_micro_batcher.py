"""The micro-batch trigger's catch-up mode by event age (refresh.catch_up_*) and its settings."""

from __future__ import annotations

import pytest

from annstream.config import RefreshConfig, load_config
from annstream.errors import ConfigError
from annstream.refresher import MicroBatcher

CFG = RefreshConfig(
    batch_ms=100, batch_events=10, catch_up_events=50, catch_up_ms=2_000, catch_up_behind_ms=30_000
)


def test_a_backlog_older_than_catch_up_behind_ms_grows_the_batch() -> None:
    mb = MicroBatcher(CFG, now_ms=0)
    mb.add(20)
    assert mb.due(1, behind_ms=29_999)  # near the head of the topic: the usual batch
    assert not mb.due(1, behind_ms=30_000)  # a backfill: keep polling
    mb.add(30)
    assert mb.due(1, behind_ms=60_000)  # catch_up_events reached
    mb.reset(0)
    mb.add(20)
    assert not mb.due(1_999, behind_ms=60_000) and mb.due(2_000, behind_ms=60_000)  # catch_up_ms


def test_a_poll_that_found_nothing_ends_the_catch_up_batch() -> None:
    mb = MicroBatcher(CFG, now_ms=0)
    mb.add(20)
    assert not mb.due(150, behind_ms=60_000, drained=False)
    assert mb.due(150, behind_ms=60_000, drained=True)


def test_catch_up_behind_ms_zero_never_catches_up_by_age() -> None:
    off = RefreshConfig(batch_ms=100, batch_events=10, catch_up_behind_ms=0)
    mb = MicroBatcher(off, now_ms=0)
    mb.add(10)
    assert mb.due(1, behind_ms=10**9)


def test_catch_up_settings_are_checked_against_the_normal_batch() -> None:
    cfg = load_config(env={"ANNSTREAM_REFRESH__CATCH_UP_EVENTS": "80000"})
    assert cfg.refresh.catch_up_events == 80_000
    with pytest.raises(ConfigError, match=r"refresh\.catch_up_events .*batch_events"):
        load_config(env={}, overrides={"refresh": {"catch_up_events": 10}})
    with pytest.raises(ConfigError, match=r"refresh\.catch_up_ms .*batch_ms"):
        load_config(env={}, overrides={"refresh": {"catch_up_ms": 10}})
    with pytest.raises(ConfigError, match=r"refresh\.catch_up_behind_ms"):
        load_config(env={}, overrides={"refresh": {"catch_up_behind_ms": -1}})
