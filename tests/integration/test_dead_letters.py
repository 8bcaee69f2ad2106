"""The service against input it must refuse, at the real default limits: messages of 1.02 MB and
5 MB (the broker accepts them; librdkafka's default `message.max.bytes` is 1,000,000) and event
times far ahead of the consumer's clock, on both topics. Each is dead-lettered with its reason,
the offsets move on, and the events after it are applied (issue 11 items 1 and 5).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np

from annstream.config import KafkaConfig
from annstream.events import AdBatch, EngagementBatch
from annstream.kafka import make_producer
from annstream.testing.harness import (
    DIM,
    Feed,
    Topics,
    build_oracle,
    committed_offsets,
    problems,
    read_dead_letters,
    service_settings,
    step_until,
    to_config,
    workload,
)
from consumers.service import RefresherService

pytest_plugins = ["service_harness"]

YEAR_MS = 365 * 86_400_000


def _hostile(feed: Feed, now_ms: int) -> list[tuple[str, bytes, str]]:
    """(topic, value, start of the reason) of each record the service must dead-letter."""
    t = feed.topics
    vec = np.ones((1, DIM), "float32")
    ad = feed.ad_codec.encode(AdBatch.upserts(np.array([9_999_999]), vec, now_ms))[0]
    one = np.array([77], "int64")
    eng = feed.eng_codec.encode(
        EngagementBatch(
            one, one, np.zeros(1, "uint8"), np.ones(1, "float32"), one, vec, np.ones(1, bool)
        )
    )[0]

    def padded(message: bytes, size: int, fill: int) -> bytes:
        return message[:5] + bytes([fill]) * (size - 5)

    def future(batch: EngagementBatch | AdBatch, event_time: int) -> bytes:
        batch.event_time_ms[:] = event_time
        if isinstance(batch, AdBatch):
            return feed.ad_codec.encode(batch)[0]
        return feed.eng_codec.encode(batch)[0]

    over = "message of {} bytes is over kafka.max_message_bytes (1000000)"
    ahead = "event time {} ms is "
    later = EngagementBatch(
        one, one, np.zeros(1, "uint8"), np.ones(1, "float32"), one, vec, np.ones(1, bool)
    )
    return [
        (t.ads, padded(ad, 1_020_000, 1), over.format(1_020_000)),
        (t.ads, padded(ad, 5_000_000, 2), over.format(5_000_000)),
        (t.engagements, padded(eng, 1_020_000, 3), over.format(1_020_000)),
        (t.engagements, padded(eng, 5_000_000, 4), over.format(5_000_000)),
        (
            t.ads,
            future(AdBatch.upserts(np.array([9_999_998]), vec, 0), now_ms * 1000),
            ahead.format(now_ms * 1000),
        ),
        (
            t.engagements,
            future(later, now_ms + 100 * YEAR_MS),
            ahead.format(now_ms + 100 * YEAR_MS),
        ),
    ]


def test_huge_and_far_future_messages_on_both_topics_are_dead_lettered_and_the_rest_applied(
    bootstrap: str, topics: Topics, training_file: Path, training: np.ndarray, tmp_path: Path
) -> None:
    work = workload(seed=21)
    group = f"dlq-{uuid.uuid4().hex[:8]}"
    settings = service_settings(
        bootstrap,
        topics,
        training_file,
        f"sqlite:///{tmp_path / 'store.db'}",
        tmp_path / "snap",
        group,
    )
    service = RefresherService.from_config(to_config(settings))
    assert service.cfg.kafka.max_message_bytes == 1_000_000
    feed = Feed(bootstrap, topics)
    large = make_producer(KafkaConfig(bootstrap_servers=bootstrap, max_message_bytes=6_000_000))
    bad = _hostile(feed, int(time.time() * 1000))
    half = len(work.steps) // 2

    def done() -> bool:
        return (
            service.idle
            and service.ads.offsets == feed.ends[topics.ads]
            and committed_offsets(bootstrap, topics.engagements, group) == feed.engagement_ends
        )

    try:
        for b in work.steps[:half]:
            feed.send(b)
        feed.flush()
        for topic, value, _ in bad:
            # Through the feed's delivery reports, so its end offsets include these records.
            large.produce(topic, value=value, key=b"hostile", on_delivery=feed._delivered)
        assert large.flush(60) == 0 and not feed.errors
        for b in work.steps[half:]:
            feed.send(b)
        feed.flush()
        step_until([service], done, "every event consumed, stored and committed", guard_s=180)
        assert service.stats.dead_letters == len(bad)
        letters_out = service.ads.dead_letters
        assert letters_out.failed == 0 and letters_out.references == 4
        m = service.metrics  # the same totals, by reason, on /metrics
        assert m.value("dead_letters", reason="too_large") == 4
        assert m.value("dead_letters", reason="event_time") == 2
        assert m.value("dead_letters_references") == 4 and m.value("dead_letters_failed") == 0
        assert problems(service.store, work, build_oracle(training, work.live)) == []
        assert service.index is not None
        np.testing.assert_array_equal(service.index.ids(), sorted(work.live))
    finally:
        service.shutdown()
    letters = read_dead_letters(bootstrap, topics.dead_letters, len(bad), drain_s=1.0)
    assert len(letters) == len(bad)
    got = [(d["source"].split("/")[0], d["reason"]) for d in letters]
    for topic, _, reason in bad:
        assert sum(t == topic and r.startswith(reason) for t, r in got) == 1, (reason, got)
    for d in letters:
        if "max_message_bytes" in d["reason"]:
            assert d["value"] is None
        else:
            assert "kafka.max_event_skew_s (600 s)" in d["reason"]
            assert d["value"] in {v for _, v, _ in bad}
