"""The delivery contract without a broker: the real NeighbourSink over an InMemoryStore, a
changelog and a committer that record what became durable, each step failed in turn, per
partition. The invariant checked after every flush: no partition's offset is committed unless
its lists are in the store and its changelog records were flushed."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from confluent_kafka import KafkaError, KafkaException

from annstream.checkpoint import Checkpoint, QueryPartitions, State
from annstream.config import StoreConfig
from annstream.errors import BrokerError
from annstream.sink import NeighbourSink
from annstream.store.memory import InMemoryStore
from annstream.store.record import NeighbourLists

K, MARGIN, DIM = 100, 20, 384
PARTITIONS = (0, 1, 2)
QUERIES_PER_PARTITION = 40


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class Changelog:
    """Appends are queued, a flush makes them durable; failures injected per partition."""

    def __init__(self) -> None:
        self.queued: list[tuple[int, State, int]] = []
        self.durable: list[tuple[int, State, int]] = []
        self.too_large: set[int] = set()
        self.flush_fails = False
        self.appends = 0
        self.noting: list[tuple[int, list[int]]] = []
        self.noted: list[tuple[int, list[int]]] = []

    def note_entrants(self, partition: int, query_ids: npt.NDArray[np.int64]) -> None:
        self.noting.append((partition, query_ids.tolist()))

    def append(self, partition: int, state: State, engagement_offset: int) -> None:
        self.appends += 1
        if partition in self.too_large:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        self.queued.append((partition, state, engagement_offset))

    def flush(self, timeout_s: float) -> None:
        if self.flush_fails:
            raise BrokerError(f"{len(self.queued)} head-state records not yet in the log")
        self.durable += self.queued
        self.queued = []
        self.noted += self.noting
        self.noting = []

    def offsets(self) -> dict[int, int]:
        """The highest engagement offset in the durable log per partition (what a restore
        resumes from)."""
        out: dict[int, int] = {}
        for p, _, o in self.durable:
            out[p] = max(o, out.get(p, -1))
        return out

    def queries(self, partition: int) -> set[int]:
        return {q for p, s, _ in self.durable if p == partition for q in s["query_ids"].tolist()}


class Committer:
    def __init__(self) -> None:
        self.committed: dict[int, int] = {}
        self.fails = False
        self.paused = False
        self.pauses = 0

    def commit(self, offsets: dict[int, int]) -> None:
        if self.fails:
            raise BrokerError("engagement offset commit failed: broker unreachable")
        self.committed.update(offsets)

    def pause(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume(self) -> None:
        self.paused = False


class Results:
    """The results topic: publishes are queued, a flush delivers them (or fails)."""

    def __init__(self) -> None:
        self.queued: list[tuple[int, NeighbourLists | None]] = []
        self.delivered: dict[int, NeighbourLists | None] = {}  # the latest per query (compacted)
        self.flush_fails = False
        self.log: list[str] = []

    def publish(self, lists: NeighbourLists, exited: npt.NDArray[np.int64]) -> None:
        self.queued += [(int(q), lists.take(np.array([i]))) for i, q in enumerate(lists.query_ids)]
        self.queued += [(int(q), None) for q in exited.tolist()]

    def flush(self, timeout_s: float) -> None:
        if self.flush_fails:
            raise BrokerError(f"{len(self.queued)} records not yet delivered to the results topic")
        self.delivered.update(self.queued)
        self.log += [f"{q}:{'tombstone' if v is None else 'list'}" for q, v in self.queued]
        self.queued = []


class Rig:
    def __init__(
        self, backoff_s: float = 0.2, backoff_max_s: float = 3.0, results: bool = False
    ) -> None:
        self.clock = Clock()
        self.store = InMemoryStore(StoreConfig(url="memory://"))
        self.sink = NeighbourSink(self.store, self.store.cfg)
        self.changelog = Changelog()
        self.committer = Committer()
        self.results = Results()
        self.cp = Checkpoint(
            self.sink,
            self.changelog,
            self.committer,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
            clock=self.clock,
            results=self.results if results else None,
        )
        self.rng = np.random.default_rng(7)
        self.version = 0
        self.owner: dict[int, int] = {}
        for p in PARTITIONS:
            qids = np.arange(QUERIES_PER_PARTITION, dtype=np.int64) + 1000 * (p + 1)
            self.cp.partitions.observe(qids, np.full(len(qids), p))
            self.owner.update(dict.fromkeys(qids.tolist(), p))

    def queries(self, partition: int) -> npt.NDArray[np.int64]:
        return np.array([q for q, p in self.owner.items() if p == partition], dtype=np.int64)

    def lists(self, query_ids: npt.NDArray[np.int64]) -> NeighbourLists:
        self.version += 1
        n = len(query_ids)
        ids = self.rng.integers(0, 1 << 40, (n, K + MARGIN), dtype=np.int64)
        scores = -np.sort(-self.rng.random((n, K + MARGIN), dtype=np.float32), axis=1)
        return NeighbourLists(
            query_ids=query_ids,
            ids=ids,
            scores=scores,
            versions=np.full(n, self.version, dtype=np.int64),
            computed_at_ms=np.full(n, 1_700_000_000_000, dtype=np.int64),
            k=K,
        )

    def state(self, query_ids: npt.NDArray[np.int64]) -> State:
        return {
            "query_ids": query_ids,
            "scores": self.rng.random(len(query_ids)).astype(np.float32),
            "vectors": self.rng.standard_normal((len(query_ids), DIM)).astype(np.float32),
        }

    def add(self, offsets: dict[int, int], exited: Any = ()) -> NeighbourLists:
        """A micro-batch touching every query of every partition."""
        qids = np.concatenate([self.queries(p) for p in PARTITIONS])
        lists = self.lists(qids)
        self.cp.add(lists, exited=exited, head_state=self.state(qids), offsets=offsets)
        return lists

    def stored(self, partition: int) -> bool:
        return bool(self.store.lookup(self.queries(partition)).found.all())

    def check_invariant(self) -> None:
        """A committed offset is covered by stored lists, delivered results (when a results
        topic is on) and a durable changelog record; a changelog record by the results too."""
        log = self.changelog.offsets()
        for p, offset in self.committer.committed.items():
            assert self.stored(p), f"partition {p} committed with lists not stored"
            assert log.get(p, -1) >= offset, f"partition {p} committed past its changelog"
        if self.cp.results is not None:
            for p in log:
                missing = set(self.queries(p).tolist()) - set(self.results.delivered)
                assert not missing, f"partition {p} in the changelog, results not delivered"


OFFSETS = {0: 11, 1: 21, 2: 31}


def test_checkpoint_commits_after_store_and_changelog() -> None:
    rig = Rig()
    lists = rig.add(OFFSETS)
    assert rig.cp.pending and rig.cp.waiting_for() == "store"
    report = rig.cp.flush()
    assert report.ok and report.completed and not rig.cp.pending
    assert rig.committer.committed == OFFSETS and rig.changelog.offsets() == OFFSETS
    assert report.stored_batch is not None and report.stored_batch.lists is lists
    np.testing.assert_array_equal(report.stored_ids, lists.query_ids)
    for p in PARTITIONS:
        assert rig.changelog.queries(p) == set(rig.queries(p).tolist())
        assert rig.stored(p)
    assert rig.store.calls["upsert"] == 1 and rig.committer.pauses == 0
    rig.check_invariant()


def test_checkpoint_notes_entering_queries_in_the_changelog_before_the_store_write() -> None:
    """Their head-state rows follow the store write: without the note, a crash in between
    restores no head that owns their live lists."""
    rig = Rig()
    entered = np.concatenate([rig.queries(1)[:3], rig.queries(2)[:1]])
    qids = np.concatenate([rig.queries(p) for p in PARTITIONS])
    rig.changelog.flush_fails = True
    rig.cp.add(rig.lists(qids), head_state=rig.state(qids), offsets=OFFSETS, entered=entered)
    assert rig.cp.waiting_for() == "changelog"
    report = rig.cp.flush()
    assert not report.ok and "head-state entrants" in report.errors[0]
    assert rig.store.calls["upsert"] == 0 and rig.changelog.noted == []
    assert rig.cp.waiting_for() == "changelog" and rig.committer.paused

    rig.changelog.flush_fails = False
    rig.clock.now += rig.cp.retry_in()
    report = rig.cp.flush()
    assert report.ok and report.completed and rig.committer.committed == OFFSETS
    noted = dict(rig.changelog.noted)  # noted again by the retry: the latest per partition
    assert noted == {1: rig.queries(1)[:3].tolist(), 2: rig.queries(2)[:1].tolist()}
    rig.check_invariant()


def test_checkpoint_with_the_store_down_commits_nothing_and_backs_off() -> None:
    rig = Rig(backoff_s=0.2, backoff_max_s=1.0)
    rig.store.go_down("connection refused")
    rig.add(OFFSETS)
    waits = []
    for _ in range(5):
        report = rig.cp.flush()
        assert report.store_error is not None and "connection refused" in report.store_error
        assert not report.completed and rig.cp.pending and rig.committer.paused
        assert rig.changelog.appends == 0 and rig.committer.committed == {}
        assert not rig.cp.due()
        waits.append(rig.cp.retry_in())
        rig.clock.now += rig.cp.retry_in()
        assert rig.cp.due()
    assert waits == pytest.approx([0.2, 0.4, 0.8, 1.0, 1.0])
    assert rig.store.calls["upsert"] == 5  # one attempt per flush: no retry loop inside
    assert rig.committer.pauses == 1

    rig.store.heal()
    report = rig.cp.flush()
    assert report.ok and report.completed and not rig.committer.paused
    assert rig.committer.committed == OFFSETS
    assert rig.cp.retry_in() == 0 and rig.cp.failing_since is None
    rig.check_invariant()


def test_checkpoint_partial_row_failures_hold_back_only_their_partition() -> None:
    rig = Rig()
    rig.store.fail(rig.queries(1)[:3])  # retryable, e.g. a timeout on one node
    lists = rig.add(OFFSETS)
    report = rig.cp.flush()
    assert report.store_error is not None and "3 of" in report.store_error
    assert rig.committer.committed == {0: 11, 2: 31}
    assert set(rig.changelog.offsets()) == {0, 2}
    assert rig.cp.pending and rig.cp.waiting_for() == "store" and rig.committer.paused
    rig.check_invariant()

    rig.store.heal()
    before = rig.sink.stats.stored
    rig.clock.now += rig.cp.retry_in()
    report = rig.cp.flush()
    assert report.completed and rig.committer.committed == OFFSETS
    assert rig.sink.stats.stored - before == 3  # only the rows that failed are written again
    assert rig.changelog.appends == 3  # partitions 0 and 2 were not appended twice
    got = rig.store.lookup(lists.query_ids)
    assert got.found.all() and (got.versions == lists.versions).all()
    rig.check_invariant()


def test_checkpoint_permanent_row_failures_are_reported_and_do_not_block() -> None:
    rig = Rig()
    refused = rig.queries(2)[[0, 5]]
    rig.store.fail(refused, permanent=True, reason="result 13 record too big")
    rig.add(OFFSETS)
    report = rig.cp.flush()
    assert report.completed and report.store_error is None and not rig.committer.paused
    assert sorted(report.refused) == sorted(refused.tolist())
    assert all("record too big" in why for why in report.refused.values())
    assert rig.committer.committed == OFFSETS
    assert not rig.store.lookup(refused).found.any()
    assert rig.sink.stats.refused == 2


def test_checkpoint_changelog_too_large_for_one_partition_never_commits_it() -> None:
    """Issue 11 item 3: an append that raised must be retried, never skipped; the other
    partitions go on."""
    rig = Rig()
    rig.changelog.too_large = {1}
    rig.add(OFFSETS)
    for _ in range(3):
        report = rig.cp.flush()
        assert any("MSG_SIZE_TOO_LARGE" in e for e in report.errors)
        assert rig.committer.committed == {0: 11, 2: 31}
        assert rig.cp.pending and rig.cp.waiting_for() == "changelog"
        rig.check_invariant()
        rig.clock.now += rig.cp.retry_in()
    assert rig.changelog.appends == 2 + 3  # 0 and 2 once, 1 on every attempt
    assert rig.store.calls["upsert"] == 1  # the lists were stored once

    rig.changelog.too_large = set()
    assert rig.cp.flush().completed
    assert rig.committer.committed == OFFSETS
    assert rig.changelog.queries(1) == set(rig.queries(1).tolist())
    rig.check_invariant()


def test_checkpoint_changelog_flush_timing_out_commits_nothing() -> None:
    rig = Rig()
    rig.changelog.flush_fails = True
    rig.add(OFFSETS)
    report = rig.cp.flush()
    assert any("head-state flush" in e for e in report.errors)
    assert rig.committer.committed == {} and rig.changelog.durable == []
    assert rig.committer.paused and rig.cp.waiting_for() == "changelog"
    rig.changelog.flush_fails = False
    rig.clock.now += rig.cp.retry_in()
    assert rig.cp.due() and rig.cp.flush().completed
    assert rig.committer.committed == OFFSETS
    assert rig.changelog.appends == 3
    rig.check_invariant()


def test_checkpoint_failed_commit_is_carried_to_the_next_one() -> None:
    """The micro-batch is durable (store and changelog): consumption goes on, the offsets
    are committed later, never lowered by an older micro-batch."""
    rig = Rig()
    rig.committer.fails = True
    rig.add(OFFSETS)
    report = rig.cp.flush()
    assert report.completed and not report.ok and not rig.cp.pending
    assert not rig.committer.paused and rig.cp.uncommitted == OFFSETS
    assert not rig.cp.due()
    rig.clock.now += rig.cp.retry_in()
    assert rig.cp.due()

    rig.add({0: 15})
    rig.committer.fails = False
    assert rig.cp.flush().completed
    assert rig.committer.committed == {0: 15, 1: 21, 2: 31} and rig.cp.uncommitted == {}
    rig.check_invariant()


def test_checkpoint_rows_of_unknown_owner_hold_back_every_partition() -> None:
    rig = Rig()
    stray = np.array([99_999], dtype=np.int64)  # no partition known for it
    rig.store.fail(stray)
    qids = np.concatenate([rig.queries(0), stray])
    rig.cp.add(rig.lists(qids), head_state=rig.state(rig.queries(0)), offsets={0: 5})
    rig.cp.flush()
    assert rig.committer.committed == {} and rig.changelog.appends == 0
    rig.store.heal()
    assert rig.cp.flush().completed and rig.committer.committed == {0: 5}


def test_checkpoint_head_exits_are_applied_before_the_commit() -> None:
    rig = Rig()
    rig.add({0: 1})
    rig.cp.flush()
    exited = rig.queries(0)[:4]
    rig.store.go_down()
    rig.cp.add(
        rig.lists(rig.queries(1)), exited=exited, head_state=rig.state(exited), offsets={0: 2}
    )
    report = rig.cp.flush()
    assert report.store_error is not None and rig.committer.committed == {0: 1}
    rig.store.heal()
    assert rig.cp.flush().completed and rig.committer.committed == {0: 2}
    assert rig.store.lookup(exited).found.all()  # expiring, readable until store.exit_ttl_s
    rig.store.clock = lambda: 2e9
    assert not rig.store.lookup(exited).found.any()
    assert rig.store.lookup(rig.queries(0)[4:]).found.all()


def test_checkpoint_revoke_flushes_once_then_drops_never_commits() -> None:
    rig = Rig()
    rig.store.fail(rig.queries(1)[:1])
    rig.store.fail(rig.queries(2)[:1])
    rig.add(OFFSETS)
    rig.cp.flush()
    assert rig.committer.committed == {0: 11}
    calls = rig.store.calls["upsert"]

    queries, _ = rig.cp.revoke([1], lost=False)
    assert rig.store.calls["upsert"] == calls + 1  # one more attempt before giving the partition up
    assert sorted(queries.tolist()) == sorted(rig.queries(1).tolist())
    assert 1 not in rig.committer.committed and 1 not in rig.changelog.offsets()
    assert rig.cp.partitions.of(rig.queries(1)).tolist() == [-1] * QUERIES_PER_PARTITION
    assert rig.cp.pending and rig.committer.paused  # partition 2 still not stored

    queries, _ = rig.cp.revoke([2], lost=True)
    assert rig.store.calls["upsert"] == calls + 1  # lost: nothing attempted
    assert len(queries) == QUERIES_PER_PARTITION
    assert not rig.cp.pending and not rig.committer.paused  # nothing of it left to make durable
    assert rig.committer.committed == {0: 11}
    rig.check_invariant()


def test_checkpoint_revoke_commits_what_became_durable() -> None:
    rig = Rig()
    rig.store.go_down()
    rig.add(OFFSETS)
    rig.cp.flush()
    rig.store.heal()
    rig.cp.revoke([2], lost=False)
    assert rig.committer.committed == OFFSETS and not rig.cp.pending
    rig.check_invariant()


def test_checkpoint_takes_one_micro_batch_at_a_time() -> None:
    rig = Rig()
    rig.add(OFFSETS)
    with pytest.raises(RuntimeError, match="already pending"):
        rig.add(OFFSETS)
    with pytest.raises(ValueError, match="head_state"):
        Checkpoint(rig.sink, rig.changelog).add(rig.lists(rig.queries(0)), offsets={0: 1})
    with pytest.raises(ValueError, match="retry_backoff"):
        Checkpoint(rig.sink, rig.changelog, backoff_s=0)


def test_checkpoint_writes_an_offset_only_record_for_partitions_without_rows() -> None:
    rig = Rig()
    rig.cp.add(rig.lists(rig.queries(0)), head_state=rig.state(rig.queries(0)), offsets={2: 9})
    assert rig.cp.flush().completed
    assert rig.changelog.offsets() == {0: -1, 2: 9} and rig.committer.committed == {2: 9}
    assert rig.changelog.queries(2) == set()


def test_query_partitions_forget_evicted_queries_amortised() -> None:
    qp = QueryPartitions()
    qp.observe(np.arange(5000), np.arange(5000) % 3)
    qp.prune(np.arange(100))
    assert qp.as_dict() == {q: q % 3 for q in range(100)}
    small = QueryPartitions()
    small.observe(np.arange(50), np.zeros(50))
    small.prune(np.arange(10))
    assert len(small) == 50  # under the threshold nothing is scanned
    assert qp.of([5, 7, 123_456]).tolist() == [2, 1, -1]
    assert sorted(qp.forget([1]).tolist()) == [q for q in range(100) if q % 3 == 1]


def test_checkpoint_positive_ttls_count_down_while_the_write_waits() -> None:
    """Retired lists are rewritten with their remaining exit TTL: a write delayed by a store
    outage must not extend it."""
    rig = Rig()
    wall = Clock()
    rig.store.clock = wall
    rig.cp = Checkpoint(rig.sink, rig.changelog, rig.committer, clock=rig.clock, wall_clock=wall)
    qids = rig.queries(0)[:3]
    rig.store.go_down()
    rig.cp.add(rig.lists(qids), ttl_s=np.array([100, -1, 0]))
    rig.cp.flush()
    wall.now += 30
    rig.store.heal()
    assert rig.cp.flush().completed
    wall.now += 69
    assert rig.store.lookup(qids).found.all()
    wall.now += 2
    assert rig.store.lookup(qids).found.tolist() == [False, True, True]
    with pytest.raises(ValueError, match="ttl_s has 1 rows"):
        rig.cp.add(rig.lists(qids), ttl_s=np.array([5]))


# ---- the results topic ---------------------------------------------------------------------


def _published_equals_stored(rig: Rig, query_ids: npt.NDArray[np.int64]) -> None:
    stored = rig.store.lookup(query_ids)
    for i, q in enumerate(query_ids.tolist()):
        record = rig.results.delivered[q]
        assert record is not None, f"query {q}: tombstone"
        np.testing.assert_array_equal(record.ids[0], stored.ids[i])
        np.testing.assert_array_equal(record.scores[0], stored.scores[i])
        assert record.versions[0] == stored.versions[i]


def test_checkpoint_publishes_results_after_the_store_and_before_the_changelog() -> None:
    rig = Rig(results=True)
    qids = rig.queries(0)
    rig.add(OFFSETS, exited=qids[:2])
    assert rig.cp.flush().completed
    assert rig.committer.committed == OFFSETS
    everyone = np.concatenate([rig.queries(p) for p in PARTITIONS])
    _published_equals_stored(rig, everyone[~np.isin(everyone, qids[:2])])
    assert rig.results.delivered[int(qids[0])] is None  # exited: a tombstone, after its list
    assert rig.results.log.index(f"{qids[0]}:tombstone") > rig.results.log.index(f"{qids[0]}:list")
    rig.check_invariant()


def test_checkpoint_results_not_delivered_hold_back_changelog_and_commit() -> None:
    rig = Rig(results=True)
    rig.results.flush_fails = True
    rig.add(OFFSETS)
    for _ in range(3):
        report = rig.cp.flush()
        assert any("results topic flush" in e for e in report.errors)
        assert rig.cp.waiting_for() == "results" and rig.committer.paused
        assert rig.changelog.appends == 0 and rig.committer.committed == {}
        rig.check_invariant()
        rig.clock.now += rig.cp.retry_in()
    assert rig.store.calls["upsert"] == 1  # stored once; only the delivery is retried
    rig.results.flush_fails = False
    assert rig.cp.flush().completed
    assert rig.committer.committed == OFFSETS
    _published_equals_stored(rig, np.concatenate([rig.queries(p) for p in PARTITIONS]))
    rig.check_invariant()


def test_checkpoint_publishes_only_stored_live_lists() -> None:
    """Rows the store refused, stale rows and retired lists (`publish` False) are not
    published, and none of them holds the micro-batch back."""
    rig = Rig(results=True)
    refused = rig.queries(2)[[0, 5]]
    rig.store.fail(refused, permanent=True, reason="result 13 record too big")
    qids = np.concatenate([rig.queries(p) for p in PARTITIONS])
    lists = rig.lists(qids)
    retired = np.zeros(len(qids), bool)
    retired[:3] = True
    rig.cp.add(lists, head_state=rig.state(qids), offsets=OFFSETS, publish=~retired)
    assert rig.cp.flush().completed and rig.committer.committed == OFFSETS
    assert set(rig.results.delivered) == set(qids[~retired].tolist()) - set(refused.tolist())
    # a replay of older versions: stale in the store, so not published again
    rig.version = -1  # version 0, below the stored 1
    rig.cp.add(rig.lists(qids[3:6]))
    rig.results.log.clear()
    assert rig.cp.flush().completed and rig.results.log == []


def test_checkpoint_revoke_drops_the_results_of_revoked_partitions() -> None:
    rig = Rig(results=True)
    rig.results.flush_fails = True
    rig.add(OFFSETS)
    rig.cp.flush()
    _, report = rig.cp.revoke([0, 1, 2], lost=False)
    assert report.completed and not rig.cp.pending
    assert rig.committer.committed == {} and rig.changelog.appends == 0
