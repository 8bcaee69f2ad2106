"""The refresher service: one process wiring the ad consumer, the engagement consumer, the live
index, the head-query tracker, the incremental refresher and the store sink.

One thread owns the index and runs micro-batches: poll ads and engagements, then every T ms or
B events apply them, recompute the affected head queries and hand the changed neighbour lists
to the Checkpoint (annstream/checkpoint.py), which makes them durable in order per engagement
partition: store, head-state changelog, engagement offset commit. Ad offsets live in index
snapshots, written only when no micro-batch is pending. While a micro-batch is not durable
(store or broker down), consumption is paused, the loop keeps polling and retries after a
backoff; nothing past unstored results is committed. A verifier reads stored lists back and
rewrites those the store lost.

`RefresherService.from_config(cfg)` does the I/O (topics, store, snapshot, metrics server);
the constructor takes the collaborators, so tests can hand in their own (e.g. a store).
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from confluent_kafka import Consumer, Producer

from annstream.ad_metadata import AdMetadata
from annstream.checkpoint import Checkpoint, FlushReport
from annstream.codec import AdCodec, EngagementCodec
from annstream.config import Config
from annstream.drift import BackgroundRetrainer, DriftMonitor
from annstream.errors import StoreError
from annstream.events import AdBatch, EngagementBatch
from annstream.heads import HeadChanges, HeadQueryTracker
from annstream.heap import trim_heap
from annstream.index import LiveIvfIndex
from annstream.kafka import DeadLetterPublisher, make_producer
from annstream.metrics import ConsumerLag, MetricsServer, ServiceMetrics
from annstream.recall import RecallMonitor
from annstream.refresher import MicroBatcher, Refresher, RetiredLists
from annstream.results import ResultsPublisher
from annstream.schemas import open_registry
from annstream.sink import NeighbourSink, refusal_reason
from annstream.snapshot import SnapshotPolicy, load_latest_snapshot, write_snapshot
from annstream.store import open_store
from annstream.store.base import NeighbourStore
from annstream.store.record import NeighbourLists, UpsertResult
from annstream.topics import ensure_topics
from annstream.tuning import NprobeTuner, TrainingGate, fit_warnings
from annstream.verifier import StoreVerifier
from consumers.ads import AdStream
from consumers.engagements import EngagementStream, PartitionListener
from consumers.head_state import HeadStateLog

__all__ = ["RefresherService", "ServiceStats", "snapshot_dir"]

logger = logging.getLogger(__name__)

# Freed heap goes back to the OS this often (glibc keeps it otherwise: ~0.5 GB at 1M ads).
TRIM_EVERY_BATCHES = 200

JoinGroup = Callable[[PartitionListener], EngagementStream]
"""Creates the engagement consumer (joins the group) once the service can take partitions."""


class ServiceStats:
    """The counters of a running service, read from its metrics: the one place they are
    counted, which /metrics, /status and the demo's summary read too."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def _n(self, name: str) -> int:
        return int(self.metrics.value(name))

    @property
    def ad_events(self) -> int:
        return self._n("ad_events")

    @property
    def engagement_events(self) -> int:
        return self._n("engagement_events")

    @property
    def dead_letters(self) -> int:
        return self._n("dead_letters")

    @property
    def micro_batches(self) -> int:
        return self._n("micro_batches")

    @property
    def records_written(self) -> int:
        return self._n("records_written")

    @property
    def store_failures(self) -> int:
        return self._n("store_errors")

    @property
    def refused(self) -> int:
        return self._n("store_refused")

    @property
    def rewrites(self) -> int:
        return self._n("store_rewrites")

    @property
    def snapshots(self) -> int:
        return self._n("snapshots")

    @property
    def head_queries(self) -> int:
        return self.metrics.head_query_count

    @property
    def last_batch_s(self) -> float:
        return self.metrics.last_batch_s


class _TimedWriter:
    """The sink, with the wall time of each store write observed by the metrics."""

    def __init__(self, sink: NeighbourSink, metrics: ServiceMetrics) -> None:
        self.sink = sink
        self.metrics = metrics

    def write(
        self, lists: NeighbourLists, ttl_s: npt.NDArray[np.int64] | None = None
    ) -> UpsertResult:
        t0 = time.perf_counter()
        try:
            return self.sink.write(lists, ttl_s)
        finally:
            self.metrics.observe_store_write(time.perf_counter() - t0)

    def head_exits(self, query_ids: npt.NDArray[np.int64]) -> None:
        self.sink.head_exits(query_ids)


def _newest(retired: RetiredLists, restored: RetiredLists) -> RetiredLists:
    """The retired lists of a micro-batch: those the refresher rewrote, plus the restored
    ones it did not touch since they were loaded (its rows are newer)."""
    keep = ~np.isin(restored.query_ids, retired.query_ids)
    if not keep.any():
        return retired
    both = (retired, restored)
    return RetiredLists(
        *(
            np.concatenate(
                [getattr(r, name)[m] for r, m in zip(both, (slice(None), keep), strict=True)]
            )
            for name in ("query_ids", "ids", "scores", "ttl_s", "expires_at_ms")
        )
    )


def snapshot_dir(template: str) -> str:
    """`snapshot.dir` with `{hostname}` expanded, so replicas sharing a volume do not collide."""
    return template.replace("{hostname}", socket.gethostname())


def _store_reason(report: FlushReport) -> str:
    """The `reason` label of a failed store step: the whole call (write), some rows, exits."""
    error = report.store_error or ""
    if error.startswith("head exits"):
        return "head_exits"
    return "rows" if " neighbour lists not stored" in error else "write"


class RefresherService:
    """The long-running refresher; `run()` until `stop` is set or `until(self)` is true."""

    def __init__(
        self,
        cfg: Config,
        *,
        store: NeighbourStore,
        ads: AdStream,
        join_group: JoinGroup,
        head_log: HeadStateLog,
        producer: Producer,
        index: LiveIvfIndex | None = None,
        version: int = 0,
        ad_meta: AdMetadata | None = None,
        metrics: ServiceMetrics | None = None,
        metrics_server: MetricsServer | None = None,
        results: ResultsPublisher | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.ads = ads
        self.head_log = head_log
        self.producer = producer
        self.index = index
        self.ad_meta = ad_meta or AdMetadata()
        self.metrics = metrics or ServiceMetrics()
        self.stats = ServiceStats(self.metrics)
        self.metrics.observe_recall_warn_below(cfg.service.recall_warn_below)
        self.metrics_server = metrics_server
        self.snapshot_dir = snapshot_dir(cfg.snapshot.dir)
        self._join_group = join_group
        self._version = version
        self.sink = NeighbourSink(store, cfg.store)
        self.checkpoint = Checkpoint(
            _TimedWriter(self.sink, self.metrics),
            head_log,
            backoff_s=cfg.store.retry_backoff_s,
            backoff_max_s=cfg.store.retry_backoff_max_s,
            flush_timeout_s=cfg.service.flush_timeout_s,
            results=results,
            overlap=cfg.store.overlap_writes,
        )
        self.results = results
        self.tracker = HeadQueryTracker(cfg.heads, cfg.index.dim, cfg.kafka.max_event_skew_s)
        self.engagements: EngagementStream | None = None
        self.refresher: Refresher | None = None
        self._training: list[AdBatch] = []
        self._training_ads = 0
        self._training_logged_at = -math.inf
        self.training_gate = TrainingGate(cfg.index)
        self.tuner: NprobeTuner | None = None
        self._tune_settling = False
        self._ad_buf: list[AdBatch] = []
        self._oldest_ad_ms = float("inf")
        self._eng_buf: list[tuple[EngagementBatch, np.ndarray]] = []
        self._eng_offsets: dict[int, int] = {}
        self._rebalanced = False
        self._retired_to_load: dict[int, int] = {}
        # ad offsets of what the index holds (polled ads wait for their micro-batch)
        self._indexed_offsets: dict[int, int] = dict(ads.offsets)
        self._closed = False
        self._lags: dict[str, ConsumerLag] = {}
        self._replayed = 0
        self.batcher = MicroBatcher(cfg.refresh)
        self.snapshot_policy = SnapshotPolicy(cfg.snapshot)
        self.drift = DriftMonitor(cfg.drift, cfg.index.dim, k=cfg.refresh.k)
        self._rng = np.random.default_rng(0)  # the head queries drift is judged on
        self.retrainer = BackgroundRetrainer()
        self.recall_monitor = RecallMonitor.from_config(cfg.service, k=cfg.refresh.k)
        self.verifier = StoreVerifier(cfg.service.verify_every_s, cfg.service.verify_sample)
        if self.index is not None:
            self.metrics.observe_training({"state": "trained", "ads": self.index.ntotal})
            self._start_refreshing()

    @classmethod
    def from_config(cls, cfg: Config, store: NeighbourStore | None = None) -> RefresherService:
        """Check (or create) the topics, open the store (unless given), load the newest
        snapshot (or train from `index.training_file`), start the metrics server: a service
        ready to run."""
        k = cfg.kafka
        ensure_topics(k)
        registry = open_registry(k)
        producer = make_producer(k)
        dead_letters = DeadLetterPublisher(producer, k.dead_letter_topic)
        results = ResultsPublisher(producer, k.results_topic, registry) if k.results_topic else None
        store = store or open_store(cfg.store.url, cfg.store)
        limit = k.max_message_bytes
        ad_codec = AdCodec(registry, cfg.index.dim, cfg.index.metric, limit)
        engagement_codec = EngagementCodec(registry, cfg.index.dim, cfg.index.metric, limit)

        snap = load_latest_snapshot(snapshot_dir(cfg.snapshot.dir), cfg.index)
        index = snap.index if snap else None
        offsets = {p: o for (t, p), o in snap.offsets.items() if t == k.ad_topic} if snap else {}
        version = int(snap.meta.get("version", 0)) if snap else 0
        ad_meta = AdMetadata.from_state(snap.arrays) if snap and snap.arrays else AdMetadata()
        if snap is not None and not snap.arrays and snap.index.ntotal:
            logger.warning(
                "snapshot %s has no ad metadata: campaign ids unknown until re-upserted", snap.path
            )
        if snap is not None and cfg.index.recall_target and "nprobe" in snap.meta:
            snap.index.nprobe = max(snap.index.nprobe, int(snap.meta["nprobe"]))
        if index is None and cfg.index.training_file:
            vectors = np.load(cfg.index.training_file)
            index = LiveIvfIndex.train(cfg.index, np.ascontiguousarray(vectors, "float32"))

        metrics = ServiceMetrics()
        server = None
        svc = cfg.service
        if svc.metrics_port > 0:
            server = MetricsServer(
                svc.metrics_port,
                metrics,
                health=lambda: metrics.health(svc.health_stale_s, svc.store_unhealthy_after_s),
                live=lambda: metrics.liveness(svc.health_stale_s),
                status=metrics.status,
                host=svc.metrics_host,
            ).start()

        def join_group(listener: PartitionListener) -> EngagementStream:
            return EngagementStream(k, engagement_codec, dead_letters, listener=listener)

        def partition_state(partition: int) -> dict[str, np.ndarray]:
            return service.partition_state(partition)

        service = cls(
            cfg,
            store=store,
            ads=AdStream(k, ad_codec, dead_letters, offsets),
            join_group=join_group,
            head_log=HeadStateLog(k, producer, partition_state, registry=registry),
            producer=producer,
            index=index,
            version=version,
            ad_meta=ad_meta,
            metrics=metrics,
            metrics_server=server,
            results=results,
        )
        return service

    def partition_state(self, partition: int) -> dict[str, np.ndarray]:
        """Every tracked row of `partition`: what its head-state snapshot holds."""
        return self.tracker.state(self.checkpoint.partitions.queries(partition))

    # ---- start-up ----------------------------------------------------------------------

    def _start_refreshing(self) -> None:
        assert self.index is not None
        store = self.cfg.store
        retired_ttl = store.exit_ttl_s if store.on_head_exit == "expire" else None
        self.refresher = Refresher(self.index, self.cfg.refresh, retired_ttl_s=retired_ttl)
        self._start_tuning()
        self.engagements = self._join_group(self)
        self.checkpoint.committer = self.engagements
        logger.info(
            "refreshing: index of %d ads (version %d), joining group %s",
            self.index.ntotal,
            self.index.version,
            self.cfg.kafka.group_id,
        )

    def _train_from_buffer(self, force: bool = False) -> None:
        """Train the coarse quantizer on the buffered ads once the `TrainingGate` says so (at
        shutdown, `force`: on what is there, if enough), then index them."""
        gate = self.training_gate
        caught_up = self.ads.caught_up() if self.ads.backlog_at_start else None
        ready, why = gate.decide(self._training_ads, caught_up)  # events: an upper bound
        if not ready and not force:
            self._report_training(why)
            return
        ads = AdBatch.concat(self._training, self.cfg.index.dim)
        net = ads.net()
        n = len(net.upsert_ids)
        self._training, self._training_ads = [ads], n
        ready, why = gate.decide(n, caught_up)
        if n < gate.need or not (ready or force):
            self._report_training(why, force=True)
            return
        why = why if ready else f"shutting down with {n:,} ads"
        logger.info("training the index on %d ads: %s", n, why)
        self.index = LiveIvfIndex.train(self.cfg.index, net.upsert_vectors)
        self._training = []
        self._ad_buf.append(ads)
        self.metrics.observe_training({"state": "trained", "ads": n, "reason": why})
        self._start_refreshing()

    def _report_training(self, waiting_for: str, force: bool = False) -> None:
        """Say what the first training waits for: /status always, the log every 30 s."""
        self.metrics.observe_training(
            {"state": "waiting", "ads": self._training_ads, "message": waiting_for}
        )
        now = time.monotonic()
        if force or now - self._training_logged_at >= 30.0:
            self._training_logged_at = now
            logger.info("%s", waiting_for)

    def _start_tuning(self) -> None:
        """Warn where the index is far from the data; start the recall-target loop if set."""
        assert self.index is not None and self.refresher is not None
        nlist, nprobe = int(self.index.ivf.nlist), self.refresher.nprobe
        key = "refresh.nprobe" if self.cfg.refresh.nprobe else "index.nprobe"
        n = max(self.index.ntotal, self._training_ads)  # trained on: not yet indexed
        warnings = fit_warnings(n, nlist, nprobe, self.cfg.refresh.k, key)
        for text in warnings:
            logger.warning("%s", text)
        target = self.cfg.index.recall_target or None
        if target is not None:
            if self.index.nprobe > nprobe:  # tuned before a restart (snapshot meta)
                nprobe = min(self.index.nprobe, nlist)
                self.refresher.set_nprobe(nprobe)
            self.tuner = NprobeTuner(target, nprobe, nlist)
            self._tune_settling = True  # measure as soon as the first lists are stored
        self.metrics.observe_tuning(target, nprobe, nlist, warnings)

    # ---- rebalance (called by EngagementStream inside consume) -------------------------

    def partitions_assigned(self, partitions: list[int]) -> dict[int, int]:
        """Rebuild the head state of gained partitions; returns where to resume each one."""
        self.metrics.observe_rebalance("assigned", len(partitions))
        start: dict[int, int] = {}
        for p in partitions:
            states, applied = self.head_log.restore(p)
            for state in states:
                self.tracker.load_state(state)
                self.checkpoint.partitions.assign(state["query_ids"], p)
                retired, until = self.tracker.retired(state["query_ids"])
                self._retired_to_load.update(zip(retired.tolist(), until.tolist(), strict=True))
            entrants = self.head_log.restored_entrants(p)
            if len(entrants):  # stored live before the crash that lost their rows
                self.tracker.resume(entrants)
                self.checkpoint.partitions.assign(entrants, p)
            if applied >= 0:
                start[p] = applied
        self._rebalanced = True
        return start

    def partitions_revoked(self, partitions: list[int], lost: bool) -> None:
        """Partitions now owned elsewhere: what is durable of them is committed (unless lost),
        the rest dropped; their head queries and buffered events are forgotten and will be
        re-read by the new owner."""
        gone = list(set(partitions))
        self.metrics.observe_rebalance("lost" if lost else "revoked", len(gone))
        self._eng_buf = [
            (b.take(~np.isin(p, gone)), p[~np.isin(p, gone)]) for b, p in self._eng_buf
        ]
        for p in gone:
            self._eng_offsets.pop(p, None)
        queries, report = self.checkpoint.revoke(gone, lost)
        self._observe(report)
        if len(queries):
            self.tracker.drop(queries)
            if self.refresher is not None:
                self.refresher.forget_retired(queries)
            for q in queries.tolist():
                self._retired_to_load.pop(q, None)
        self._rebalanced = True

    # ---- the loop ----------------------------------------------------------------------

    def step(self, timeout_s: float = 0.05) -> None:
        """One poll of both topics, and a micro-batch when one is due; while a micro-batch is
        not durable, only keep the consumer alive and retry when its backoff has passed."""
        self.metrics.heartbeat()
        cp = self.checkpoint
        if cp.due():
            self._flush()
        if cp.pending and (not cp.accepts() or self.snapshot_policy.due()):
            if cp.writing:
                cp.wait(timeout_s)
            else:
                self._keep_alive(min(timeout_s, max(cp.retry_in(), 0.001)))
            return
        if self.refresher is not None and not cp.pending and self.verifier.due():
            self._verify()
            if cp.pending:
                return
        polled = self.ads.poll(self.cfg.refresh.batch_events, timeout_s)
        self.metrics.observe_consumed(ad_events=polled.messages)
        self._replayed += polled.already_dead_lettered
        if self.index is None:
            self._track_publishers()
            if len(polled.batch):
                self._training.append(polled.batch)
                self._training_ads += len(polled.batch)  # an upper bound: netted to train
            self._train_from_buffer()
            return
        if len(polled.batch):
            self._ad_buf.append(polled.batch)
            self._oldest_ad_ms = min(self._oldest_ad_ms, float(polled.batch.event_time_ms.min()))
        events = len(polled.batch)
        if self.engagements is not None:
            ep = self.engagements.poll(self.cfg.refresh.batch_events, 0 if events else timeout_s)
            self.metrics.observe_consumed(engagement_events=ep.messages)
            if len(ep.batch):
                self._eng_buf.append((ep.batch, ep.partitions))
            self._eng_offsets.update(ep.offsets)
            events += ep.messages
        self._track_publishers()
        self.batcher.add(events)
        busy = self._ad_buf or self._eng_buf or self._eng_offsets or self._rebalanced
        working = (
            self.retrainer.running
            or self.refresher_pending
            or self.recall_monitor.measuring
            or self.drift.checking
        )
        behind_ms = max(0.0, time.time() * 1000 - self._oldest_ad_ms)
        due = self.batcher.due(behind_ms=behind_ms, drained=polled.messages == 0)
        # right after a restore, not batch_ms later: restored heads that do not re-enter are
        # exited before anything else is served from their lists
        due = due or self._rebalanced
        if due and (busy or working):
            self.micro_batch()
        elif due:
            self.batcher.reset()

    def _keep_alive(self, timeout_s: float) -> None:
        """Serve heartbeats and rebalances while consumption is paused."""
        if self.engagements is not None:
            self.engagements.keep_alive(timeout_s)
        else:
            time.sleep(timeout_s)

    def _next_version(self) -> int:
        self._version = max(self._version + 1, int(time.time() * 1000))
        return self._version

    def _lists(
        self, query_ids: npt.NDArray[np.int64], ids: np.ndarray, scores: np.ndarray, version: int
    ) -> NeighbourLists:
        assert self.refresher is not None
        n = len(query_ids)
        advertisers = campaigns = None
        if self.cfg.store.neighbour_metadata:
            advertisers, campaigns = self.ad_meta.lookup(ids)
        return NeighbourLists(
            query_ids=query_ids,
            ids=ids,
            scores=scores,
            versions=np.full(n, version, dtype="int64"),
            computed_at_ms=np.full(n, int(time.time() * 1000), dtype="int64"),
            k=self.refresher.k,
            campaign_ids=campaigns,
            advertiser_ids=advertisers,
        )

    def micro_batch(self) -> None:
        """Apply what was polled, recompute affected head queries, hand them to the Checkpoint."""
        assert self.index is not None and self.refresher is not None
        t0 = time.perf_counter()
        self._rebalanced = False
        self._swap_retrained_index()
        dim = self.cfg.index.dim
        ads = AdBatch.concat(self._ad_buf, dim)
        eng = EngagementBatch.concat([b for b, _ in self._eng_buf], dim)
        parts = np.concatenate([p for _, p in self._eng_buf] or [np.empty(0, "int32")])
        eng_offsets = dict(self._eng_offsets)
        self._indexed_offsets = dict(self.ads.offsets)
        self._ad_buf, self._eng_buf, self._eng_offsets = [], [], {}
        self._oldest_ad_ms = float("inf")
        self.batcher.reset()
        if len(eng):
            self.tracker.observe(
                eng.query_ids, eng.weights, eng.event_time_ms, eng.vectors, eng.has_vector
            )
            self.checkpoint.partitions.observe(eng.query_ids, parts)
            self.checkpoint.partitions.prune(self.tracker.tracked_ids())
        changes = self.tracker.changes()
        net = ads.net()
        self.ad_meta.apply(net)
        version = self._next_version()
        restored = self._load_retired(changes)
        result = self.refresher.apply(net, changes, self.tracker.vectors, version)
        self.tracker.retire(changes.exited, self.refresher.retired_expiry(changes.exited))
        retired = _newest(result.retired, restored)
        # emptied (over refresh.retired_max_mb, or every ad deleted): nothing left to keep clean
        self.tracker.retire(retired.query_ids[(retired.ids < 0).all(axis=1)], -1)
        lists = self._lists(
            np.concatenate([result.query_ids, retired.query_ids]),
            np.concatenate([result.ids, retired.ids]),
            np.concatenate([result.scores, retired.scores]),
            version,
        )
        ttl = np.concatenate(
            [np.full(len(result.query_ids), self.cfg.store.ttl_s, np.int64), retired.ttl_s]
        )
        touched = np.union1d(np.unique(eng.query_ids), np.union1d(changes.entered, changes.exited))
        state = self.tracker.state(touched) if len(touched) or eng_offsets else None
        self.verifier.forget(np.union1d(changes.exited, changes.dropped))
        self.checkpoint.add(
            lists,
            exited=changes.exited,
            head_state=state,
            offsets=eng_offsets,
            event_time_ms=ads.event_time_ms,
            ttl_s=ttl if len(retired) else None,
            publish=np.arange(len(lists)) < len(result.query_ids) if len(retired) else None,
            entered=changes.entered,
        )
        self.snapshot_policy.record(len(ads))
        self._flush()
        self.drift.observe(net.upsert_vectors)
        self._observe_batch(time.perf_counter() - t0, len(net.upsert_ids), len(net.delete_ids))
        if self.stats.micro_batches % TRIM_EVERY_BATCHES == 0:
            trim_heap()
        if self.drift.after_batch(self.index, self._head_sample) is not None:
            self._maybe_retrain()

    def _load_retired(self, changes: HeadChanges) -> RetiredLists:
        """Take over, from the store, the retired lists of restored partitions and of restored
        heads that did not re-enter (their stored lists now expire): whoever owns a partition
        keeps every readable list of it clean of deleted ads. A store that cannot be read now
        is read again at the next micro-batch."""
        assert self.refresher is not None
        if self.cfg.store.on_head_exit != "expire":
            self._retired_to_load.clear()
            return RetiredLists.empty(self.refresher.width)
        if len(changes.exited):
            exited = changes.exited[~np.isin(changes.exited, self.refresher.head_ids())]
            self._retired_to_load.update(dict.fromkeys(exited.tolist(), -1))
        for q in changes.entered.tolist():
            self._retired_to_load.pop(q, None)
        if not self._retired_to_load:
            return RetiredLists.empty(self.refresher.width)
        qids = np.fromiter(self._retired_to_load, np.int64, len(self._retired_to_load))
        until = np.fromiter(self._retired_to_load.values(), np.int64, len(qids))
        try:
            got = self.store.lookup(qids, metadata=False)
        except StoreError as exc:
            self.metrics.observe_store_error(f"retired lists: {exc}", reason="retired_lists")
            logger.warning("retired lists of restored queries not read yet: %s", exc)
            return RetiredLists.empty(self.refresher.width)
        self._retired_to_load.clear()
        f = got.found
        return self.refresher.load_retired(qids[f], got.ids[f], got.scores[f], until[f])

    def _flush(self) -> FlushReport:
        report = self.checkpoint.flush()
        self._observe(report)
        if report.completed:
            self._after_durable()
        return report

    def _observe(self, report: FlushReport) -> None:
        """Metrics, stats and the verifier's record of what one flush achieved."""
        cp = self.checkpoint
        if report.store_error is not None:
            self.metrics.observe_store_error(report.store_error, reason=_store_reason(report))
        elif report.store_asked:
            self.metrics.observe_store_ok()
        if len(report.stored_ids):
            self.verifier.stored(report.stored_ids, report.stored_versions)
        if report.refused:
            self.metrics.observe_refused(Counter(map(refusal_reason, report.refused.values())))
            self.verifier.forget(np.fromiter(report.refused, np.int64, len(report.refused)))
        stored = report.stored_batch
        if stored is not None:
            stored_at = (report.stored_at_s or time.time()) * 1000
            age_ms = stored_at - stored.event_time_ms
            self.metrics.observe_stored(age_ms / 1000.0, len(stored.lists))
        failing = None if cp.failing_since is None else time.monotonic() - cp.failing_since
        self.metrics.observe_checkpoint(cp.waiting_for(), failing, cp.retry_in(), cp.last_error)

    def _after_durable(self) -> None:
        """A micro-batch is durable: sample recall, snapshot when due, both only with no other
        pending (the index holds no change whose lists are not stored yet)."""
        if self.refresher is not None and self.index is not None and not self.checkpoint.pending:
            monitor = self.recall_monitor
            if self._tune_settling and not self.refresher_pending and not monitor.measuring:
                monitor.request()  # until a settled figure came in
            try:
                recall = self.recall_monitor.after_batch(
                    self.store, self.index, self.refresher.head_ids(), self.tracker.vectors
                )
            except StoreError as exc:
                self.metrics.observe_store_error(f"recall sample: {exc}", reason="recall_sample")
                logger.warning("recall sample skipped, the store cannot be read: %s", exc)
                recall = None
            if recall is not None:
                self.metrics.observe_recall(recall, self.recall_monitor.k)
                self._tune(recall)
        if self.snapshot_policy.due() and not self.checkpoint.pending:
            self.snapshot()

    def _verify(self) -> None:
        """Read back a slice of the stored lists; rewrite those the store lost."""
        assert self.refresher is not None
        try:
            lost = self.verifier.check(self.store, self.refresher.head_ids())
        except StoreError as exc:
            self.metrics.observe_store_error(f"verify: {exc}", reason="verify")
            logger.warning("store verification skipped, the store cannot be read: %s", exc)
            return
        self.metrics.observe_store_ok()
        if not len(lost):
            return
        self.metrics.observe_rewrites(len(lost))
        scores, ids = self.refresher.topk(lost)
        self.checkpoint.add(self._lists(lost, ids, scores, self._next_version()))
        self._flush()

    def snapshot(self) -> None:
        """The index and the ad offsets of the events it holds; ads polled for a micro-batch
        not run yet are read again after a restart from it."""
        if self.index is None:
            return
        offsets = {(self.ads.topic, p): o for p, o in self._indexed_offsets.items()}
        write_snapshot(
            self.snapshot_dir,
            self.index,
            offsets,
            {"version": self._version, "nprobe": self.index.nprobe},
            keep=self.cfg.snapshot.keep,
            arrays=self.ad_meta.state(),
        )
        self.snapshot_policy.written()
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
        """Finish the current micro-batch and make it durable (bounded); what is still not
        durable at the deadline is not committed."""
        deadline = time.monotonic() + max_wait_s
        if self.index is None and self._training:
            self._train_from_buffer(force=True)
        cp = self.checkpoint
        while cp.pending and not cp.accepts() and time.monotonic() < deadline:
            cp.wait(max(0.0, deadline - time.monotonic()))
            time.sleep(min(cp.retry_in(), max(0.0, deadline - time.monotonic())))
            self._flush()
        if (
            self.index is not None
            and cp.accepts()
            and (self._ad_buf or self._eng_buf or self._eng_offsets)
        ):
            self.micro_batch()
        while (cp.pending or cp.uncommitted) and time.monotonic() < deadline:
            cp.wait(max(0.0, deadline - time.monotonic()))
            time.sleep(min(cp.retry_in(), max(0.0, deadline - time.monotonic())))
            self._flush()

    def shutdown(self) -> None:
        """Finish the micro-batch, store, flush, commit, snapshot, close (once)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.drain(self.cfg.service.shutdown_timeout_s)
            if not self.checkpoint.pending:
                self.snapshot()
            else:
                logger.error(
                    "stopping with a micro-batch not durable (waiting for %s: %s): its "
                    "offsets stay uncommitted and are re-read at the next start",
                    self.checkpoint.waiting_for(),
                    self.checkpoint.last_error,
                )
        finally:
            if self.metrics_server is not None:
                self.metrics_server.stop()
            if self.index is not None and self.retrainer.running:
                self.retrainer.cancel(self.index)
            if self.engagements is not None:
                self.engagements.close()  # a last revoke: commits only what is durable
            left = self.producer.flush(10)
            if left:
                logger.error("%d dead-letter or head-state records not delivered at shutdown", left)
                self.producer.purge()
            self.head_log.close()
            self.ads.close()
            self.producer.close()
            self.checkpoint.close()
            self.store.close()

    @property
    def refresher_pending(self) -> bool:
        """Head queries still waiting for their full recompute after a retrain."""
        return self.refresher is not None and self.refresher.pending_full > 0

    def _observe_batch(self, seconds: float, upserts: int, deletes: int) -> None:
        m, index = self.metrics, self.index
        assert index is not None and self.refresher is not None
        m.observe_batch(seconds, upserts=upserts, deletes=deletes)
        m.observe_index(index.ntotal, index.imbalance(), index.memory_bytes(), index.version)
        m.observe_head_queries(len(self.refresher))
        self._track_publishers()
        c = self.ads.consumer
        parts = [tp.partition for tp in c.assignment()]
        m.observe_lag(self.ads.topic, self._lag(c, self.ads.topic)(parts, self.ads.offsets))
        if self.engagements is not None:
            e = self.engagements
            m.observe_lag(e.topic, self._lag(e.consumer, e.topic)(sorted(e.assigned)))

    def _track_publishers(self) -> None:
        """The metrics follow the dead-letter and results publishers' running totals."""
        letters = self.ads.dead_letters
        self.metrics.track_dead_letters(
            letters.reasons, letters.failed, letters.references, self._replayed
        )
        if self.results is not None:
            r = self.results
            self.metrics.track_results(r.records, r.tombstones, r.too_large)

    def _lag(self, consumer: Consumer, topic: str) -> ConsumerLag:
        """The lag reader of `consumer` (kept: it remembers committed offsets it looked up)."""
        lag = self._lags.get(topic)
        if lag is None or lag.consumer is not consumer:
            lag = self._lags[topic] = ConsumerLag(consumer, topic)
        return lag

    def _maybe_retrain(self) -> None:
        """Start a background retrain when the drift monitor says the quantizer went stale."""
        retrain, reason = self.drift.should_retrain()
        if not retrain or self.retrainer.running or self.index is None:
            return
        logger.warning("index drift: %s; retraining in the background", reason)
        self.retrainer.start(self.index, self.drift.reservoir.sample())

    def _head_sample(self, n: int) -> np.ndarray:
        """Vectors of up to `n` random head queries: drift is judged on what is served."""
        heads = self.refresher.head_ids() if self.refresher is not None else np.empty(0, "int64")
        if not len(heads):
            return np.empty((0, self.cfg.index.dim), dtype="float32")
        pick = np.sort(self._rng.choice(heads, min(n, len(heads)), replace=False))
        try:
            return np.asarray(self.tracker.vectors(pick), dtype="float32")
        except KeyError:  # a head query without a cached vector: judge on ads this time
            return np.empty((0, self.cfg.index.dim), dtype="float32")

    def _tune(self, recall: float) -> None:
        """A stored-recall figure: under the warning it asks for a drift check now (a drifted
        quantizer is retrained); the recall-target loop moves nprobe (or nlist at a retrain)."""
        assert self.refresher is not None and self.index is not None
        if recall < self.recall_monitor.warn_below:
            self.drift.request_check()
        tuner = self.tuner
        if tuner is None:
            return
        settled = not self.refresher_pending
        self._tune_settling = self._tune_settling and not settled
        step = tuner.observe(recall, settled=settled)
        if step is None:
            return
        if step.retrain_nlist is not None:
            if self.retrainer.running or len(self.drift.reservoir) < step.retrain_nlist:
                tuner.retrain_asked = False  # asked again at the next measurement
                return
            logger.warning("%s", step.reason)
            self.retrainer.start(
                self.index, self.drift.reservoir.sample(), nlist=step.retrain_nlist
            )
            return
        logger.warning("%s", step.reason)
        self.refresher.set_nprobe(step.nprobe)
        self.index.nprobe = step.nprobe
        self._tune_settling = True
        self.metrics.observe_tuning(tuner.target, step.nprobe, int(self.index.ivf.nlist))

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
        if self.tuner is not None:
            self.tuner.index_changed(int(new.ivf.nlist), self.refresher.nprobe)
            self._tune_settling = True
            nprobe = self.refresher.nprobe
            self.metrics.observe_tuning(self.tuner.target, nprobe, int(new.ivf.nlist))
        trim_heap()

    @property
    def idle(self) -> bool:
        """Nothing buffered and nothing waiting for the store, the changelog or a commit."""
        cp = self.checkpoint
        return not (cp.pending or cp.uncommitted) and not (
            self._ad_buf or self._eng_buf or self._eng_offsets or self._training
        )

    def describe(self) -> dict[str, Any]:
        return {
            "ads_indexed": 0 if self.index is None else self.index.ntotal,
            "head_queries": 0 if self.refresher is None else len(self.refresher),
            "micro_batches": self.stats.micro_batches,
        }
