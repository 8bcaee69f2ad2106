"""Catch-up mode in the service: a backlog of old events (the harness stamps every event at
2023-11-14) is applied in a few large micro-batches instead of one per refresh.batch_events,
by its age or, with refresh.catch_up_behind_ms = 0, because every poll comes back full; with
refresh.catch_up_events = refresh.batch_events it is not."""

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


@pytest.mark.parametrize(
    ("behind_ms", "catch_up_events"), [(30_000, 50_000), (0, 50_000), (0, 200)]
)
def test_a_backlog_of_old_events_is_applied_in_large_micro_batches(
    bootstrap: str,
    topics: Topics,
    training_file: Path,
    tmp_path: Path,
    behind_ms: int,
    catch_up_events: int,
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
        refresh={
            "batch_events": 200,
            "batch_ms": 50,
            "catch_up_behind_ms": behind_ms,
            "catch_up_events": catch_up_events,
        },
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
    if catch_up_events > 200:
        assert batches <= normal // 4, (batches, events)  # ended by short polls instead
    else:
        assert batches >= normal // 2, (batches, events)
