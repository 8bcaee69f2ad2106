"""Across restarts and rebalances, every list the store serves belongs to the partition's
current owner and stays clean: the retired lists (queries that left the head set, readable
until the exit TTL) are taken over by whoever restores the partition and lose deleted ads,
and restored heads whose decayed score is below the exit score are exited right at the
restore, even when no engagement follows (issue 11 items 7 and 8). An index snapshot never
records ad offsets past the ads its index holds, so a restart loses no ad.

The service runs in process against the real broker at its default message limits, at
d = 384; the expectations come from numpy brute force over the ads this test published and
from reading the SQLite store directly, not from the service's code.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from annstream.codec import AdCodec, EngagementCodec
from annstream.errors import StoreUnavailableError
from annstream.events import AdBatch, EngagementBatch
from annstream.schemas import open_registry
from annstream.snapshot import list_snapshots, load_latest_snapshot
from annstream.testing.harness import (
    ENG_PARTITIONS,
    MARGIN,
    RESTORED,
    Feed,
    K,
    Topics,
    committed_offsets,
    log_tail,
    service_settings,
    spawn_service,
    step_until,
    to_config,
    to_toml,
    wait_for_log,
    wait_until,
)
from consumers.service import RefresherService

pytest_plugins = ["service_harness"]

DIM = 384
N_ADS = 400
NLIST = 8
WIDTH = K + MARGIN
HALF_LIFE_S = 60.0
ENTER, EXIT = 4.0, 2.0
RETIRING = np.arange(10, dtype=np.int64) + 5_000
"""Head queries that later decay out of the head set (their lists then expire)."""
STAYING = np.arange(10, dtype=np.int64) + 6_000
"""Head queries that stay heads: engaged again an hour of event time later."""


class _Run:
    """The ads and query vectors this test published, and the service settings."""

    def __init__(self, bootstrap: str, topics: Topics, tmp_path: Path, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.bootstrap, self.topics = bootstrap, topics
        self.group = f"restarts-{uuid.uuid4().hex[:8]}"
        self.db = tmp_path / "store.db"
        training = tmp_path / "training.npy"
        np.save(training, rng.standard_normal((N_ADS, DIM)).astype("float32"))
        self.settings = service_settings(
            bootstrap,
            topics,
            training,
            f"sqlite:///{self.db}",
            tmp_path / "snap",
            self.group,
            index={"dim": DIM, "nlist": NLIST, "nprobe": NLIST, "train_size": N_ADS},
            refresh={"nprobe": NLIST},
            heads={"half_life_s": HALF_LIFE_S, "enter_score": ENTER, "exit_score": EXIT},
        )
        self.feed = Feed(bootstrap, topics)
        registry = open_registry()
        self.feed.ad_codec = AdCodec(registry, DIM)
        self.feed.eng_codec = EngagementCodec(registry, DIM)
        self.ads: dict[int, np.ndarray] = {}
        self.deleted: set[int] = set()
        self.queries = {
            int(q): rng.standard_normal(DIM).astype("float32")
            for q in np.concatenate([RETIRING, STAYING])
        }
        self.now_ms = int(time.time() * 1000)

    def service(self, **sections: dict[str, Any]) -> RefresherService:
        settings = {k: {**v, **sections.get(k, {})} for k, v in self.settings.items()}
        return RefresherService.from_config(to_config(settings))

    def publish_ads(self, n: int) -> None:
        ids = np.arange(len(self.ads) + 1, len(self.ads) + n + 1, dtype=np.int64)
        vectors = self.rng.standard_normal((n, DIM)).astype("float32")
        self.ads.update(zip(ids.tolist(), vectors, strict=True))
        for a in range(0, n, 100):
            self.feed.send(AdBatch.upserts(ids[a : a + 100], vectors[a : a + 100], self.now_ms))

    def delete_ads(self, ids: set[int]) -> None:
        batch = np.array(sorted(ids), dtype=np.int64)
        self.feed.send(AdBatch.deletes(batch, DIM, self.now_ms))
        for ad in batch.tolist():
            self.ads.pop(ad, None)
        self.deleted |= ids

    def engage(self, query_ids: np.ndarray, ago_s: float, partition_of: Any) -> None:
        """One event of weight ENTER + 1 per query, `ago_s` before now, on the partition
        `partition_of(query id)` chooses (the service learns the owner from it)."""
        t = self.now_ms - int(ago_s * 1000)
        for q in query_ids.tolist():
            one = np.array([q], dtype=np.int64)
            batch = EngagementBatch(
                one,
                np.array([-1], dtype=np.int64),
                np.zeros(1, "uint8"),
                np.array([ENTER + 1], dtype="float32"),
                np.array([t], dtype=np.int64),
                self.queries[q][None, :],
                np.ones(1, bool),
            )
            value = self.feed.eng_codec.encode(batch)[0]
            self.feed.producer.produce(
                self.topics.engagements,
                value=value,
                key=q.to_bytes(8, "big"),
                partition=int(partition_of(q)),
                on_delivery=self.feed._delivered,
            )
        self.feed.producer.poll(0)

    def done(self, service: RefresherService) -> bool:
        self.feed.flush()
        ends = self.feed.engagement_ends
        committed = committed_offsets(self.bootstrap, self.topics.engagements, self.group)
        return (
            service.idle
            and service.ads.offsets == self.feed.ends[self.topics.ads]
            and all(committed.get(p) == o for p, o in ends.items())
        )

    # ---- what the store holds, read directly -------------------------------------------

    def stored(self) -> dict[int, tuple[np.ndarray, np.ndarray, int | None]]:
        """Every readable record: query id -> (ids, scores, expiry ms or None)."""
        now = int(time.time() * 1000)
        with sqlite3.connect(self.db) as db:
            rows = db.execute(
                "SELECT query_id, ids, scores, expires_at_ms FROM neighbour_lists "
                "WHERE expires_at_ms IS NULL OR expires_at_ms > ?",
                (now,),
            ).fetchall()
        return {
            int(q): (np.frombuffer(i, "<i8"), np.frombuffer(s, "<f4"), e) for q, i, s, e in rows
        }

    def exact(self, query_id: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact K + margin of a query over the live ads (cosine, ties by id)."""
        ids = np.array(sorted(self.ads), dtype=np.int64)
        a = np.stack([self.ads[i] for i in ids.tolist()]).astype(np.float64)
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        q = self.queries[query_id].astype(np.float64)
        s = a @ (q / np.linalg.norm(q))
        top = np.lexsort((ids, -s))[:WIDTH]
        return ids[top], s[top]

    def problems(self, heads: np.ndarray) -> list[str]:
        """How the store breaks the contract: a readable list holding a deleted ad, a live
        list of a query that is not a head, a head without its exact live list (the exact
        best ads down to at least K, then -1 padding: the refresher shortens the margin on
        deletes and searches again below K)."""
        out: list[str] = []
        stored = self.stored()
        for q, (ids, _, expiry) in sorted(stored.items()):
            bad = sorted(set(ids.tolist()) & self.deleted)
            if bad:
                kind = "live" if expiry is None else "retired"
                out.append(f"{kind} list of {q} holds deleted ads {bad}")
        live = {q for q, (_, _, e) in stored.items() if e is None}
        orphans = sorted(live - set(heads.tolist()))
        if orphans:
            out.append(f"live lists of queries that are no head: {orphans}")
        for q in heads.tolist():
            if q not in live:
                out.append(f"head query {q} has no live list")
                continue
            want_i, want_s = self.exact(q)
            got_i, got_s, _ = stored[q]
            c = int((got_i >= 0).sum())  # a valid prefix of at least K, then padding
            if (
                c < K
                or not (got_i[c:] == -1).all()
                or not np.array_equal(got_i[:c], want_i[:c])
                or not np.allclose(got_s[:c], want_s[:c], atol=1e-4)
            ):
                out.append(f"query {q}: stored {got_i.tolist()}, exact {want_i.tolist()}")
        return out[:8]

    def held_by(self, query_ids: np.ndarray) -> set[int]:
        """Some ads of every position range (top K and margin) of these stored lists."""
        stored = self.stored()
        out: set[int] = set()
        for q in query_ids.tolist():
            ids = stored[q][0]
            out |= set(ids[[0, K // 2, K, WIDTH - 1]].tolist()) - {-1}
        return out


def _restored(service: RefresherService) -> bool:
    return len(service.head_log.restores) == ENG_PARTITIONS


def test_retired_lists_lose_deleted_ads_after_a_restart(
    bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    """Queries retire (their lists expire with the exit TTL), the service stops cleanly, the
    next one restores the partitions and then ads of those lists are deleted: no readable
    list may still hold them (before: served until the exit TTL, a day by default)."""
    run = _Run(bootstrap, topics, tmp_path, seed=1)
    first = run.service()
    try:
        run.publish_ads(N_ADS)
        run.engage(RETIRING, 7_200, lambda q: q % ENG_PARTITIONS)
        step_until([first], lambda: run.done(first), "the first heads stored", guard_s=60)
        assert run.problems(RETIRING) == []  # whole lists: their ads were indexed first
        run.engage(STAYING, 3_600, lambda q: q % ENG_PARTITIONS)
        step_until([first], lambda: run.done(first), "the first heads retired", guard_s=60)
    finally:
        first.shutdown()
    stored = run.stored()
    assert all(stored[q][2] is not None for q in RETIRING.tolist()), "not retired"
    assert run.problems(STAYING) == []

    second = run.service()
    try:
        step_until([second], lambda: _restored(second) and run.done(second), "the restore")
        run.delete_ads(run.held_by(RETIRING) | run.held_by(STAYING))
        step_until([second], lambda: run.done(second), "the deletes", guard_s=60)
        assert run.problems(STAYING) == []
    finally:
        second.shutdown()


def test_restored_heads_below_exit_are_exited_at_the_restore_and_their_lists_kept_clean(
    bootstrap: str, topics: Topics, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first service decides that RETIRING (all on partition 0) left the head set, but the
    store refuses their exits, so partition 0's changelog keeps them as heads while the other
    partitions' records carry the later decay clock. After a restart with no new engagement
    their lists must stop being live right at the restore, not a micro-batch interval later
    (`refresh.batch_ms = 5000` as in the issue), and must then lose deleted ads like any
    retired list."""
    run = _Run(bootstrap, topics, tmp_path, seed=2)
    others = range(1, ENG_PARTITIONS)
    first = run.service(service={"shutdown_timeout_s": 1.0})
    try:
        run.publish_ads(N_ADS)
        run.engage(RETIRING, 7_200, lambda q: 0)
        run.engage(STAYING, 7_200, lambda q: 1 + q % (ENG_PARTITIONS - 1))
        step_until([first], lambda: run.done(first), "the heads stored", guard_s=60)
        assert run.problems(np.concatenate([RETIRING, STAYING])) == []

        def refuse(query_ids: np.ndarray) -> None:
            raise StoreUnavailableError("store down (test)", retry_after=0.05)

        monkeypatch.setattr(first.sink, "head_exits", refuse)
        run.engage(STAYING, 3_600, lambda q: 1 + q % (ENG_PARTITIONS - 1))

        def others_committed() -> bool:
            run.feed.flush()
            ends = run.feed.engagement_ends
            committed = committed_offsets(bootstrap, topics.engagements, run.group)
            return first.checkpoint.waiting_for() == "store" and all(
                committed.get(p) == ends[p] for p in others
            )

        step_until([first], others_committed, "the later clock committed on the others", guard_s=60)
    finally:
        first.shutdown()
    assert set(RETIRING.tolist()) <= {q for q, (_, _, e) in run.stored().items() if e is None}

    second = run.service(refresh={"batch_ms": 5000})
    try:
        step_until([second], lambda: _restored(second), "the restore")
        for _ in range(3):
            second.step()
        live = {q for q, (_, _, e) in run.stored().items() if e is None}
        assert live == set(STAYING.tolist()), "orphaned live lists after the restore"
        step_until([second], lambda: run.done(second), "the restore made durable")
        run.delete_ads(run.held_by(RETIRING) | run.held_by(STAYING))
        step_until([second], lambda: run.done(second), "the deletes", guard_s=60)
        assert run.problems(STAYING) == []
    finally:
        second.shutdown()


def test_retired_lists_follow_their_partition_through_a_rebalance(
    bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    """A second replica joins and takes some partitions, then the first leaves: the replica
    that owns a partition keeps its retired lists clean, the one that lost it stops."""
    run = _Run(bootstrap, topics, tmp_path, seed=3)
    fast = {"client": {"session.timeout.ms": "3000"}}
    a = run.service(kafka=fast, snapshot={"dir": str(tmp_path / "snap-a")})
    b: RefresherService | None = None
    try:
        run.publish_ads(N_ADS)
        run.engage(RETIRING, 7_200, lambda q: q % ENG_PARTITIONS)
        step_until([a], lambda: run.done(a), "the first heads stored", guard_s=60)
        assert run.problems(RETIRING) == []
        run.engage(STAYING, 3_600, lambda q: q % ENG_PARTITIONS)
        step_until([a], lambda: run.done(a), "the first heads retired", guard_s=60)
        assert a.refresher is not None
        assert a.refresher.retired_lists().query_ids.tolist() == RETIRING.tolist()

        b = run.service(kafka=fast, snapshot={"dir": str(tmp_path / "snap-b")})

        def owned(s: RefresherService) -> set[int]:
            return s.engagements.assigned if s.engagements is not None else set()

        def sharded() -> bool:
            return bool(owned(a)) and bool(owned(b)) and not owned(a) & owned(b)

        step_until([a, b], lambda: sharded() and a.idle and b.idle, "the rebalance")
        kept = set(a.refresher.retired_lists().query_ids.tolist())
        assert kept == {q for q in RETIRING.tolist() if q % ENG_PARTITIONS in owned(a)}
    finally:
        a.shutdown()
    assert b is not None
    try:
        step_until(
            [b],
            lambda: len(owned(b)) == ENG_PARTITIONS and run.done(b),
            "the survivor owns everything",
        )
        run.delete_ads(run.held_by(RETIRING) | run.held_by(STAYING))
        step_until([b], lambda: run.done(b), "the deletes", guard_s=60)
        assert run.problems(STAYING) == []
    finally:
        b.shutdown()


def test_a_snapshot_never_records_ad_offsets_past_what_its_index_holds(
    bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    """Issue 11's "index holds 1632 ads, 1633 live" after restarts: ads polled but not yet
    applied (their micro-batch not due) were in the offsets of a snapshot written when the
    verifier's rewrite of a lost list became durable; a restart from that snapshot never
    indexed them. The snapshot's offsets must be those of the ads its index holds."""
    run = _Run(bootstrap, topics, tmp_path, seed=4)
    service = run.service(service={"verify_every_s": 0.3}, snapshot={"every_s": 0.5})
    try:
        run.publish_ads(N_ADS)
        run.engage(STAYING, 60, lambda q: q % ENG_PARTITIONS)
        step_until([service], lambda: run.done(service), "the heads stored", guard_s=60)
        before = dict(run.feed.ends[topics.ads])
        service.batcher.batch_ms = 3_600_000.0  # the next micro-batch is not due
        run.publish_ads(5)
        new = np.arange(N_ADS + 1, N_ADS + 6, dtype=np.int64)
        run.feed.flush()
        after = dict(run.feed.ends[topics.ads])
        step_until([service], lambda: service.ads.offsets == after, "the new ads polled")
        with sqlite3.connect(run.db) as db:  # the store lost one list
            db.execute("DELETE FROM neighbour_lists WHERE query_id = ?", (int(STAYING[0]),))
        time.sleep(0.6)  # a snapshot is due (every 0.5 s) at the next durable flush
        latest = list_snapshots(tmp_path / "snap")[0]
        step_until(
            [service],
            lambda: list_snapshots(tmp_path / "snap")[0] != latest,
            "the lost list rewritten, then a snapshot",
            guard_s=20,
        )
        assert int(STAYING[0]) in run.stored() and service.stats.rewrites == 1
        snap = load_latest_snapshot(tmp_path / "snap", service.cfg.index)
        assert snap is not None
        offsets = {p: o for (t, p), o in snap.offsets.items() if t == topics.ads}
        held = snap.index.contains(new)
        assert (offsets == before and not held.any()) or (offsets == after and held.all()), (
            f"snapshot at ad offsets {offsets} (before the new ads {before}, after {after}) "
            f"holds {int(held.sum())} of them"
        )
    finally:
        service.shutdown()


def test_retired_lists_lose_deleted_ads_after_a_kill_9(
    bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    """The restart test with `annstream run` as a child process killed with SIGKILL once its
    retired lists are durable: the next process knows them from the changelog alone."""
    run = _Run(bootstrap, topics, tmp_path, seed=5)
    settings = {
        **run.settings,
        "kafka": {**run.settings["kafka"], "client": {"session.timeout.ms": "3000"}},
        "service": {**run.settings["service"], "log_level": "INFO"},
    }
    config = tmp_path / "annstream.toml"
    config.write_text(to_toml(settings))

    def committed() -> bool:
        run.feed.flush()
        return committed_offsets(bootstrap, topics.engagements, run.group) == (
            run.feed.engagement_ends
        )

    def expiring() -> set[int]:
        return {q for q, (_, _, e) in run.stored().items() if e is not None}

    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = spawn_service(config, tmp_path / "first.log")
        wait_for_log(proc, tmp_path / "first.log", RESTORED, ENG_PARTITIONS, 60)
        run.publish_ads(N_ADS)
        run.engage(RETIRING, 7_200, lambda q: q % ENG_PARTITIONS)
        wait_until(lambda: committed() and run.problems(RETIRING) == [], "exact lists")
        run.engage(STAYING, 3_600, lambda q: q % ENG_PARTITIONS)
        wait_until(lambda: committed() and expiring() == set(RETIRING.tolist()), "retired")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL

        proc = spawn_service(config, tmp_path / "second.log")
        wait_for_log(proc, tmp_path / "second.log", RESTORED, ENG_PARTITIONS, 60)
        run.delete_ads(run.held_by(RETIRING) | run.held_by(STAYING))
        run.feed.flush()
        with contextlib.suppress(AssertionError):
            wait_until(lambda: run.problems(STAYING) == [], "the deletes", guard_s=20)
        assert run.problems(STAYING) == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_tail(tmp_path / "second.log")
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(30)
