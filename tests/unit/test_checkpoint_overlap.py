"""Checkpoint(overlap=True): the store write runs on a writer thread while the caller computes
the next micro-batch, which waits queued behind the pending one; commits keep their order and
still wait for the store. The real NeighbourSink over an InMemoryStore, a gate on its writes."""

from __future__ import annotations

import threading

import numpy as np
import numpy.typing as npt
import pytest

from annstream.checkpoint import Checkpoint, State
from annstream.config import StoreConfig
from annstream.sink import NeighbourSink
from annstream.store.memory import InMemoryStore
from annstream.store.record import NeighbourLists, UpsertResult

K, MARGIN = 10, 2
QUERIES = {0: np.arange(100, 110, dtype=np.int64), 1: np.arange(200, 210, dtype=np.int64)}


class GatedWriter:
    """The sink, except that each write waits for `open_gate()` (the writer thread blocks)."""

    def __init__(self, sink: NeighbourSink) -> None:
        self.sink = sink
        self.gate = threading.Event()
        self.started = threading.Semaphore(0)
        self.order: list[int] = []

    def write(
        self, lists: NeighbourLists, ttl_s: npt.NDArray[np.int64] | None = None
    ) -> UpsertResult:
        self.started.release()
        assert self.gate.wait(10)
        self.order.append(int(lists.versions[0]))
        return self.sink.write(lists, ttl_s)

    def head_exits(self, query_ids: npt.NDArray[np.int64]) -> None:
        self.sink.head_exits(query_ids)


class Log:
    def __init__(self) -> None:
        self.durable: list[tuple[int, int]] = []

    def append(self, partition: int, state: State, engagement_offset: int) -> None:
        self.durable.append((partition, engagement_offset))

    def flush(self, timeout_s: float) -> None:
        pass


class Committer:
    def __init__(self) -> None:
        self.commits: list[dict[int, int]] = []

    def commit(self, offsets: dict[int, int]) -> None:
        self.commits.append(dict(offsets))

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[Checkpoint, GatedWriter, InMemoryStore, Committer]:
    store = InMemoryStore(StoreConfig(url="memory://"))
    writer = GatedWriter(NeighbourSink(store, store.cfg))
    committer = Committer()
    cp = Checkpoint(writer, Log(), committer, clock=Clock(), overlap=True, backoff_s=0.2)
    for p, qids in QUERIES.items():
        cp.partitions.observe(qids, np.full(len(qids), p))
    return cp, writer, store, committer


def add(cp: Checkpoint, version: int, offset: int) -> None:
    qids = np.concatenate(list(QUERIES.values()))
    n = len(qids)
    lists = NeighbourLists(
        query_ids=qids,
        ids=np.tile(np.arange(K + MARGIN, dtype=np.int64), (n, 1)) + version,
        scores=np.zeros((n, K + MARGIN), dtype=np.float32),
        versions=np.full(n, version, dtype=np.int64),
        computed_at_ms=np.zeros(n, dtype=np.int64),
        k=K,
    )
    state = {"query_ids": qids, "scores": np.zeros(n, dtype=np.float32)}
    cp.add(lists, head_state=state, offsets={0: offset, 1: offset})


def test_the_write_runs_behind_and_the_next_micro_batch_queues_in_order() -> None:
    cp, writer, store, committer = make()
    add(cp, version=1, offset=10)
    report = cp.flush()  # starts the write, returns at once
    assert writer.started.acquire(timeout=5) and cp.writing and not report.completed
    assert committer.commits == [] and not cp.due()
    assert cp.accepts()
    add(cp, version=2, offset=20)  # computed meanwhile, queued
    assert not cp.accepts()
    with pytest.raises(RuntimeError, match="already pending"):
        add(cp, version=3, offset=30)
    writer.gate.set()
    cp.wait(5)
    report = cp.flush()  # takes micro-batch 1's write, commits it, starts micro-batch 2's
    assert report.completed and report.stored_at_s > 0
    assert committer.commits == [{0: 10, 1: 10}] and cp.pending
    cp.wait(5)
    report = cp.flush(wait_s=5)
    assert report.completed and not cp.pending and cp.accepts()
    assert writer.order == [1, 2] and committer.commits[-1] == {0: 20, 1: 20}
    assert (store.lookup(QUERIES[0]).versions == 2).all()
    cp.close()


def test_a_failed_write_holds_the_queue_and_backs_off() -> None:
    cp, writer, store, committer = make()
    writer.gate.set()
    store.go_down("connection refused")
    add(cp, version=1, offset=10)
    report = cp.flush(wait_s=5)
    assert report.store_error is not None and "connection refused" in report.store_error
    assert not cp.accepts() and not cp.due()  # failing: nothing more is computed
    waits = [cp.retry_in()]
    for _ in range(2):
        cp._clock.now += cp.retry_in()  # type: ignore[attr-defined]
        assert cp.flush(wait_s=5).store_error is not None  # retried on the writer thread
        waits.append(cp.retry_in())
    assert waits == pytest.approx([0.2, 0.4, 0.8])  # the backoff still doubles
    store.heal()
    cp._clock.now += cp.retry_in()  # type: ignore[attr-defined]
    report = cp.flush(wait_s=5)
    assert report.completed and not cp.pending and committer.commits == [{0: 10, 1: 10}]
    cp.close()


def test_revoke_waits_for_the_write_and_drops_the_queued_micro_batch_of_the_partition() -> None:
    cp, writer, store, committer = make()
    add(cp, version=1, offset=10)
    cp.flush()
    add(cp, version=2, offset=20)
    writer.gate.set()
    queries, report = cp.revoke([1], lost=False)
    assert set(queries.tolist()) == set(QUERIES[1].tolist())
    assert report.completed and committer.commits == [{0: 10, 1: 10}]
    cp.flush(wait_s=5)
    cp.wait(5)
    cp.flush(wait_s=5)
    assert not cp.pending and committer.commits[-1] == {0: 20}
    assert (store.lookup(QUERIES[1]).versions == 1).all()  # partition 1's lists left alone
    cp.close()
