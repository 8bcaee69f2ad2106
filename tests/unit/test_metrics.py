"""Metrics registry, the HTTP endpoints on a free loopback port, and consumer lag on the broker."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from annstream.metrics import ConsumerLag, MetricsServer, ServiceMetrics, consumer_lag

NAMES = {
    "annstream_consumer_lag",
    "annstream_micro_batch_seconds",
    "annstream_freshness_seconds",
    "annstream_index_ads",
    "annstream_index_imbalance",
    "annstream_index_memory_bytes",
    "annstream_index_version",
    "annstream_head_queries",
    "annstream_upserts",
    "annstream_deletes",
    "annstream_records_written",
    "annstream_store_errors",
    "annstream_dead_letters",
    "annstream_snapshot_age_seconds",
    "annstream_recall_at_k",
}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


@pytest.fixture
def observed() -> tuple[ServiceMetrics, Clock]:
    clock = Clock()
    m = ServiceMetrics(clock=clock)
    m.heartbeat()
    m.observe_consumed(ad_events=120, engagement_events=30)
    m.observe_batch(0.2, upserts=100, deletes=4)
    m.observe_stored(np.array([0.03, 0.3, 0.3, 2.0, 400.0]), records=7)
    m.observe_dead_letters(2)
    m.observe_index(ads=5_000, imbalance=1.25, memory_bytes=1 << 20, version=3)
    m.observe_head_queries(42)
    m.observe_lag("ads", {0: 5, 1: 0})
    m.observe_lag("engagements", {2: 11})
    m.observe_recall(0.93, k=10)
    m.observe_snapshot(at=clock.now - 12.5)
    return m, clock


def test_metrics_registry_holds_every_metric_with_values(
    observed: tuple[ServiceMetrics, Clock],
) -> None:
    m, _ = observed
    text = m.render().decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert names >= NAMES
    s = _samples(text)
    assert s[("annstream_upserts_total", ())] == 100
    assert s[("annstream_consumer_lag", (("partition", "0"), ("topic", "ads")))] == 5
    assert s[("annstream_consumer_lag", (("partition", "2"), ("topic", "engagements")))] == 11
    assert s[("annstream_snapshot_age_seconds", ())] == 12.5
    assert s[("annstream_recall_at_k", ())] == 0.93
    assert s[("annstream_freshness_seconds_count", ())] == 5
    assert s[("annstream_freshness_seconds_bucket", (("le", "0.05"),))] == 1
    assert s[("annstream_freshness_seconds_bucket", (("le", "0.5"),))] == 3
    assert s[("annstream_freshness_seconds_bucket", (("le", "300.0"),))] == 4
    assert s[("annstream_freshness_seconds_bucket", (("le", "+Inf"),))] == 5
    assert s[("annstream_freshness_seconds_sum", ())] == pytest.approx(402.63)
    m.observe_lag("ads", {1: 3})
    s = _samples(m.render().decode())
    assert ("annstream_consumer_lag", (("partition", "0"), ("topic", "ads"))) not in s


def test_one_counter_source_for_metrics_and_status() -> None:
    """Issue 15 item 12: every counter is kept once; /metrics and /status show the same
    numbers, with the reason labels and the running totals of the publishers."""
    m = ServiceMetrics()
    m.observe_consumed(ad_events=10, engagement_events=4)
    m.observe_batch(0.2, upserts=3)
    m.observe_store_error("timeout", reason="write")
    m.observe_store_error("2 of 9 neighbour lists not stored", reason="rows")
    m.track_dead_letters({"non_finite": 2, "not_avro": 1}, failed=1, references=0, replayed=5)
    m.track_dead_letters({"non_finite": 1}, failed=0, references=0, replayed=5)  # never back
    m.track_results(records=7, tombstones=2, too_large=0)
    m.observe_rebalance("assigned", 3)
    m.observe_rebalance("revoked", 1)
    m.observe_store_write(0.004)
    s = _samples(m.render().decode())
    doc = m.status()
    assert s[("annstream_dead_letters_total", (("reason", "non_finite"),))] == 2
    assert s[("annstream_dead_letters_total", (("reason", "not_avro"),))] == 1
    assert s[("annstream_store_errors_total", (("reason", "rows"),))] == 1
    assert s[("annstream_results_published_total", (("kind", "tombstone"),))] == 2
    assert s[("annstream_rebalance_partitions_total", (("kind", "assigned"),))] == 3
    assert s[("annstream_dead_letters_replayed_total", ())] == 5
    assert s[("annstream_store_write_seconds_count", ())] == 1
    for name, value in doc["counters"].items():
        series = [v for (n, _), v in s.items() if n == f"annstream_{name}_total"]
        assert sum(series) == value, name
    assert doc["counters"]["dead_letters"] == 3 and doc["counters"]["micro_batches"] == 1
    assert doc["by_reason"]["store_errors"] == {"write": 1, "rows": 1}
    assert m.value("dead_letters", reason="not_avro") == 1
    with pytest.raises(ValueError, match="takes the labels"):
        m.counters.inc("dead_letters", 1)


def test_process_and_build_metrics_are_on_the_private_registry() -> None:
    from annstream import __version__

    s = _samples(ServiceMetrics().render().decode())
    assert s[("process_resident_memory_bytes", ())] > 10_000_000
    info = [labels for (name, labels), _ in s.items() if name == "annstream_build_info"]
    assert len(info) == 1
    labels = dict(info[0])
    assert labels["version"] == __version__ and labels["librdkafka"].count(".") >= 2
    assert {"python", "faiss", "confluent_kafka"} <= set(labels)


def test_freshness_since_a_mark_and_over_the_window() -> None:
    m = ServiceMetrics()
    m.observe_stored([1.0, 2.0, 3.0], records=1)
    mark = m.freshness_mark()
    assert mark == 3
    m.observe_stored([10.0, 20.0], records=1)
    values, mark2 = m.freshness_since(mark)
    assert values.tolist() == [10.0, 20.0] and mark2 == 5
    assert m.freshness(since=mark)["p50"] == pytest.approx(15.0)
    assert m.freshness()["window"] == 5 and m.freshness()["p50"] == 3.0
    assert m.freshness(since=m.freshness_mark()) == {"p50": None, "p99": None, "window": 0}


def test_metrics_registries_are_independent() -> None:
    a, b = ServiceMetrics(), ServiceMetrics()
    a.observe_batch(0.1, upserts=5)
    assert _samples(b.render().decode())[("annstream_upserts_total", ())] == 0
    with pytest.raises(ValueError, match="pass the increment"):
        a.observe_dead_letters(-1)


@pytest.fixture
def server(observed: tuple[ServiceMetrics, Clock]) -> Iterator[tuple[MetricsServer, Clock]]:
    m, clock = observed
    health = lambda: m.health(stale_after_s=30, store_unhealthy_after_s=20)  # noqa: E731
    with MetricsServer(0, m, health=health) as srv:
        yield srv, clock


def test_server_serves_metrics_text(server: tuple[MetricsServer, Clock]) -> None:
    srv, _ = server
    assert srv.port > 0
    code, ctype, body = _get(f"{srv.url}/metrics")
    assert code == 200 and ctype.startswith("text/plain")
    assert {f.name for f in text_string_to_metric_families(body.decode())} >= NAMES
    assert _get(f"{srv.url}/nope")[0] == 404


def test_server_healthz_turns_503_when_stale_or_store_fails(
    server: tuple[MetricsServer, Clock],
) -> None:
    srv, clock = server
    code, ctype, body = _get(f"{srv.url}/healthz")
    assert (code, ctype) == (200, "application/json") and json.loads(body)["healthy"] is True
    clock.now += 31
    code, _, body = _get(f"{srv.url}/healthz")
    assert code == 503 and json.loads(body)["last_step_age_s"] == 31
    srv.metrics.heartbeat()
    assert _get(f"{srv.url}/livez")[0] == 200
    srv.metrics.observe_store_error("Aerospike 127.0.0.1:3000: connection refused")
    code, _, body = _get(f"{srv.url}/healthz")
    doc = json.loads(body)
    assert code == 200 and doc["store_ok"] is False  # down, within the grace period
    assert doc["store"]["accepting_writes"] is False and "refused" in doc["store"]["last_error"]
    clock.now += 29
    srv.metrics.heartbeat()
    code, _, body = _get(f"{srv.url}/healthz")
    doc = json.loads(body)
    assert code == 503 and doc["reason"].startswith("store not accepting writes for 29s")
    assert "connection refused" in doc["reason"]
    assert _get(f"{srv.url}/livez")[0] == 200  # a restart would not bring the store back
    status = json.loads(_get(f"{srv.url}/status")[2])
    assert status["store"]["down_s"] == 29 and status["store"]["accepting_writes"] is False
    srv.metrics.observe_stored([], records=0)
    code, _, body = _get(f"{srv.url}/healthz")
    assert code == 200 and json.loads(body)["store"]["accepting_writes"] is True


def test_server_status_document(server: tuple[MetricsServer, Clock]) -> None:
    srv, _ = server
    code, _, body = _get(f"{srv.url}/status")
    doc = json.loads(body)
    assert code == 200
    assert doc["lag"] == {
        "total": 16,
        "partitions": {"ads": {"0": 5, "1": 0}, "engagements": {"2": 11}},
    }
    assert doc["freshness_s"]["p50"] == pytest.approx(0.3)
    assert doc["freshness_s"]["p99"] == pytest.approx(
        np.percentile([0.03, 0.3, 0.3, 2.0, 400.0], 99)
    )
    assert doc["recall"]["value"] == 0.93 and doc["recall"]["k"] == 10
    assert doc["index"] == {"ads": 5_000, "imbalance": 1.25, "memory_bytes": 1 << 20, "version": 3}
    assert doc["head_queries"] == 42 and doc["micro_batches"] == 1
    assert doc["counters"]["dead_letters"] == 2 and doc["counters"]["upserts"] == 100
    assert doc["snapshot_age_s"] == 12.5


def test_server_status_of_a_fresh_service_is_valid_json() -> None:
    with MetricsServer(0, ServiceMetrics()) as srv:
        code, _, body = _get(f"{srv.url}/status")
        doc = json.loads(body)
        assert code == 200 and doc["recall"]["value"] is None and doc["snapshot_age_s"] is None
        assert _get(f"{srv.url}/healthz")[0] == 503  # no loop step seen yet


def test_server_stop_frees_the_port() -> None:
    srv = MetricsServer(0, ServiceMetrics()).start()
    port = srv.port
    srv.stop()
    again = MetricsServer(port, ServiceMetrics())
    again.stop()


def test_consumer_lag_uses_cached_watermarks(
    bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    topic = topic_factory("lag", partitions=2)
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(300):
        producer.produce(topic, value=b"x", partition=0 if i < 200 else 1)
    producer.flush(10)
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": "lag-test",
        "enable.auto.commit": False,
        "fetch.wait.max.ms": 50,
    }
    consumer = Consumer(conf)
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in (0, 1)])
        assert consumer_lag(consumer, topic, [0, 1]) == {}  # nothing fetched: unknown
        got = 0
        deadline = time.monotonic() + 30
        while got < 300 and time.monotonic() < deadline:
            got += len(consumer.consume(300, 0.5))
        assert got == 300
        assert consumer_lag(consumer, topic, [0, 1], {0: 50, 1: 40}) == {0: 150, 1: 60}
        assert consumer_lag(consumer, topic, [0, 1], {0: 50}) == {0: 150, 1: 0}
        assert consumer_lag(consumer, topic, [0, 1]) == {0: 0, 1: 0}
    finally:
        consumer.close()


def test_consumer_lag_of_a_quiet_partition_after_a_restart_is_from_its_committed_offset(
    bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    """Issue 15 item 2: a restarted member had no fetch position on a quiet partition and
    reported its whole history (high - low) as lag although its committed offset was the end."""
    topic = topic_factory("quiet", partitions=2)
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(300):
        producer.produce(topic, value=b"x", partition=0 if i < 200 else 1)
    producer.flush(10)
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": f"quiet-{topic}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": 50,
    }
    first = Consumer(conf)
    first.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in (0, 1)])
    got, deadline = 0, time.monotonic() + 30
    while got < 300 and time.monotonic() < deadline:
        got += len(first.consume(300, 0.5))
    assert got == 300
    first.commit(offsets=[TopicPartition(topic, 0, 200), TopicPartition(topic, 1, 60)])
    # partition 1 gets its last 40 records again after the restart (a fetch position); 0 none
    first.close()

    restarted = Consumer(conf)  # resumes from the committed offsets; nothing new arrives
    try:
        restarted.assign([TopicPartition(topic, p) for p in (0, 1)])
        deadline = time.monotonic() + 30
        watermarks: list[int] = []
        while time.monotonic() < deadline:
            polled = restarted.consume(100, 0.2)
            watermarks = [
                restarted.get_watermark_offsets(TopicPartition(topic, p), cached=True)[1]
                for p in (0, 1)
            ]
            if min(watermarks) >= 0 and len(polled) == 0:
                break
        assert watermarks == [200, 100]
        positions = restarted.position([TopicPartition(topic, p) for p in (0, 1)])
        assert positions[0].offset < 0  # the quiet partition: no position
        lag = ConsumerLag(restarted, topic)
        assert lag([0, 1]) == {0: 0, 1: 0}
        assert lag([0, 1], {0: 150}) == {0: 50, 1: 0}
        assert lag([1], {1: 90}) == {1: 10}  # partition 0 given up: its lookup is forgotten
        assert consumer_lag(restarted, topic, [0, 1]) == {0: 0, 1: 0}
    finally:
        restarted.close()


def test_status_command_prints_the_document(
    server: tuple[MetricsServer, Clock], capsys: pytest.CaptureFixture[str]
) -> None:
    from annstream.cli import main

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        srv, _ = server
        assert main(["status", "--url", srv.url, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["lag"]["total"] == 16
        assert main(["status", "--url", srv.url]) == 0
        table = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
        assert table["lag.partitions.ads.0"] == "5" and table["recall.value"] == "0.93"
        assert table["freshness_s.p99"] != "-"
        srv.metrics.observe_training({"state": "waiting", "message": "training: 12,000 of ..."})
        srv.metrics.observe_tuning(0.95, 48, 256, ["index.nlist = 1024 is far", "index.nprobe"])
        assert main(["status", "--url", srv.url]) == 0
        table = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
        assert table["training.message"] == "training: 12,000 of ..."
        assert table["tuning.recall_target"] == "0.95" and table["tuning.nprobe"] == "48"
        assert table["tuning.fit_warnings.0"] == "index.nlist = 1024 is far"
        srv.stop()
        assert main(["status", "--url", srv.url, "--timeout", "2"]) == 2
        assert "cannot reach" in capsys.readouterr().err
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
