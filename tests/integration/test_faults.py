"""Faults against the running service (in process, so its state can be watched): the broker
stopped (SIGSTOP) for a while, the store gone for a while, a corrupted snapshot, hostile
messages on both topics. At d = 384 with event times spread over hours (decay, late events,
queries that leave the head set) and nprobe = nlist, each ends with every check of the exact
oracle (annstream/testing/oracle.py) passing, without restarting the service except where the
fault is a restart. Kill -9 at random points is in test_service.py; kill -9 at named points and
longer, combined schedules are `annstream bench faults` (test_bench_faults.py).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from annstream.broker import EmbeddedBroker
from annstream.config import KafkaConfig
from annstream.events import EngagementBatch
from annstream.kafka import make_producer
from annstream.snapshot import list_snapshots
from annstream.testing.aerospike_server import AerospikeTestServer
from annstream.testing.harness import (
    NLIST,
    Feed,
    Topics,
    Workload,
    bad_inputs,
    committed_offsets,
    exact_oracle,
    judge,
    read_dead_letters,
    service_settings,
    spread_times,
    step_until,
    to_config,
    workload,
)
from annstream.testing.oracle import CHECKS, OracleReport
from consumers.service import RefresherService

pytest_plugins = ["service_harness"]

FAULT_S = 10.0
"""The low end of the issue's 10-30 s; `annstream bench faults` runs longer ones."""
DIM = 384
HOURS = 6.0
RESTART_CHECKS = ("deleted_ad_expiring", "orphan_live_list")
"""Checks that depend on issue 11 item 7/8 across restarts (the restart branch)."""


@pytest.fixture(scope="module")
def training() -> np.ndarray:
    return np.random.default_rng(99).standard_normal((1_000, DIM)).astype("float32")


def _work(seed: int) -> Workload:
    return spread_times(workload(seed=seed, dim=DIM), HOURS, seed)


def _judged(url: str, work: Workload, service: RefresherService) -> OracleReport:
    assert service.index is not None
    return judge(url, exact_oracle(work.steps, DIM), index_ads=service.index.ntotal)


def _service(
    bootstrap: str,
    topics: Topics,
    training_file: Path,
    tmp_path: Path,
    store_url: str,
    group: str = "",
    **kw: dict[str, Any],
) -> tuple[RefresherService, str]:
    group = group or f"faults-{uuid.uuid4().hex[:8]}"
    settings = service_settings(
        bootstrap,
        topics,
        training_file,
        store_url,
        tmp_path / "snap",
        group,
        dim=DIM,
        kafka={"client": {"session.timeout.ms": "6000"}, **kw.pop("kafka", {})},
        index={"nprobe": NLIST},
        refresh={"nprobe": NLIST},
        **kw,
    )
    return RefresherService.from_config(to_config(settings)), group


def _everything_done(service: RefresherService, feed: Feed, bootstrap: str, group: str) -> bool:
    return (
        service.idle
        and service.ads.offsets == feed.ends[feed.topics.ads]
        and committed_offsets(bootstrap, feed.topics.engagements, group) == feed.engagement_ends
    )


def test_broker_stopped_for_seconds_then_the_service_recovers_without_restart(
    kafka_broker: EmbeddedBroker,
    bootstrap: str,
    topics: Topics,
    training_file: Path,
    training: np.ndarray,
    tmp_path: Path,
) -> None:
    work = _work(11)
    eng_at = [i for i, b in enumerate(work.steps) if isinstance(b, EngagementBatch)]
    before, during = eng_at[len(eng_at) // 3], eng_at[len(eng_at) // 2]
    url = f"sqlite:///{tmp_path / 'store.db'}"
    service, group = _service(bootstrap, topics, training_file, tmp_path, url)
    feed = Feed(bootstrap, topics, dim=DIM)
    try:
        for b in work.steps[:before]:
            feed.send(b)
        feed.flush()
        step_until([service], lambda: _everything_done(service, feed, bootstrap, group), "start")
        for b in work.steps[before:during]:
            feed.send(b)
        feed.flush()
        service.step()  # some of them in flight when the broker stops
        kafka_broker.pause()
        resume = threading.Timer(FAULT_S, kafka_broker.resume)
        resume.start()
        try:
            end = time.monotonic() + FAULT_S
            while time.monotonic() < end:
                service.step()
        finally:
            resume.join()
            kafka_broker.resume()
        for b in work.steps[during:]:
            feed.send(b)
        feed.flush()
        step_until(
            [service],
            lambda: _everything_done(service, feed, bootstrap, group),
            "every event consumed, stored and committed after the broker came back",
            guard_s=120.0,
        )
        report = _judged(url, work, service)
        assert report.ok(), report.as_dict()
        assert service.index is not None
        np.testing.assert_array_equal(service.index.ids(), sorted(work.live))
    finally:
        kafka_broker.resume()
        service.shutdown()


def test_store_down_for_seconds_commits_nothing_then_recovers_without_restart(
    bootstrap: str, topics: Topics, training_file: Path, training: np.ndarray, tmp_path: Path
) -> None:
    work = _work(12)
    eng_at = [i for i, b in enumerate(work.steps) if isinstance(b, EngagementBatch)]
    before = eng_at[len(eng_at) // 3]
    server = AerospikeTestServer(namespaces=["test"]).start()
    try:
        url = f"aerospike://{server.url_host}/test/neighbours"
        service, group = _service(
            bootstrap, topics, training_file, tmp_path, url, store={"timeout_ms": 300}
        )
        feed = Feed(bootstrap, topics, dim=DIM)
        try:
            for b in work.steps[:before]:
                feed.send(b)
            feed.flush()
            step_until(
                [service], lambda: _everything_done(service, feed, bootstrap, group), "start"
            )
            stored = committed_offsets(bootstrap, topics.engagements, group)
            assert server.record_count() > 0

            server.stop()
            for b in work.steps[before:]:
                feed.send(b)
            feed.flush()
            end = time.monotonic() + FAULT_S
            next_check = 0.0
            while time.monotonic() < end:
                service.step()
                if time.monotonic() >= next_check:
                    # nothing the outage kept from the store is ever committed
                    assert committed_offsets(bootstrap, topics.engagements, group) == stored
                    next_check = time.monotonic() + 1.0
            assert service.stats.store_failures >= 1 and service.checkpoint.pending
            assert committed_offsets(bootstrap, topics.engagements, group) == stored

            server.start()  # same port, same records
            step_until(
                [service],
                lambda: _everything_done(service, feed, bootstrap, group),
                "every event stored and committed after the store came back",
                guard_s=120.0,
            )
            report = _judged(url, work, service)
            assert report.ok(), report.as_dict()
            assert server.record_count() == report.live_lists + report.expiring_lists
        finally:
            service.shutdown()
    finally:
        server.stop()


def test_corrupted_newest_snapshot_falls_back_and_ends_like_the_oracle(
    bootstrap: str,
    topics: Topics,
    training_file: Path,
    training: np.ndarray,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    work = _work(13)
    half = len(work.steps) // 2
    url = f"sqlite:///{tmp_path / 'store.db'}"
    service, group = _service(bootstrap, topics, training_file, tmp_path, url)
    feed = Feed(bootstrap, topics, dim=DIM)
    try:
        for b in work.steps[:half]:
            feed.send(b)
        feed.flush()
        step_until([service], lambda: _everything_done(service, feed, bootstrap, group), "half")
    finally:
        service.shutdown()
    snaps = list_snapshots(tmp_path / "snap")
    assert snaps
    data = bytearray(snaps[0].read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    snaps[0].write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="annstream.snapshot"):
        service, _ = _service(bootstrap, topics, training_file, tmp_path, url, group=group)
    assert any("unusable" in r.getMessage() for r in caplog.records)
    try:
        for b in work.steps[half:]:
            feed.send(b)
        feed.flush()
        step_until([service], lambda: _everything_done(service, feed, bootstrap, group), "the rest")
        assert service.index is not None
        np.testing.assert_array_equal(service.index.ids(), sorted(work.live))
        report = _judged(url, work, service)
        # a restart: the checks of issue 11 item 7/8 across restarts are the restart branch's
        owned = tuple(c for c in CHECKS if c not in RESTART_CHECKS)
        assert report.ok(owned), report.as_dict()
    finally:
        service.shutdown()


def test_hostile_messages_on_both_topics_are_dead_lettered_and_the_rest_processed(
    bootstrap: str, topics: Topics, training_file: Path, training: np.ndarray, tmp_path: Path
) -> None:
    work = _work(14)
    limit = KafkaConfig().max_message_bytes
    rng = np.random.default_rng(14)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    service, group = _service(bootstrap, topics, training_file, tmp_path, url)
    feed = Feed(bootstrap, topics, dim=DIM)
    # The broker takes larger messages than the service's default limit: write them.
    feed.producer = make_producer(
        KafkaConfig(bootstrap_servers=bootstrap, max_message_bytes=2 * limit)
    )
    bad = bad_inputs(rng, feed, 120, limit)
    spots = np.sort(rng.integers(0, len(work.steps), len(bad)))
    try:
        at = 0
        for i, b in enumerate(work.steps):
            while at < len(bad) and spots[at] == i:
                topic, _, value = bad[at]
                feed.raw(topic, [rng.bytes(8)], [value])
                at += 1
            feed.send(b)
        feed.flush()
        step_until(
            [service],
            lambda: _everything_done(service, feed, bootstrap, group),
            "every event consumed",
        )
        assert service.stats.dead_letters == len(bad)
        report = _judged(url, work, service)
        assert report.ok(), report.as_dict()
        assert service.index is not None
        np.testing.assert_array_equal(service.index.ids(), sorted(work.live))
    finally:
        service.shutdown()
    letters = read_dead_letters(bootstrap, topics.dead_letters, len(bad))
    assert all(d["reason"].strip() for d in letters)
    assert Counter(d["source"].split("/")[0] for d in letters) == Counter(t for t, _, _ in bad)
    assert {k for _, k, _ in bad} >= {"null", "truncated", "dim", "nan", "oversized"}
    # Over the limit, a dead letter does not fit either: it is a reference (no value).
    oversized = [d for d in letters if "max_message_bytes" in d["reason"]]
    assert len(oversized) == sum(k == "oversized" for _, k, _ in bad)
    assert all(d["value"] is None for d in oversized)
    rest = Counter(d["value"] for d in letters if d not in oversized)
    assert rest == Counter(v for _, k, v in bad if k != "oversized")
