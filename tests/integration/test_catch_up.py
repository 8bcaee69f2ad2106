"""Catch-up mode in the service: a backlog of old events (the harness stamps every event at
2023-11-14) is applied in a few large micro-batches instead of one per refresh.batch_events,
and with refresh.catch_up_behind_ms = 0 it is not."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from annstream.testing.harness import (
    Feed,
    Topics,
    service_settings,
    step_until,
    to_config,
    workload,
)
from consumers.service import RefresherService

pytest_plugins = ["service_harness"]


@pytest.mark.parametrize("behind_ms", [30_000, 0])
def test_a_backlog_of_old_events_is_applied_in_large_micro_batches(
    bootstrap: str, topics: Topics, training_file: Path, tmp_path: Path, behind_ms: int
) -> None:
    work = workload(seed=3, engagements=600, stream_ads=1_200)
    feed = Feed(bootstrap, topics)
    for b in work.steps:
        feed.send(b)
    feed.flush()
    settings = service_settings(
        bootstrap,
        topics,
        training_file,
        f"sqlite:///{tmp_path / 'store.db'}",
        tmp_path / "snap",
        f"catch-{uuid.uuid4().hex[:8]}",
        refresh={"batch_events": 200, "batch_ms": 50, "catch_up_behind_ms": behind_ms},
    )
    service = RefresherService.from_config(to_config(settings))
    try:
        step_until(
            [service],
            lambda: (
                service.stats.ad_events >= feed.messages[topics.ads]
                and service.stats.engagement_events >= feed.messages[topics.engagements]
                and service.idle
            ),
            "the backlog consumed",
        )
        batches = service.stats.micro_batches
        heads = len(service.refresher) if service.refresher else 0
    finally:
        service.shutdown()
    events = feed.messages[topics.ads] + feed.messages[topics.engagements]
    assert heads > 0
    normal = events // 200  # micro-batches of refresh.batch_events
    if behind_ms:
        assert batches <= normal // 4, (batches, events)  # ended by empty polls instead
    else:
        assert batches >= normal // 2, (batches, events)
