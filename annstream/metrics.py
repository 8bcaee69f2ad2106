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
from prometheus_client import (
    CollectorRegistry,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from annstream.kafka import DEAD_LETTER_REASONS

__all__ = [
    "BATCH_BUCKETS_S",
    "CONTENT_TYPE",
    "COUNTERS",
    "ConsumerLag",
    "FRESHNESS_BUCKETS_S",
    "MetricsServer",
    "ServiceMetrics",
    "build_labels",
    "consumer_lag",
]

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FRESHNESS_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
BATCH_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_WINDOW = 100_000
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


_REBALANCES = ("assigned", "revoked", "lost")
# name (without _total): (help, label names[, the label values exported from the start])
COUNTERS: dict[str, tuple[Any, ...]] = {
    "ad_events": ("Ad events consumed (valid and invalid)", ()),
    "engagement_events": ("Engagement events consumed (valid and invalid)", ()),
    "micro_batches": ("Micro-batches computed", ()),
    "upserts": ("Ads inserted or replaced in the index", ()),
    "deletes": ("Ads deleted from the index", ()),
    "records_written": ("Neighbour lists written to the store", ()),
    "store_errors": (
        "Store calls that failed and are retried, by what was asked: write (the store was "
        "unavailable), rows (some lists not stored), head_exits, verify, recall_sample",
        ("reason",),
        ("write", "rows", "head_exits", "verify", "recall_sample"),
    ),
    "store_refused": (
        "Neighbour lists the store refused for good (not retried), by reason",
        ("reason",),
    ),
    "store_rewrites": (
        "Stored lists found missing or older than stored (wiped store), rewritten",
        (),
    ),
    "dead_letters": (
        "Invalid events sent to the dead-letter topic, by reason (kafka.dead_letter_reason)",
        ("reason",),
        DEAD_LETTER_REASONS,
    ),
    "dead_letters_failed": ("Dead letters that could not be written (logged, not retried)", ()),
    "dead_letters_references": (
        "Dead letters sent without their value (the record was over the message limit)",
        (),
    ),
    "dead_letters_replayed": (
        "Invalid ad events read again after a replay and not dead-lettered again",
        (),
    ),
    "results_published": (
        "Records delivered to the results topic: list, tombstone, too_large (not sent)",
        ("kind",),
        ("list", "tombstone", "too_large"),
    ),
    "snapshots": ("Index snapshots written", ()),
    "rebalances": (
        "Engagement partition assignments changed: assigned, revoked, lost",
        ("kind",),
        _REBALANCES,
    ),
    "rebalance_partitions": (
        "Engagement partitions gained (assigned) or given up (revoked, lost)",
        ("kind",),
        _REBALANCES,
    ),
}
"""Every counter of the service: its one store is `_Counters`, which /metrics, /status and
the service's `stats` (the demo's summary) all read."""

Labels = tuple[str, ...]


class _Counters(Collector):
    """The counters' values, exported as Prometheus counters (`<name>_total`) and readable as
    numbers. `inc` adds; `track` follows a running total kept elsewhere (never backwards)."""

    def __init__(self, prefix: str, specs: Mapping[str, tuple[Any, ...]]) -> None:
        self.prefix = prefix
        self.specs = {name: (spec[0], tuple(spec[1])) for name, spec in specs.items()}
        self._values: dict[str, dict[Labels, float]] = {}
        for name, spec in specs.items():
            known = spec[2] if len(spec) > 2 else ()
            self._values[name] = {(value,): 0.0 for value in known} if spec[1] else {(): 0.0}
        self._lock = threading.Lock()

    def _key(self, name: str, labels: Mapping[str, str]) -> Labels:
        names = self.specs[name][1]
        if set(labels) != set(names):
            raise ValueError(f"counter {name} takes the labels {names}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in names)

    def inc(self, name: str, n: float = 1, **labels: str) -> None:
        if n < 0:
            raise ValueError(f"{name} must not be negative, got {n}: pass the increment")
        key = self._key(name, labels)
        if n:
            with self._lock:
                values = self._values[name]
                values[key] = values.get(key, 0.0) + n

    def track(self, name: str, total: float, **labels: str) -> None:
        key = self._key(name, labels)
        with self._lock:
            values = self._values[name]
            values[key] = max(values.get(key, 0.0), float(total))

    def value(self, name: str, **labels: str) -> float:
        """One series, or the sum over every series of `name` when no label is given."""
        with self._lock:
            values = self._values[name]
            if not labels:
                return float(sum(values.values()))
            return float(values.get(self._key(name, labels), 0.0))

    def totals(self) -> dict[str, float]:
        with self._lock:
            return {name: float(sum(v.values())) for name, v in self._values.items()}

    def by_label(self, name: str) -> dict[str, float]:
        """The series of `name` that counted something, by label value."""
        with self._lock:
            return {",".join(k): v for k, v in self._values[name].items() if v}

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            values = {name: dict(v) for name, v in self._values.items()}
        for name, (doc, labels) in self.specs.items():
            family = CounterMetricFamily(f"{self.prefix}{name}", doc, labels=list(labels))
            for key, v in sorted(values[name].items()):
                family.add_metric(list(key), v)
            yield family


def build_labels() -> dict[str, str]:
    """What `annstream_build_info` carries: the versions that decide the service's behaviour."""
    import platform

    import confluent_kafka

    try:
        from importlib import metadata

        version = metadata.version("annstream")
    except Exception:
        from annstream import __version__ as version
    try:
        import faiss

        faiss_version = str(faiss.__version__)
    except Exception:
        faiss_version = "unknown"
    return {
        "version": version,
        "python": platform.python_version(),
        "librdkafka": confluent_kafka.libversion()[0],
        "confluent_kafka": confluent_kafka.version()[0],
        "faiss": faiss_version,
    }


class ServiceMetrics:
    """Every metric of one service, on its own registry, plus the state /status reports.

    Counters live in one place (`COUNTERS`, read with `value`/`totals`); freshness samples in
    one window (`freshness`). The registry also carries prometheus_client's process metrics
    (`process_resident_memory_bytes`, CPU, open files) and `annstream_build_info`.
    """

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
        self.last_batch_s = 0.0
        self._lag: dict[str, dict[int, int]] = {}
        self._fresh = np.full(_WINDOW, np.nan, dtype="float64")
        self._fresh_seen = 0
        r = self.registry

        self.counters = _Counters("annstream_", COUNTERS)
        r.register(self.counters)
        ProcessCollector(registry=r)
        self.build_info = Info(
            "annstream_build", "Versions of annstream and its engines", registry=r
        )
        self.build_info.info(build_labels())
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
        self.store_write_seconds = Histogram(
            "annstream_store_write_seconds",
            "Wall time of one store write call (a micro-batch's lists, or what is left of them)",
            buckets=BATCH_BUCKETS_S,
            registry=r,
        )
        self.freshness_histogram = _ArrayHistogram(
            "annstream_freshness_seconds",
            "Ad event time to its micro-batch being stored",
            FRESHNESS_BUCKETS_S,
        )
        r.register(self.freshness_histogram)
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
        self.store_accepting = Gauge(
            "annstream_store_accepting_writes",
            "1 while the store accepts writes, 0 while writes fail and are retried",
            registry=r,
        )
        self.store_accepting.set(1)
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
        self.recall_warn_below = Gauge(
            "annstream_recall_warn_below",
            "The recall@K under which the service warns (service.recall_warn_below)",
            registry=r,
        )
        self.recall_warn_below.set(math.nan)
        self.recall_target = Gauge(
            "annstream_recall_target",
            "The recall@K the service moves nprobe to hold (index.recall_target; NaN: off)",
            registry=r,
        )
        self.recall_target.set(math.nan)
        self.nprobe = Gauge(
            "annstream_nprobe", "Lists probed per head query by the refresher", registry=r
        )
        self.nprobe.set(math.nan)
        self._training: dict[str, Any] = {}
        self._tuning: dict[str, Any] = {}

    # ---- observations (owner thread) ---------------------------------------------------

    def value(self, name: str, **labels: str) -> float:
        """A counter's value (summed over its labels unless some are given)."""
        return self.counters.value(name, **labels)

    def totals(self) -> dict[str, float]:
        return self.counters.totals()

    def heartbeat(self) -> None:
        """The loop is alive: call once per step (feeds /healthz)."""
        self._last_step = self._clock()

    def observe_consumed(self, ad_events: int = 0, engagement_events: int = 0) -> None:
        self.counters.inc("ad_events", ad_events)
        self.counters.inc("engagement_events", engagement_events)

    def observe_batch(self, duration_s: float, *, upserts: int = 0, deletes: int = 0) -> None:
        """One micro-batch computed: its wall time and the index changes it applied."""
        self.batch_seconds.observe(duration_s)
        self.last_batch_s = float(duration_s)
        self.counters.inc("micro_batches")
        self.counters.inc("upserts", upserts)
        self.counters.inc("deletes", deletes)

    def observe_stored(self, freshness_s: npt.ArrayLike, records: int) -> None:
        """A micro-batch reached the store: ad event -> stored delays (s), lists written."""
        v = np.asarray(freshness_s, dtype="float64").reshape(-1)
        self.freshness_histogram.observe(v)
        self.counters.inc("records_written", records)
        self.observe_store_ok()
        with self._lock:
            tail = v[-_WINDOW:]
            idx = (self._fresh_seen + np.arange(tail.size)) % _WINDOW
            self._fresh[idx] = tail
            self._fresh_seen += v.size

    def observe_store_write(self, seconds: float) -> None:
        self.store_write_seconds.observe(seconds)

    def observe_store_error(self, error: str = "", n: int = 1, reason: str = "write") -> None:
        """A store call failed (retried later): the store is not accepting writes."""
        self.counters.inc("store_errors", n, reason=reason)
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
            self.counters.inc("store_refused", n, reason=reason)

    def observe_rewrites(self, n: int) -> None:
        self.counters.inc("store_rewrites", n)

    def observe_checkpoint(
        self, waiting_for: str, failing_for_s: float | None, retry_in_s: float, error: str
    ) -> None:
        """Where the pending micro-batch is in store -> results -> changelog -> commit
        ('' = none)."""
        since = None if failing_for_s is None else self._clock() - failing_for_s
        with self._lock:
            self._checkpoint = {
                "waiting_for": waiting_for or None,
                "failing_since": since,
                "retry_in_s": round(retry_in_s, 3) if waiting_for else None,
                "last_error": error if waiting_for else None,
            }

    def observe_dead_letters(self, n: int, reason: str = "other") -> None:
        """`n` invalid events dead-lettered for `reason` (a bounded label)."""
        self.counters.inc("dead_letters", n, reason=reason)

    def track_dead_letters(
        self, reasons: Mapping[str, int], failed: int, references: int, replayed: int
    ) -> None:
        """The running totals of a dead-letter publisher (and of replayed records skipped)."""
        for reason, n in reasons.items():
            self.counters.track("dead_letters", n, reason=reason)
        self.counters.track("dead_letters_failed", failed)
        self.counters.track("dead_letters_references", references)
        self.counters.track("dead_letters_replayed", replayed)

    def track_results(self, records: int, tombstones: int, too_large: int) -> None:
        """The running totals of the results-topic publisher."""
        self.counters.track("results_published", records, kind="list")
        self.counters.track("results_published", tombstones, kind="tombstone")
        self.counters.track("results_published", too_large, kind="too_large")

    def observe_rebalance(self, kind: str, partitions: int) -> None:
        """Engagement partitions `assigned`, `revoked` or `lost`."""
        self.counters.inc("rebalances", kind=kind)
        self.counters.inc("rebalance_partitions", partitions, kind=kind)

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

    @property
    def head_query_count(self) -> int:
        return self._head_queries

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
        self.counters.inc("snapshots")
        self._last_snapshot = self._clock() if at is None else at

    def observe_recall_warn_below(self, warn_below: float) -> None:
        self.recall_warn_below.set(warn_below)

    def observe_training(self, state: Mapping[str, Any]) -> None:
        """What the first training waits for, or what it was trained on (/status `training`)."""
        with self._lock:
            self._training = dict(state)

    def observe_tuning(
        self, target: float | None, nprobe: int, nlist: int, warnings: list[str] | None = None
    ) -> None:
        """The recall target (None: off), the refresher's nprobe and nlist, and the fit
        warnings of the index (/status `tuning`; `warnings` None keeps the last ones)."""
        self.recall_target.set(math.nan if target is None else target)
        self.nprobe.set(nprobe)
        with self._lock:
            kept = self._tuning.get("fit_warnings", [])
            self._tuning = {
                "recall_target": target,
                "nprobe": int(nprobe),
                "nlist": int(nlist),
                "fit_warnings": list(kept if warnings is None else warnings),
            }

    def observe_recall(self, recall: float, k: int) -> None:
        self.recall.set(recall)
        with self._lock:
            self._recall, self._recall_k, self._recall_at = float(recall), int(k), self._clock()

    # ---- freshness -----------------------------------------------------------------------

    def freshness_mark(self) -> int:
        """How many freshness samples were observed so far: pass it to `freshness(since=)`."""
        with self._lock:
            return self._fresh_seen

    def freshness_since(self, mark: int) -> tuple[npt.NDArray[np.float64], int]:
        """(samples in seconds observed after `mark`, the new mark); at most the last
        `_WINDOW` of them (older ones have left the window)."""
        with self._lock:
            seen = self._fresh_seen
            n = min(seen - mark, _WINDOW, seen)
            idx = (seen - n + np.arange(max(n, 0))) % _WINDOW
            return self._fresh[idx].copy(), seen

    def freshness(self, since: int | None = None) -> dict[str, Any]:
        """p50 and p99 (seconds, None without samples) of the ad event -> stored delay over
        the window, or over what came after `since` (a `freshness_mark()`)."""
        if since is None:
            with self._lock:
                values = self._fresh[np.isfinite(self._fresh)]
        else:
            values, _ = self.freshness_since(since)
            values = values[np.isfinite(values)]
        if not values.size:
            return {"p50": None, "p99": None, "window": 0}
        p50, p99 = np.percentile(values, [50, 99]).tolist()
        return {"p50": p50, "p99": p99, "window": int(values.size)}

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
        """The /status document: lag, freshness, recall, index, head queries, micro-batches,
        every counter (the same numbers /metrics exports)."""
        totals = self.counters.totals()
        with self._lock:
            lag = {t: {str(p): v for p, v in sorted(d.items())} for t, d in self._lag.items()}
            doc: dict[str, Any] = {
                "uptime_s": round(self._clock() - self._started, 3),
                "micro_batches": int(totals["micro_batches"]),
                "head_queries": self._head_queries,
                "index": dict(self._index),
                "recall": {
                    "value": _finite(self._recall),
                    "k": self._recall_k,
                    "age_s": None if self._recall_at is None else self._clock() - self._recall_at,
                },
                "training": dict(self._training),
                "tuning": dict(self._tuning),
            }
        doc["lag"] = {"total": sum(sum(d.values()) for d in self._lag.values()), "partitions": lag}
        doc["freshness_s"] = self.freshness()
        doc["snapshot_age_s"] = _finite(self._snapshot_age())
        doc["store"] = self._store_state(self._clock())
        with self._lock:
            doc["checkpoint"] = dict(self._checkpoint)
        doc["counters"] = totals
        doc["by_reason"] = {
            name: self.counters.by_label(name)
            for name in ("dead_letters", "store_errors", "store_refused")
        }
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
