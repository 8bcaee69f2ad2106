"""Prometheus metrics, /healthz and /status of the refresher service.

`ServiceMetrics` owns a dedicated `CollectorRegistry` (never the global one, so several services
can live in one process, as in tests) and takes plain numbers and arrays: it knows nothing of
the service. The owner thread calls its `observe_*` methods; `MetricsServer` serves them from a
daemon thread (prometheus_client metrics are thread-safe; the rest is guarded by a lock).

Consumer lag is the cached high watermark minus the position (`ConsumerLag`: what was
processed, else the fetch position, else the committed offset). The cached watermark is the
one the last fetch response carried (librdkafka keeps it per partition, no extra request), so
it lags the true end by at most one fetch; it is unknown (-1001) until the first fetch of a
partition, and such partitions are left out. Broker-queried end offsets
(`get_watermark_offsets(cached=False)`) are not used: the embedded Tansu broker answers them
wrongly.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import numpy.typing as npt
from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "BATCH_BUCKETS_S",
    "CONTENT_TYPE",
    "ConsumerLag",
    "FRESHNESS_BUCKETS_S",
    "MetricsServer",
    "ServiceMetrics",
    "consumer_lag",
]

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FRESHNESS_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
BATCH_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_WINDOW = 10_000
_COUNTERS = (
    "ad_events",
    "engagement_events",
    "upserts",
    "deletes",
    "records_written",
    "store_errors",
    "dead_letters",
    "snapshots",
)
_UNKNOWN_OFFSET = -1001


class ConsumerLag:
    """partition -> messages behind the cached high watermark, for one consumer of `topic`
    (partitions not yet fetched are left out).

    The position of a partition is, in this order: what the caller processed (`positions`,
    partition -> next offset), the consumer's fetch position (ahead of processing by what
    librdkafka has buffered), the group's committed offset, the low watermark. After a
    restart or rebalance a quiet partition has no fetch position until a message arrives;
    its committed offset (looked up once per assignment, not per call) is where it resumes,
    so a caught-up partition reads 0, not its whole retained history. A failed lookup leaves
    the partition out for `retry_s` rather than report a lag it does not have.
    """

    def __init__(
        self,
        consumer: Consumer,
        topic: str,
        timeout_s: float = 2.0,
        retry_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.consumer = consumer
        self.topic = topic
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._clock = clock
        self._committed: dict[int, int] = {}
        self._retry_at = 0.0

    def _lookup_committed(self, partitions: list[int]) -> bool:
        """Fill the committed offsets of `partitions`; False when the broker did not answer."""
        if self._clock() < self._retry_at:
            return False
        try:
            tps = self.consumer.committed(
                [TopicPartition(self.topic, p) for p in partitions], self.timeout_s
            )
        except KafkaException as exc:
            self._retry_at = self._clock() + self.retry_s
            logger.debug("committed offsets of %s not read for its lag: %s", self.topic, exc)
            return False
        for tp in tps:
            if tp.error is None:
                self._committed[int(tp.partition)] = int(tp.offset)
        return True

    def __call__(
        self, partitions: Iterable[int], positions: Mapping[int, int] | None = None
    ) -> dict[int, int]:
        parts = sorted(int(p) for p in partitions)
        for p in set(self._committed) - set(parts):  # given up: looked up again if regained
            del self._committed[p]
        known = {p: int(o) for p, o in (positions or {}).items() if int(o) >= 0}
        ask = [p for p in parts if p not in known]
        if ask:
            fetched = self.consumer.position([TopicPartition(self.topic, p) for p in ask])
            known.update({int(tp.partition): int(tp.offset) for tp in fetched if tp.offset >= 0})
        unknown = [p for p in parts if p not in known and p not in self._committed]
        answered = not unknown or self._lookup_committed(unknown)
        out: dict[int, int] = {}
        for p in parts:
            low, high = self.consumer.get_watermark_offsets(
                TopicPartition(self.topic, p), cached=True
            )
            if high < 0:
                continue
            pos = known.get(p, self._committed.get(p, _UNKNOWN_OFFSET))
            if pos < 0:
                if p in unknown and not answered:
                    continue
                pos = max(int(low), 0)
            out[p] = max(int(high) - pos, 0)
        return out


def consumer_lag(
    consumer: Consumer,
    topic: str,
    partitions: Iterable[int],
    positions: Mapping[int, int] | None = None,
) -> dict[int, int]:
    """One `ConsumerLag` reading (no lookups kept between calls)."""
    return ConsumerLag(consumer, topic)(partitions, positions)


class _ArrayHistogram(Collector):
    """A Prometheus histogram observed a whole array at a time (no per-value Python loop)."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = np.asarray(buckets, dtype="float64")
        self._counts = np.zeros(self.bounds.size + 1, dtype="int64")
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, values: npt.ArrayLike) -> None:
        v = np.asarray(values, dtype="float64").reshape(-1)
        v = v[np.isfinite(v)]
        if v.size == 0:
            return
        slot = np.searchsorted(self.bounds, v, side="left")
        counts = np.bincount(slot, minlength=self._counts.size)
        with self._lock:
            self._counts += counts
            self._sum += float(v.sum())

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        labels = [repr(float(b)) for b in self.bounds.tolist()] + ["+Inf"]
        family = HistogramMetricFamily(
            self.name,
            self.documentation,
            buckets=list(zip(labels, cumulative, strict=True)),
            sum_value=total,
        )
        yield family


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class ServiceMetrics:
    """Every metric of one service, on its own registry, plus the state /status reports."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._started = clock()
        self._last_step: float | None = None
        self._last_snapshot: float | None = None
        self._store_down_since: float | None = None
        self._store_error = ""
        self._checkpoint: dict[str, Any] = {"waiting_for": None}
        self._recall = math.nan
        self._recall_k = 0
        self._recall_at: float | None = None
        self._index: dict[str, float] = {}
        self._head_queries = 0
        self._micro_batches = 0
        self._lag: dict[str, dict[int, int]] = {}
        self._totals: dict[str, float] = dict.fromkeys(_COUNTERS, 0)
        self._fresh = np.full(_WINDOW, np.nan, dtype="float64")
        self._fresh_next = 0
        r = self.registry

        self.lag = Gauge(
            "annstream_consumer_lag",
            "Messages behind the cached high watermark, per topic partition",
            ["topic", "partition"],
            registry=r,
        )
        self.batch_seconds = Histogram(
            "annstream_micro_batch_seconds",
            "Wall time of one micro-batch: apply, recompute, store, commit",
            buckets=BATCH_BUCKETS_S,
            registry=r,
        )
        self.freshness = _ArrayHistogram(
            "annstream_freshness_seconds",
            "Ad event time to its micro-batch being stored",
            FRESHNESS_BUCKETS_S,
        )
        r.register(self.freshness)
        self.index_ads = Gauge("annstream_index_ads", "Ads in the live index", registry=r)
        self.index_imbalance = Gauge(
            "annstream_index_imbalance",
            "Inverted-list imbalance factor (1.0 = even lists)",
            registry=r,
        )
        self.index_memory = Gauge(
            "annstream_index_memory_bytes", "Estimated bytes held by the live index", registry=r
        )
        self.index_version = Gauge(
            "annstream_index_version", "Version of the live index (+1 per retrain)", registry=r
        )
        self.head_queries = Gauge(
            "annstream_head_queries", "Head queries whose neighbour lists are kept", registry=r
        )
        self.ad_events = Counter(
            "annstream_ad_events", "Ad events consumed (valid and invalid)", registry=r
        )
        self.engagement_events = Counter(
            "annstream_engagement_events", "Engagement events consumed", registry=r
        )
        self.upserts = Counter(
            "annstream_upserts", "Ads inserted or replaced in the index", registry=r
        )
        self.deletes = Counter("annstream_deletes", "Ads deleted from the index", registry=r)
        self.records_written = Counter(
            "annstream_records_written", "Neighbour lists written to the store", registry=r
        )
        self.store_errors = Counter(
            "annstream_store_errors", "Micro-batch writes the store refused or missed", registry=r
        )
        self.store_refused = Counter(
            "annstream_store_refused",
            "Neighbour lists the store refused for good (not retried), by reason",
            ["reason"],
            registry=r,
        )
        self.store_rewrites = Counter(
            "annstream_store_rewrites",
            "Stored lists found missing or older than stored (wiped store), rewritten",
            registry=r,
        )
        self.store_accepting = Gauge(
            "annstream_store_accepting_writes",
            "1 while the store accepts writes, 0 while writes fail and are retried",
            registry=r,
        )
        self.store_accepting.set(1)
        self.dead_letters = Counter(
            "annstream_dead_letters", "Messages sent to the dead-letter topic", registry=r
        )
        self.snapshots = Counter("annstream_snapshots", "Index snapshots written", registry=r)
        self.snapshot_age = Gauge(
            "annstream_snapshot_age_seconds",
            "Seconds since the last snapshot was written (NaN before the first)",
            registry=r,
        )
        self.snapshot_age.set_function(self._snapshot_age)
        self.recall = Gauge(
            "annstream_recall_at_k",
            "Sampled recall@K of stored neighbour lists against an exact search",
            registry=r,
        )
        self.recall.set(math.nan)

    # ---- observations (owner thread) ---------------------------------------------------

    def _count(self, counter: Counter, name: str, n: float) -> None:
        if n < 0:
            raise ValueError(f"{name} must not be negative, got {n}: pass the increment")
        if n:
            counter.inc(n)
            with self._lock:
                self._totals[name] = self._totals.get(name, 0) + n

    def heartbeat(self) -> None:
        """The loop is alive: call once per step (feeds /healthz)."""
        self._last_step = self._clock()

    def observe_consumed(self, ad_events: int = 0, engagement_events: int = 0) -> None:
        self._count(self.ad_events, "ad_events", ad_events)
        self._count(self.engagement_events, "engagement_events", engagement_events)

    def observe_batch(self, duration_s: float, *, upserts: int = 0, deletes: int = 0) -> None:
        """One micro-batch computed: its wall time and the index changes it applied."""
        self.batch_seconds.observe(duration_s)
        self._count(self.upserts, "upserts", upserts)
        self._count(self.deletes, "deletes", deletes)
        with self._lock:
            self._micro_batches += 1

    def observe_stored(self, freshness_s: npt.ArrayLike, records: int) -> None:
        """A micro-batch reached the store: ad event -> stored delays (s), lists written."""
        v = np.asarray(freshness_s, dtype="float64").reshape(-1)
        self.freshness.observe(v)
        self._count(self.records_written, "records_written", records)
        self.observe_store_ok()
        with self._lock:
            tail = v[-_WINDOW:]
            idx = (self._fresh_next + np.arange(tail.size)) % _WINDOW
            self._fresh[idx] = tail
            self._fresh_next = int((self._fresh_next + tail.size) % _WINDOW)

    def observe_store_error(self, error: str = "", n: int = 1) -> None:
        """A store call failed (retried later): the store is not accepting writes."""
        self._count(self.store_errors, "store_errors", n)
        self.store_accepting.set(0)
        with self._lock:
            if self._store_down_since is None:
                self._store_down_since = self._clock()
            self._store_error = error or self._store_error or "unknown error"

    def observe_store_ok(self) -> None:
        """A store call succeeded: the store accepts writes again."""
        self.store_accepting.set(1)
        with self._lock:
            self._store_down_since = None

    def observe_refused(self, reasons: Mapping[str, int]) -> None:
        """Neighbour lists refused for good, counted per reason label."""
        for reason, n in reasons.items():
            self.store_refused.labels(reason).inc(n)

    def observe_rewrites(self, n: int) -> None:
        if n:
            self.store_rewrites.inc(n)

    def observe_checkpoint(
        self, waiting_for: str, failing_for_s: float | None, retry_in_s: float, error: str
    ) -> None:
        """Where the pending micro-batch is in store -> changelog -> commit ('' = none)."""
        since = None if failing_for_s is None else self._clock() - failing_for_s
        with self._lock:
            self._checkpoint = {
                "waiting_for": waiting_for or None,
                "failing_since": since,
                "retry_in_s": round(retry_in_s, 3) if waiting_for else None,
                "last_error": error if waiting_for else None,
            }

    def observe_dead_letters(self, n: int) -> None:
        self._count(self.dead_letters, "dead_letters", n)

    def observe_index(self, ads: int, imbalance: float, memory_bytes: int, version: int) -> None:
        self.index_ads.set(ads)
        self.index_imbalance.set(imbalance)
        self.index_memory.set(memory_bytes)
        self.index_version.set(version)
        with self._lock:
            self._index = {
                "ads": ads,
                "imbalance": imbalance,
                "memory_bytes": memory_bytes,
                "version": version,
            }

    def observe_head_queries(self, n: int) -> None:
        self.head_queries.set(n)
        with self._lock:
            self._head_queries = int(n)

    def observe_lag(self, topic: str, lags: Mapping[int, int]) -> None:
        """The lag of every partition of `topic` this process reads; others are dropped."""
        with self._lock:
            old = self._lag.get(topic, {})
            self._lag[topic] = {int(p): int(v) for p, v in lags.items()}
        for p in set(old) - set(lags):
            self.lag.remove(topic, str(p))
        for p, v in lags.items():
            self.lag.labels(topic, str(p)).set(v)

    def observe_snapshot(self, at: float | None = None) -> None:
        self._count(self.snapshots, "snapshots", 1)
        self._last_snapshot = self._clock() if at is None else at

    def observe_recall(self, recall: float, k: int) -> None:
        self.recall.set(recall)
        with self._lock:
            self._recall, self._recall_k, self._recall_at = float(recall), int(k), self._clock()

    # ---- reading (any thread) ----------------------------------------------------------

    def _snapshot_age(self) -> float:
        last = self._last_snapshot
        return math.nan if last is None else max(self._clock() - last, 0.0)

    def render(self) -> bytes:
        """The Prometheus text exposition of the registry."""
        return generate_latest(self.registry)

    def _store_state(self, now: float) -> dict[str, Any]:
        with self._lock:
            since, error = self._store_down_since, self._store_error
        return {
            "accepting_writes": since is None,
            "down_since": since,
            "down_s": None if since is None else round(now - since, 3),
            "last_error": error or None,
        }

    def liveness(self, stale_after_s: float = 60.0) -> dict[str, Any]:
        """Alive while the loop stepped within `stale_after_s` (a liveness probe: restarting
        a process whose store is down would not help, so the store is not part of it)."""
        age = None if self._last_step is None else self._clock() - self._last_step
        alive = age is not None and age <= stale_after_s
        reason = None if alive else f"no loop step for {age if age is None else round(age, 1)}s"
        return {"healthy": alive, "reason": reason, "last_step_age_s": age}

    def health(
        self, stale_after_s: float = 60.0, store_unhealthy_after_s: float = 30.0
    ) -> dict[str, Any]:
        """Healthy while the loop steps and the store has not refused writes for longer than
        `store_unhealthy_after_s` (a readiness probe and the alert)."""
        doc = self.liveness(stale_after_s)
        store = self._store_state(self._clock())
        reasons = [doc["reason"]] if doc["reason"] else []
        if store["down_s"] is not None and store["down_s"] > store_unhealthy_after_s:
            reasons.append(
                f"store not accepting writes for {store['down_s']:.0f}s: {store['last_error']}"
            )
        doc.update(
            healthy=not reasons,
            reason="; ".join(reasons) or None,
            store_ok=store["accepting_writes"],
            store=store,
        )
        return doc

    def status(self) -> dict[str, Any]:
        """The /status document: lag, freshness, recall, index, head queries, micro-batches."""
        with self._lock:
            fresh = self._fresh[np.isfinite(self._fresh)]
            lag = {t: {str(p): v for p, v in sorted(d.items())} for t, d in self._lag.items()}
            doc: dict[str, Any] = {
                "uptime_s": round(self._clock() - self._started, 3),
                "micro_batches": self._micro_batches,
                "head_queries": self._head_queries,
                "index": dict(self._index),
                "recall": {
                    "value": _finite(self._recall),
                    "k": self._recall_k,
                    "age_s": None if self._recall_at is None else self._clock() - self._recall_at,
                },
            }
        doc["lag"] = {"total": sum(sum(d.values()) for d in self._lag.values()), "partitions": lag}
        p50, p99 = np.percentile(fresh, [50, 99]).tolist() if fresh.size else [None, None]
        doc["freshness_s"] = {"p50": p50, "p99": p99, "window": int(fresh.size)}
        doc["snapshot_age_s"] = _finite(self._snapshot_age())
        doc["store"] = self._store_state(self._clock())
        with self._lock:
            doc["checkpoint"] = dict(self._checkpoint)
            doc["counters"] = dict(self._totals)
        return doc


def _clean(value: Any) -> Any:
    """NaN and inf become null: JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        return _clean(value.item())
    return value


def _json_bytes(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(_clean(doc), allow_nan=False, default=str).encode() + b"\n"


class MetricsServer:
    """GET /metrics, /healthz (readiness: 200 healthy, 503 with a reason), /livez (liveness)
    and /status from a daemon thread. Every route reads what the owner thread last observed
    and never waits for it, so they answer while the loop is stuck on a store or a broker.

    `port` 0 picks a free port (read `.port` after construction); `stop()` closes the socket.
    """

    def __init__(
        self,
        port: int,
        metrics: ServiceMetrics,
        health: Callable[[], Mapping[str, Any]] | None = None,
        status: Callable[[], Mapping[str, Any]] | None = None,
        host: str = "127.0.0.1",
        live: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"metrics port must be in 0..65535, got {port}")
        self.metrics = metrics
        self.health = health or metrics.health
        self.live = live or metrics.liveness
        self.status = status or metrics.status
        routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
            "/metrics": self._metrics,
            "/healthz": self._healthz,
            "/livez": self._livez,
            "/status": self._status,
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                if route is None:
                    code, ctype, body = 404, "text/plain", b"not found: try /metrics\n"
                else:
                    try:
                        code, ctype, body = route()
                    except Exception:
                        logger.exception("metrics endpoint %s failed", self.path)
                        code, ctype, body = 500, "text/plain", b"internal error\n"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("%s " + format, self.address_string(), *args)

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name=f"metrics-{self.port}", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _metrics(self) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE, self.metrics.render()

    def _healthz(self) -> tuple[int, str, bytes]:
        doc = self.health()
        return (200 if doc.get("healthy") else 503), "application/json", _json_bytes(doc)

    def _livez(self) -> tuple[int, str, bytes]:
        doc = self.live()
        return (200 if doc.get("healthy") else 503), "application/json", _json_bytes(doc)

    def _status(self) -> tuple[int, str, bytes]:
        return 200, "application/json", _json_bytes(self.status())

    def start(self) -> MetricsServer:
        self._thread.start()
        logger.info("metrics on %s/metrics", self.url)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(5)
        self._httpd.server_close()

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
