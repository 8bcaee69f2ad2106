"""The refresher service: one process wiring the ad consumer, the engagement consumer, the live
index, the head-query tracker, the incremental refresher and the store sink.

One thread owns the index and runs micro-batches: poll ads and engagements, then every T ms or
B events apply them, recompute the affected head queries, store the changed neighbour lists,
append the head-state changelog, and only then commit the engagement offsets. Ad offsets live
in index snapshots. A failed store write keeps the micro-batch pending, pauses consumption and
retries; nothing past unstored results is committed.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from annstream.ad_metadata import AdMetadata
from annstream.broker import create_topics
from annstream.codec import AdCodec, EngagementCodec
from annstream.config import Config
from annstream.drift import BackgroundRetrainer, DriftMonitor
from annstream.errors import BrokerError, StoreUnavailableError
from annstream.events import AdBatch, EngagementBatch
from annstream.heads import HeadQueryTracker
from annstream.index import LiveIvfIndex
from annstream.kafka import DeadLetterPublisher, client_logging, make_producer
from annstream.metrics import MetricsServer, ServiceMetrics, consumer_lag
from annstream.recall import RecallMonitor
from annstream.refresher import AdChanges, MicroBatcher, Refresher
from annstream.schemas import open_registry
from annstream.sink import NeighbourSink
from annstream.snapshot import SnapshotPolicy, load_latest_snapshot, write_snapshot
from annstream.store import open_store
from annstream.store.base import NeighbourStore
from annstream.store.record import NeighbourLists
from consumers.ads import AdStream, net_changes, net_rows
from consumers.engagements import EngagementStream
from consumers.head_state import TOPIC_CONFIG, HeadStateLog

__all__ = ["RefresherService", "ServiceStats", "snapshot_dir"]

logger = logging.getLogger(__name__)


@dataclass
class ServiceStats:
    """Counters of a running service (also the demo's summary and the metrics' source)."""

    ad_events: int = 0
    engagement_events: int = 0
    dead_letters: int = 0
    micro_batches: int = 0
    records_written: int = 0
    head_queries: int = 0
    store_failures: int = 0
    snapshots: int = 0
    last_batch_s: float = 0.0
    freshness_ms: list[float] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)

    def freshness(self) -> dict[str, float]:
        if not self.freshness_ms:
            return {"p50": float("nan"), "p99": float("nan")}
        a = np.asarray(self.freshness_ms)
        return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


@dataclass
class _Pending:
    """A computed micro-batch whose store write or commit has not succeeded yet."""

    lists: NeighbourLists
    exited: np.ndarray
    touched: np.ndarray
    engagement_offsets: dict[int, int]
    ad_event_time_ms: np.ndarray
    sink_done: bool = False
    head_state_queued: bool = False


def snapshot_dir(template: str) -> str:
    """`snapshot.dir` with `{hostname}` expanded, so replicas sharing a volume do not collide."""
    return template.replace("{hostname}", socket.gethostname())


class RefresherService:
    """The long-running refresher; `run()` until `stop` is set or `until(self)` is true."""

    def __init__(self, cfg: Config, store: NeighbourStore | None = None) -> None:
        self.cfg = cfg
        self.stats = ServiceStats()
        k = cfg.kafka
        create_topics(
            k.bootstrap_servers,
            [k.ad_topic, k.engagement_topic, k.dead_letter_topic],
            client=k.client,
        )
        self._ensure_head_state_topic()
        registry = open_registry(k.schema_registry_url, k.schema_registry_file)
        self.producer = make_producer(k)
        self.dead_letters = DeadLetterPublisher(self.producer, k.dead_letter_topic)
        self.store = store or open_store(cfg.store.url, cfg.store)
        self.sink = NeighbourSink(self.store, cfg.store)
        self.head_log = HeadStateLog(k, self.producer, self._partition_state)
        self.tracker = HeadQueryTracker(cfg.heads, cfg.index.dim, k.max_event_skew_s)
        self._query_partition: dict[int, int] = {}
        limit = k.max_message_bytes
        self._ad_codec = AdCodec(registry, cfg.index.dim, cfg.index.metric, limit)
        self._engagement_codec = EngagementCodec(registry, cfg.index.dim, cfg.index.metric, limit)

        self.snapshot_dir = snapshot_dir(cfg.snapshot.dir)
        snap = load_latest_snapshot(self.snapshot_dir, cfg.index)
        self.index: LiveIvfIndex | None = snap.index if snap else None
        offsets = {p: o for (t, p), o in snap.offsets.items() if t == k.ad_topic} if snap else {}
        self._version = int(snap.meta.get("version", 0)) if snap else 0
        self.ad_meta = AdMetadata.from_state(snap.arrays) if snap and snap.arrays else AdMetadata()
        if snap is not None and not snap.arrays and snap.index.ntotal:
            logger.warning(
                "snapshot %s has no ad metadata: campaign ids unknown until re-upserted", snap.path
            )
        self.ads = AdStream(k, self._ad_codec, self.dead_letters, offsets)
        self.engagements: EngagementStream | None = None
        self.refresher: Refresher | None = None
        self._training: list[AdBatch] = []
        self._ad_buf: list[AdBatch] = []
        self._eng_buf: list[tuple[EngagementBatch, np.ndarray]] = []
        self._eng_offsets: dict[int, int] = {}
        self._pending: _Pending | None = None
        self._retry_at = 0.0
        self._rebalanced = False
        self.batcher = MicroBatcher(cfg.refresh)
        self.snapshot_policy = SnapshotPolicy(cfg.snapshot)
        self.drift = DriftMonitor(cfg.drift, cfg.index.dim)
        self.retrainer = BackgroundRetrainer()
        self.metrics = ServiceMetrics()
        self.recall_monitor = RecallMonitor.from_config(cfg.service, k=cfg.refresh.k)
        self.metrics_server: MetricsServer | None = None
        if cfg.service.metrics_port > 0:
            self.metrics_server = MetricsServer(
                cfg.service.metrics_port,
                self.metrics,
                health=lambda: self.metrics.health(cfg.service.health_stale_s),
                status=self.metrics.status,
                host=cfg.service.metrics_host,
            ).start()
        if self.index is None and cfg.index.training_file:
            vectors = np.load(cfg.index.training_file)
            self.index = LiveIvfIndex.train(cfg.index, np.ascontiguousarray(vectors, "float32"))
        if self.index is not None:
            self._start_refreshing()

    # ---- start-up ----------------------------------------------------------------------

    def _ensure_head_state_topic(self) -> None:
        from confluent_kafka.admin import AdminClient

        k = self.cfg.kafka
        admin = AdminClient(
            {
                "bootstrap.servers": k.bootstrap_servers,
                "log_level": 3,
                **client_logging(),
                **k.client,
            }
        )
        meta = admin.list_topics(k.engagement_topic, timeout=10).topics[k.engagement_topic]
        create_topics(
            k.bootstrap_servers,
            [k.head_state_topic],
            partitions=max(1, len(meta.partitions)),
            client=k.client,
            config=TOPIC_CONFIG,
        )

    def _start_refreshing(self) -> None:
        assert self.index is not None
        self.refresher = Refresher(self.index, self.cfg.refresh)
        self.engagements = EngagementStream(
            self.cfg.kafka, self._engagement_codec, self.dead_letters, listener=self
        )
        logger.info(
            "refreshing: index of %d ads (version %d), joining group %s",
            self.index.ntotal,
            self.index.version,
            self.cfg.kafka.group_id,
        )

    def _train_from_buffer(self, force: bool = False) -> None:
        """Train the coarse quantizer on the first `index.train_size` ads, then index them."""
        ads = AdBatch.concat(self._training, self.cfg.index.dim)
        up, vectors, _ = net_changes(ads)
        if len(up) < self.cfg.index.train_size and not force:
            return
        if len(up) < self.cfg.index.nlist:
            logger.warning("only %d ads to train %d lists: waiting", len(up), self.cfg.index.nlist)
            return
        logger.info("training the index on the first %d ads", len(up))
        self.index = LiveIvfIndex.train(self.cfg.index, vectors)
        self._training = []
        self._ad_buf.append(ads)
        self._start_refreshing()

    # ---- rebalance (called by EngagementStream inside consume) -------------------------

    def partitions_assigned(self, partitions: list[int]) -> dict[int, int]:
        """Rebuild the head state of gained partitions; returns where to resume each one."""
        start: dict[int, int] = {}
        for p in partitions:
            states, applied = self.head_log.restore(p)
            for state in states:
                self.tracker.load_state(state)
                self._query_partition.update(dict.fromkeys(state["query_ids"].tolist(), p))
            if applied >= 0:
                start[p] = applied
        self._rebalanced = True
        return start

    def partitions_revoked(self, partitions: list[int], lost: bool) -> None:
        """Forget the head queries of partitions now owned elsewhere; uncommitted events of
        them are dropped from the buffer and will be re-read by the new owner."""
        gone = set(partitions)
        self._eng_buf = [
            (b.take(~np.isin(p, list(gone))), p[~np.isin(p, list(gone))]) for b, p in self._eng_buf
        ]
        for p in gone:
            self._eng_offsets.pop(p, None)
        queries = [q for q, p in self._query_partition.items() if p in gone]
        for q in queries:
            del self._query_partition[q]
        if queries:
            self.tracker.drop(np.asarray(queries, dtype="int64"))
        self._rebalanced = True

    # ---- the loop ----------------------------------------------------------------------

    def step(self, timeout_s: float = 0.05) -> None:
        """One poll of both topics, and a micro-batch when one is due."""
        self.metrics.heartbeat()
        if self._pending is not None:
            if time.monotonic() >= self._retry_at:
                self._finish_pending()
            else:
                self._keep_alive(timeout_s)
            return
        polled = self.ads.poll(self.cfg.refresh.batch_events, timeout_s)
        self.stats.ad_events += polled.messages
        self.stats.dead_letters += polled.rejected
        self.metrics.observe_consumed(ad_events=polled.messages)
        self.metrics.observe_dead_letters(polled.rejected)
        if self.index is None:
            if len(polled.batch):
                self._training.append(polled.batch)
                self._train_from_buffer()
            return
        if len(polled.batch):
            self._ad_buf.append(polled.batch)
        events = len(polled.batch)
        if self.engagements is not None:
            ep = self.engagements.poll(self.cfg.refresh.batch_events, 0 if events else timeout_s)
            self.stats.engagement_events += ep.messages
            self.stats.dead_letters += ep.rejected
            self.metrics.observe_consumed(engagement_events=ep.messages)
            self.metrics.observe_dead_letters(ep.rejected)
            if len(ep.batch):
                self._eng_buf.append((ep.batch, ep.partitions))
            self._eng_offsets.update(ep.offsets)
            events += ep.messages
        self.batcher.add(events)
        busy = self._ad_buf or self._eng_buf or self._eng_offsets or self._rebalanced
        if self.batcher.due() and (busy or self.retrainer.running or self.refresher_pending):
            self.micro_batch()
        elif self.batcher.due():
            self.batcher.reset()

    def _keep_alive(self, timeout_s: float) -> None:
        if self.engagements is not None:
            self.engagements.pause()
            self.engagements.consumer.consume(1, timeout_s)
        else:
            time.sleep(timeout_s)

    def _next_version(self) -> int:
        self._version = max(self._version + 1, int(time.time() * 1000))
        return self._version

    def micro_batch(self) -> None:
        """Apply what was polled, recompute affected head queries, store, commit."""
        assert self.index is not None and self.refresher is not None
        t0 = time.perf_counter()
        self._rebalanced = False
        self._swap_retrained_index()
        dim = self.cfg.index.dim
        ads = AdBatch.concat(self._ad_buf, dim)
        eng = EngagementBatch.concat([b for b, _ in self._eng_buf], dim)
        parts = np.concatenate([p for _, p in self._eng_buf] or [np.empty(0, "int32")])
        eng_offsets = dict(self._eng_offsets)
        self._ad_buf, self._eng_buf, self._eng_offsets = [], [], {}
        self.batcher.reset()
        if len(eng):
            self.tracker.observe(
                eng.query_ids, eng.weights, eng.event_time_ms, eng.vectors, eng.has_vector
            )
            self._query_partition.update(zip(eng.query_ids.tolist(), parts.tolist(), strict=True))
            self._prune_query_partitions()
        changes = self.tracker.changes()
        up_rows, del_rows = net_rows(ads)
        up_ids, del_ids = ads.ad_ids[up_rows], ads.ad_ids[del_rows]
        up_vecs = np.ascontiguousarray(ads.vectors[up_rows])
        self.ad_meta.remove(del_ids)
        self.ad_meta.update(up_ids, ads.advertiser_ids[up_rows], ads.campaign_ids[up_rows])
        version = self._next_version()
        result = self.refresher.apply(
            AdChanges(up_ids, up_vecs, del_ids), changes, self.tracker.vectors, version
        )
        n = len(result.query_ids)
        advertisers, campaigns = self.ad_meta.lookup(result.ids)
        lists = NeighbourLists(
            query_ids=result.query_ids,
            ids=result.ids,
            scores=result.scores,
            versions=np.full(n, version, dtype="int64"),
            computed_at_ms=np.full(n, int(time.time() * 1000), dtype="int64"),
            k=self.refresher.k,
            campaign_ids=campaigns,
            advertiser_ids=advertisers,
        )
        touched = np.union1d(np.unique(eng.query_ids), np.union1d(changes.entered, changes.exited))
        self._pending = _Pending(lists, changes.exited, touched, eng_offsets, ads.event_time_ms)
        self.snapshot_policy.record(len(ads))
        self.stats.micro_batches += 1
        self.stats.head_queries = len(self.refresher)
        self._finish_pending()
        self.stats.last_batch_s = time.perf_counter() - t0
        self.drift.observe(up_vecs)
        self._observe_batch(len(up_ids), len(del_ids))
        if self.drift.after_batch(self.index) is not None:
            self._maybe_retrain()

    def _finish_pending(self) -> None:
        p = self._pending
        assert p is not None
        if not p.sink_done:
            try:
                self.sink.write(p.lists)
                self.sink.head_exits(p.exited)
            except StoreUnavailableError as exc:
                self.stats.store_failures += 1
                self.metrics.observe_store_error()
                self._retry_at = time.monotonic() + exc.retry_after
                logger.warning("store unavailable, pausing for %.1fs: %s", exc.retry_after, exc)
                if self.engagements is not None:
                    self.engagements.pause()
                return
            p.sink_done = True
            stored_at = time.time() * 1000
            self.stats.records_written += len(p.lists)
            self.metrics.observe_stored((stored_at - p.ad_event_time_ms) / 1000.0, len(p.lists))
            if len(p.ad_event_time_ms):
                self.stats.freshness_ms.extend((stored_at - p.ad_event_time_ms).tolist())
                del self.stats.freshness_ms[:-100_000]
        try:
            if not p.head_state_queued:
                p.head_state_queued = True
                self._append_head_state(p)
            self.head_log.flush(self.cfg.service.flush_timeout_s)
        except BrokerError as exc:
            self._retry_at = time.monotonic() + 1.0
            logger.warning("head-state changelog not flushed, pausing: %s", exc)
            if self.engagements is not None:
                self.engagements.pause()
            return
        if self.engagements is not None:
            self.engagements.commit(p.engagement_offsets)
            self.engagements.resume()
        self._pending = None
        if self.refresher is not None and self.index is not None:
            recall = self.recall_monitor.after_batch(
                self.store, self.index, self.refresher.head_ids(), self.tracker.vectors
            )
            if recall is not None:
                self.metrics.observe_recall(recall, self.recall_monitor.k)
        if self.snapshot_policy.due():
            self.snapshot()

    def _append_head_state(self, p: _Pending) -> None:
        if not len(p.touched) and not p.engagement_offsets:
            return
        state = self.tracker.state(p.touched)
        owner = np.fromiter(
            (self._query_partition.get(q, -1) for q in state["query_ids"].tolist()),
            "int64",
            len(state["query_ids"]),
        )
        for partition in sorted(set(owner.tolist()) | set(p.engagement_offsets)):
            if partition < 0:
                continue
            rows = owner == partition
            self.head_log.append(
                partition,
                {k: v[rows] for k, v in state.items()},
                p.engagement_offsets.get(partition, -1),
            )

    def _partition_state(self, partition: int) -> dict[str, np.ndarray]:
        """Every tracked row of `partition`: what its head-state snapshot holds."""
        n = len(self._query_partition)
        queries = np.fromiter(self._query_partition.keys(), "int64", n)
        owners = np.fromiter(self._query_partition.values(), "int64", n)
        return self.tracker.state(queries[owners == partition])

    def snapshot(self) -> None:
        if self.index is None:
            return
        offsets = {(self.ads.topic, p): o for p, o in self.ads.offsets.items()}
        write_snapshot(
            self.snapshot_dir,
            self.index,
            offsets,
            {"version": self._version},
            keep=self.cfg.snapshot.keep,
            arrays=self.ad_meta.state(),
        )
        self.snapshot_policy.written()
        self.stats.snapshots += 1
        self.metrics.observe_snapshot()

    def run(
        self,
        stop: threading.Event | None = None,
        until: Callable[[RefresherService], bool] | None = None,
    ) -> ServiceStats:
        stop = stop or threading.Event()
        try:
            while not stop.is_set() and not (until is not None and until(self)):
                self.step()
        finally:
            self.shutdown()
        return self.stats

    def drain(self, max_wait_s: float = 30.0) -> None:
        """Finish the current micro-batch and any pending store write (bounded)."""
        deadline = time.monotonic() + max_wait_s
        if self.index is None and self._training:
            self._train_from_buffer(force=True)
        if (
            self.index is not None
            and self._pending is None
            and (self._ad_buf or self._eng_buf or self._eng_offsets)
        ):
            self.micro_batch()
        while self._pending is not None and time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, self._retry_at - time.monotonic())))
            self._finish_pending()

    def shutdown(self) -> None:
        """Finish the micro-batch, flush, snapshot, commit, close."""
        try:
            self.drain(self.cfg.service.shutdown_timeout_s)
            if self._pending is None:
                self.snapshot()
        finally:
            if self.metrics_server is not None:
                self.metrics_server.stop()
            if self.index is not None and self.retrainer.running:
                self.retrainer.cancel(self.index)
            self.dead_letters.flush()
            left = self.producer.flush(10)
            if left:
                logger.error("%d dead-letter or head-state records not delivered at shutdown", left)
                self.producer.purge()
            if self.engagements is not None:
                self.engagements.close()
            self.head_log.close()
            self.ads.close()
            self.producer.close()
            self.store.close()

    def _prune_query_partitions(self) -> None:
        """Forget the partition of queries the tracker evicted (amortised: only when the map
        has grown to twice the tracked set), so memory stays bounded by heads.max_tracked."""
        n = len(self._query_partition)
        tracked = self.tracker.tracked_ids()
        if n <= 2 * len(tracked) + 1024:
            return
        queries = np.fromiter(self._query_partition.keys(), "int64", n)
        partitions = np.fromiter(self._query_partition.values(), "int64", n)
        keep = np.isin(queries, tracked)
        self._query_partition = dict(
            zip(queries[keep].tolist(), partitions[keep].tolist(), strict=True)
        )

    @property
    def refresher_pending(self) -> bool:
        """Head queries still waiting for their full recompute after a retrain."""
        return self.refresher is not None and self.refresher.pending_full > 0

    def _observe_batch(self, upserts: int, deletes: int) -> None:
        m, index = self.metrics, self.index
        assert index is not None
        m.observe_batch(self.stats.last_batch_s, upserts=upserts, deletes=deletes)
        m.observe_index(index.ntotal, index.imbalance(), index.memory_bytes(), index.version)
        m.observe_head_queries(self.stats.head_queries)
        c = self.ads.consumer
        parts = [tp.partition for tp in c.assignment()]
        m.observe_lag(self.ads.topic, consumer_lag(c, self.ads.topic, parts, self.ads.offsets))
        if self.engagements is not None:
            e = self.engagements
            m.observe_lag(e.topic, consumer_lag(e.consumer, e.topic, sorted(e.assigned)))

    def _maybe_retrain(self) -> None:
        """Start a background retrain when the drift monitor says the quantizer went stale."""
        retrain, reason = self.drift.should_retrain()
        if not retrain or self.retrainer.running or self.index is None:
            return
        logger.warning("index drift: %s; retraining in the background", reason)
        self.retrainer.start(self.index, self.drift.reservoir.sample())

    def _swap_retrained_index(self) -> None:
        """Between micro-batches: swap in a finished retrain; every head query is recomputed."""
        if self.index is None or self.refresher is None:
            return
        new = self.retrainer.poll(self.index)
        if new is None:
            return
        logger.info("swapping in the retrained index (version %d)", new.version)
        self.index = new
        self.refresher.swap_index(new)
        self.drift.reset()

    @property
    def idle(self) -> bool:
        """Nothing buffered and nothing waiting for the store."""
        return self._pending is None and not (
            self._ad_buf or self._eng_buf or self._eng_offsets or self._training
        )

    def describe(self) -> dict[str, Any]:
        return {
            "ads_indexed": 0 if self.index is None else self.index.ntotal,
            "head_queries": 0 if self.refresher is None else len(self.refresher),
            "micro_batches": self.stats.micro_batches,
        }
