"""The delivery contract of the running service against the real broker and the Aerospike test
server: a changelog record refused for one partition never lets that partition's offset be
committed (not even by shutdown), /status and /healthz keep answering through a store outage
and say so, and lists the store lost are rewritten without any new event."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import KafkaError, KafkaException

from annstream.broker import free_port
from annstream.checkpoint import State
from annstream.config import StoreConfig
from annstream.events import EngagementBatch
from annstream.store import open_store
from annstream.store.record import NeighbourLists
from annstream.testing.aerospike_server import AerospikeTestServer
from annstream.testing.harness import (
    MARGIN,
    Feed,
    K,
    Topics,
    build_oracle,
    committed_offsets,
    problems,
    service_settings,
    step_until,
    to_config,
    workload,
)
from consumers.service import RefresherService

pytest_plugins = ["service_harness"]


def _done(service: RefresherService, feed: Feed, bootstrap: str, group: str) -> bool:
    return (
        service.idle
        and service.ads.offsets == feed.ends[feed.topics.ads]
        and committed_offsets(bootstrap, feed.topics.engagements, group) == feed.engagement_ends
    )


def test_a_changelog_record_refused_for_one_partition_is_never_committed_even_at_shutdown(
    bootstrap: str,
    topics: Topics,
    training_file: Path,
    training: np.ndarray,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 11 item 3: the append for partition 1 raises MSG_SIZE_TOO_LARGE (what the producer
    raises for a record over its limit). Partition 1's offset must stay where its head state
    is, through the error and the shutdown after it; a restart then loses no head query."""
    work = workload(seed=21)
    eng_at = [i for i, b in enumerate(work.steps) if isinstance(b, EngagementBatch)]
    split = eng_at[len(eng_at) // 3]
    group = f"refused-{uuid.uuid4().hex[:8]}"
    settings = service_settings(
        bootstrap,
        topics,
        training_file,
        f"sqlite:///{tmp_path / 'store.db'}",
        tmp_path / "snap",
        group,
        service={"shutdown_timeout_s": 2.0},
    )
    feed = Feed(bootstrap, topics)
    service = RefresherService.from_config(to_config(settings))
    try:
        for b in work.steps[:split]:
            feed.send(b)
        feed.flush()
        step_until([service], lambda: _done(service, feed, bootstrap, group), "the first third")
        before = committed_offsets(bootstrap, topics.engagements, group)

        refused: list[int] = []
        append = service.head_log.append

        def refusing_append(partition: int, state: State, engagement_offset: int) -> None:
            if partition == 1:
                refused.append(engagement_offset)
                raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
            append(partition, state, engagement_offset)

        monkeypatch.setattr(service.head_log, "append", refusing_append)
        for b in work.steps[split:]:
            feed.send(b)
        feed.flush()
        deadline = time.monotonic() + 60
        # before the fix the error escaped the loop, then shutdown committed it anyway
        with contextlib.suppress(KafkaException):
            service.run(until=lambda s: len(refused) >= 3 or time.monotonic() > deadline)
    finally:
        service.shutdown()
    assert refused and max(refused) > before[1], "no micro-batch with partition 1 events"
    after = committed_offsets(bootstrap, topics.engagements, group)
    assert after[1] == before[1], "partition 1 committed without its head state"
    assert any(after[p] > before[p] for p in after if p != 1)

    restarted = RefresherService.from_config(to_config(settings))
    try:
        step_until(
            [restarted],
            lambda: _done(restarted, feed, bootstrap, group),
            "every event after the restart",
        )
        assert restarted.refresher is not None
        np.testing.assert_array_equal(restarted.refresher.head_ids(), work.heads)
        assert problems(restarted.store, work, build_oracle(training, work.live)) == []
    finally:
        restarted.shutdown()


def _get(url: str, timeout_s: float = 2.0) -> tuple[int, dict[str, Any], float]:
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            code, body = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        code, body = err.code, err.read()
    return code, json.loads(body), time.monotonic() - t0


def test_status_and_health_answer_through_a_store_outage_and_say_the_store_is_down(
    bootstrap: str, topics: Topics, training_file: Path, tmp_path: Path
) -> None:
    work = workload(seed=22)
    eng_at = [i for i, b in enumerate(work.steps) if isinstance(b, EngagementBatch)]
    split = eng_at[len(eng_at) // 3]
    group = f"health-{uuid.uuid4().hex[:8]}"
    unhealthy_after = 3.0
    with AerospikeTestServer(namespaces=["test"]) as server:
        settings = service_settings(
            bootstrap,
            topics,
            training_file,
            f"aerospike://{server.url_host}/test/neighbours",
            tmp_path / "snap",
            group,
            store={"timeout_ms": 500, "retry_backoff_max_s": 1.0},
            service={
                "metrics_port": free_port(),
                "store_unhealthy_after_s": unhealthy_after,
                "verify_every_s": 0.5,
                "shutdown_timeout_s": 5.0,
            },
        )
        feed = Feed(bootstrap, topics)
        service = RefresherService.from_config(to_config(settings))
        assert service.metrics_server is not None
        url = service.metrics_server.url
        stop = threading.Event()
        loop = threading.Thread(target=service.run, args=(stop,), name="service-under-test")
        loop.start()
        try:
            for b in work.steps[:split]:
                feed.send(b)
            feed.flush()
            deadline = time.monotonic() + 90
            while _get(url + "/status")[1]["counters"]["records_written"] == 0:
                assert time.monotonic() < deadline, "nothing stored before the outage"
                time.sleep(0.2)
            assert _get(url + "/healthz")[0] == 200

            server.stop()
            down_at = time.monotonic()
            for b in work.steps[split:]:
                feed.send(b)
            feed.flush()
            seen: list[tuple[float, int, dict[str, Any], dict[str, Any], int]] = []
            slowest = 0.0
            while time.monotonic() - down_at < unhealthy_after + 4:
                _, status, t_status = _get(url + "/status")
                code, health, t_health = _get(url + "/healthz")
                live, _, t_live = _get(url + "/livez")
                slowest = max(slowest, t_status, t_health, t_live)
                seen.append((time.monotonic() - down_at, code, health, status, live))
                time.sleep(0.2)
            assert loop.is_alive(), "the service exited during the outage"
            assert slowest < 1.0, f"an endpoint took {slowest:.2f}s to answer"
            assert all(live == 200 for *_, live in seen)
            down = [s for s in seen if not s[3]["store"]["accepting_writes"]]
            assert down, "/status never showed the store down"
            _, _, _, status, _ = down[-1]
            assert status["store"]["down_since"] is not None and status["store"]["last_error"]
            assert status["checkpoint"]["waiting_for"] == "store"
            late = [s for s in seen if s[0] > unhealthy_after + 2.5]
            assert late and all(code == 503 for _, code, *_ in late)
            assert all("store not accepting writes" in h["reason"] for _, _, h, *_ in late)

            server.start()
            deadline = time.monotonic() + 90
            while True:
                code, health, _ = _get(url + "/healthz")
                if code == 200 and health["store"]["accepting_writes"]:
                    break
                assert time.monotonic() < deadline, f"still unhealthy: {health}"
                time.sleep(0.2)
            while committed_offsets(bootstrap, topics.engagements, group) != feed.engagement_ends:
                assert time.monotonic() < deadline, "not everything committed after the outage"
                time.sleep(0.5)
        finally:
            stop.set()
            loop.join(60)


def _stale_lists(query_ids: np.ndarray) -> NeighbourLists:
    n, width = len(query_ids), K + MARGIN
    return NeighbourLists(
        query_ids=query_ids.astype(np.int64),
        ids=np.arange(n * width, dtype=np.int64).reshape(n, width),
        scores=np.linspace(1, 0, n * width, dtype=np.float32).reshape(n, width),
        versions=np.ones(n, dtype=np.int64),
        computed_at_ms=np.zeros(n, dtype=np.int64),
        k=K,
    )


def test_a_wiped_or_rolled_back_store_is_rewritten_without_new_events(
    bootstrap: str, topics: Topics, training_file: Path, training: np.ndarray, tmp_path: Path
) -> None:
    """Issue 12: an Aerospike namespace in memory loses everything on restart; the refresher
    rewrites only lists whose top K changes, so without the verifier they never came back."""
    work = workload(seed=23)
    group = f"wiped-{uuid.uuid4().hex[:8]}"
    with AerospikeTestServer(namespaces=["test"]) as server:
        store_url = f"aerospike://{server.url_host}/test/neighbours"
        settings = service_settings(
            bootstrap,
            topics,
            training_file,
            store_url,
            tmp_path / "snap",
            group,
            service={"verify_every_s": 1.0, "verify_sample": 40},
        )
        feed = Feed(bootstrap, topics)
        service = RefresherService.from_config(to_config(settings))
        oracle = build_oracle(training, work.live)
        try:
            for b in work.steps:
                feed.send(b)
            feed.flush()
            step_until([service], lambda: _done(service, feed, bootstrap, group), "everything")
            assert server.record_count() == len(work.heads)
            assert problems(service.store, work, oracle) == []
            assert service.stats.rewrites == 0

            server.clear()  # the in-memory namespace after a server restart
            other = open_store(store_url, StoreConfig(url=store_url))
            try:  # and a few lists from an old backup, older than what the service stored
                other.upsert(_stale_lists(work.heads[::3]))
            finally:
                other.close()
            step_until(
                [service],
                lambda: (
                    server.record_count() == len(work.heads)
                    and not problems(service.store, work, oracle)
                ),
                "every lost list rewritten",
                guard_s=60.0,
            )
            assert service.stats.rewrites == len(work.heads)
            assert service.stats.engagement_events == feed.messages[topics.engagements]
        finally:
            service.shutdown()
