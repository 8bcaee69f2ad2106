"""The delivery contract of a micro-batch as one object: store, results, changelog, commit.

A micro-batch's results become durable in this order, per engagement partition: the
changelog notes the queries entering the head set (so a crash between their first store write
and their head-state rows cannot leave live lists no restored head owns), the store holds the neighbour lists of the partition's queries and its head exits are applied, then
(with a results topic) the lists it stored and a tombstone per exit are delivered there, then
the partition's head-state changelog records are appended and flushed, then its engagement
offset is committed. A changelog record carries the offset it includes, and a new owner of
the partition resumes from it, so the record is itself a commit: nothing of a partition
reaches the changelog before the partition's store writes are done. No path (a retry, a
revoke, shutdown) commits an offset whose store writes and changelog records are not durable.

`flush()` makes at most one attempt at each step and never sleeps. What failed stays pending,
consumption stays paused, and the next attempt is `due()` after an exponential backoff, so
the caller keeps polling (heartbeats, rebalances) meanwhile. Lists the store refuses for good
are reported and count as done: they never block the rest of the micro-batch.

The collaborators are narrow Protocols (a list writer, a results log, a changelog, a
committer), so the
contract is tested without a broker or a store server (tests/unit/test_checkpoint.py). A
pending micro-batch's state is explicit (rows and exits left, partitions appended, flushed,
committed, dropped).

With `overlap`, the store step runs on a writer thread: `flush()` starts it and returns, so the
caller computes the next micro-batch meanwhile and may `add()` it (one, queued behind the
pending one while nothing failed: `accepts()`). The order is unchanged: the queued micro-batch
is written only once the pending one is complete (stored, published, logged, committed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from annstream.errors import StoreUnavailableError
from annstream.store.record import NeighbourLists, UpsertResult

__all__ = [
    "Changelog",
    "Checkpoint",
    "Committer",
    "FlushReport",
    "ListWriter",
    "QueryPartitions",
    "ResultsLog",
    "State",
]

logger = logging.getLogger(__name__)

State = dict[str, npt.NDArray[Any]]
Int64Array = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
UNKNOWN = -1
"""The partition of a query whose owner is not known: it holds back every partition."""


class ListWriter(Protocol):
    """One pass over the store per call (annstream.sink.NeighbourSink); `ttl_s` one TTL per
    row (None: the store's configured TTL)."""

    def write(self, lists: NeighbourLists, ttl_s: Int64Array | None = None) -> UpsertResult: ...

    def head_exits(self, query_ids: Int64Array) -> None: ...


class Changelog(Protocol):
    """The head-state changelog (consumers.head_state.HeadStateLog)."""

    def append(self, partition: int, state: State, engagement_offset: int) -> None: ...

    def note_entrants(self, partition: int, query_ids: Int64Array) -> None: ...

    def flush(self, timeout_s: float) -> None: ...


class ResultsLog(Protocol):
    """The results topic (annstream.results.ResultsPublisher): `publish` queues the stored
    lists and a tombstone per exited query, `flush` raises until all of them are delivered."""

    def publish(self, lists: NeighbourLists, exited: Int64Array) -> None: ...

    def flush(self, timeout_s: float) -> None: ...


class Committer(Protocol):
    """The engagement consumer: commits offsets (raises on failure), pauses and resumes."""

    def commit(self, offsets: dict[int, int]) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...


def _ids(values: npt.ArrayLike) -> Int64Array:
    return np.asarray(values, dtype=np.int64).reshape(-1)


class QueryPartitions:
    """The engagement partition each tracked query came from: the shard that owns it."""

    def __init__(self) -> None:
        self._owner: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._owner)

    def observe(self, query_ids: npt.ArrayLike, partitions: npt.ArrayLike) -> None:
        """Queries seen in events of these partitions (the last one wins)."""
        qids, parts = _ids(query_ids), _ids(partitions)
        self._owner.update(zip(qids.tolist(), parts.tolist(), strict=True))

    def assign(self, query_ids: npt.ArrayLike, partition: int) -> None:
        """Queries restored from the changelog of `partition`."""
        self._owner.update(dict.fromkeys(_ids(query_ids).tolist(), int(partition)))

    def of(self, query_ids: npt.ArrayLike) -> Int64Array:
        """The partition of each query, UNKNOWN (-1) where none was seen."""
        qids = _ids(query_ids).tolist()
        get = self._owner.get
        return np.fromiter((get(q, UNKNOWN) for q in qids), np.int64, len(qids))

    def queries(self, partition: int) -> Int64Array:
        """The queries owned through `partition` (what its head-state snapshot must hold)."""
        p = int(partition)
        return np.fromiter((q for q, o in self._owner.items() if o == p), np.int64)

    def forget(self, partitions: Iterable[int]) -> Int64Array:
        """Drop the queries of `partitions` (revoked); returns them."""
        gone = {int(p) for p in partitions}
        queries = [q for q, p in self._owner.items() if p in gone]
        for q in queries:
            del self._owner[q]
        return np.asarray(queries, dtype=np.int64)

    def prune(self, tracked: npt.ArrayLike) -> None:
        """Forget queries no longer tracked, only once the map is twice the tracked set
        (amortised), so memory stays bounded by heads.max_tracked."""
        keep_ids = _ids(tracked)
        n = len(self._owner)
        if n <= 2 * len(keep_ids) + 1024:
            return
        queries = np.fromiter(self._owner.keys(), np.int64, n)
        parts = np.fromiter(self._owner.values(), np.int64, n)
        keep = np.isin(queries, keep_ids)
        self._owner = dict(zip(queries[keep].tolist(), parts[keep].tolist(), strict=True))

    def as_dict(self) -> dict[int, int]:
        return dict(self._owner)


@dataclass(frozen=True)
class MicroBatch:
    """What one computed micro-batch must make durable. `ttl_s`: each list's TTL as of
    `added_s` (wall clock; positive TTLs count down until the row is written), or None."""

    lists: NeighbourLists
    exited: Int64Array
    changelog: dict[int, State]
    offsets: dict[int, int]
    event_time_ms: Int64Array
    ttl_s: Int64Array | None = None
    added_s: float = 0.0
    publish: BoolArray | None = None
    entrants: dict[int, Int64Array] = field(default_factory=dict)

    def ttls(self, rows: npt.NDArray[np.intp], now_s: float) -> Int64Array | None:
        """The TTL of `rows` if written at `now_s`: positive TTLs less the time waited."""
        if self.ttl_s is None:
            return None
        ttl = self.ttl_s[rows].copy()
        aging = ttl > 0
        ttl[aging] = np.maximum(1, ttl[aging] - int(max(0.0, now_s - self.added_s)))
        return ttl


@dataclass
class _Results:
    """The results-topic part of the pending micro-batch: rows to publish once stored, a
    tombstone per exit once applied; `handed` to the publisher, `delivered` once flushed."""

    rows: BoolArray
    exits: BoolArray
    stored: BoolArray
    handed_rows: BoolArray
    handed_exits: BoolArray
    delivered_rows: BoolArray
    delivered_exits: BoolArray

    @classmethod
    def of(cls, publish: BoolArray, exits: int) -> _Results:
        n = len(publish)
        return cls(
            rows=publish.copy(),
            exits=np.ones(exits, dtype=bool),
            stored=np.zeros(n, dtype=bool),
            handed_rows=np.zeros(n, dtype=bool),
            handed_exits=np.zeros(exits, dtype=bool),
            delivered_rows=np.zeros(n, dtype=bool),
            delivered_exits=np.zeros(exits, dtype=bool),
        )

    def undelivered(self, exits_left: BoolArray) -> tuple[BoolArray, BoolArray]:
        """Rows stored and exits applied whose records are not delivered yet."""
        return (
            self.rows & self.stored & ~self.delivered_rows,
            self.exits & ~exits_left & ~self.delivered_exits,
        )

    def drop(self, rows: BoolArray, exits: BoolArray) -> None:
        self.rows &= ~rows
        self.exits &= ~exits


@dataclass
class _Pending:
    """The progress of the pending micro-batch through the contract, per row and partition."""

    batch: MicroBatch
    row_partition: Int64Array
    exit_partition: Int64Array
    rows_left: BoolArray
    exits_left: BoolArray
    appended: set[int] = field(default_factory=set)
    flushed: set[int] = field(default_factory=set)
    committed: set[int] = field(default_factory=set)
    dropped: set[int] = field(default_factory=set)
    store_reported: bool = False
    results: _Results | None = None
    noted: bool = False

    def store_blocked(self) -> set[int]:
        """Partitions whose store (or results) part is not done (UNKNOWN in it: every
        partition)."""
        left = self.row_partition[self.rows_left].tolist()
        left += self.exit_partition[self.exits_left].tolist()
        if self.results is not None:
            rows, exits = self.results.undelivered(self.exits_left)
            left += self.row_partition[rows].tolist() + self.exit_partition[exits].tolist()
        return set(left)

    def store_done(self) -> bool:
        return not self.rows_left.any() and not self.exits_left.any()

    def to_append(self) -> list[int]:
        blocked = self.store_blocked()
        if UNKNOWN in blocked:
            return []
        skip = self.appended | self.dropped | blocked
        return [p for p in sorted(self.batch.changelog) if p not in skip]

    def to_commit(self) -> dict[int, int]:
        blocked = self.store_blocked()
        if UNKNOWN in blocked:
            return {}
        return {
            p: o
            for p, o in sorted(self.batch.offsets.items())
            if p in self.flushed and p not in blocked and p not in self.committed | self.dropped
        }

    def complete(self) -> bool:
        live_log = set(self.batch.changelog) - self.dropped
        live_offsets = set(self.batch.offsets) - self.dropped
        delivered = self.results is None or not any(
            m.any() for m in self.results.undelivered(self.exits_left)
        )
        return (
            self.store_done()
            and delivered
            and live_log <= self.flushed
            and live_offsets <= self.committed
        )


@dataclass(frozen=True)
class _StoreJob:
    """One store step: the rows left (and their lists and TTLs), then the exits left."""

    pending: _Pending
    rows: npt.NDArray[np.intp]
    lists: NeighbourLists | None
    ttl_s: Int64Array | None
    exit_rows: npt.NDArray[np.intp]


@dataclass
class _StoreOutcome:
    """What the store said; filled on the writer thread, read by `flush()`."""

    result: UpsertResult | None = None
    unavailable: StoreUnavailableError | None = None
    exits_unavailable: StoreUnavailableError | None = None
    exits_done: bool = False
    error: BaseException | None = None
    finished_s: float = 0.0


@dataclass
class FlushReport:
    """What one `flush()` achieved; the caller turns it into metrics and logs."""

    stored_ids: Int64Array = field(default_factory=lambda: np.empty(0, np.int64))
    stored_versions: Int64Array = field(default_factory=lambda: np.empty(0, np.int64))
    refused: dict[int, str] = field(default_factory=dict)
    store_asked: bool = False
    store_error: str | None = None
    stored_batch: MicroBatch | None = None
    stored_at_s: float = 0.0
    completed: bool = False
    committed: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.store_error is None and not self.errors


class Checkpoint:
    """The pending micro-batch, the query -> partition map and the commit sequence."""

    def __init__(
        self,
        writer: ListWriter,
        changelog: Changelog,
        committer: Committer | None = None,
        *,
        backoff_s: float = 0.2,
        backoff_max_s: float = 10.0,
        flush_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        results: ResultsLog | None = None,
        overlap: bool = False,
    ) -> None:
        if backoff_s <= 0 or backoff_max_s < backoff_s:
            raise ValueError(
                f"store.retry_backoff_s ({backoff_s}) must be > 0 and at most "
                f"store.retry_backoff_max_s ({backoff_max_s})"
            )
        self.writer = writer
        self.changelog = changelog
        self.committer = committer
        self.results = results
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.flush_timeout_s = flush_timeout_s
        self.partitions = QueryPartitions()
        self._clock = clock
        self._wall_clock = wall_clock
        self._pending: _Pending | None = None
        self._next: _Pending | None = None
        self._writer = ThreadPoolExecutor(1, "annstream-store-write") if overlap else None
        self._writing: tuple[_StoreJob, Future[_StoreOutcome]] | None = None
        self._uncommitted: dict[int, int] = {}
        self._delay = 0.0
        self._retry_at = 0.0
        self._paused = False
        self.failing_since: float | None = None
        self.last_error = ""

    # ---- state -------------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """A micro-batch is not durable yet: compute no other, keep consumption paused."""
        return self._pending is not None

    @property
    def uncommitted(self) -> dict[int, int]:
        """Offsets of durable micro-batches whose commit failed (retried with the next)."""
        return dict(self._uncommitted)

    @property
    def writing(self) -> bool:
        """A store write runs on the writer thread (`wait()` for it)."""
        return self._writing is not None and not self._writing[1].done()

    def accepts(self) -> bool:
        """`add()` may take a micro-batch now: none is pending, or (overlap) one is and nothing
        is queued behind it and no step failed."""
        if self._pending is None:
            return True
        return self._writer is not None and self._next is None and self.failing_since is None

    def wait(self, timeout_s: float) -> None:
        """Block until the running store write finished, at most `timeout_s`."""
        if self._writing is not None and timeout_s > 0:
            wait_for([self._writing[1]], timeout_s)

    def due(self) -> bool:
        """Something to retry or a finished store write to take, and its backoff has passed."""
        work = self._pending is not None or bool(self._uncommitted)
        return work and not self.writing and self._clock() >= self._retry_at

    def close(self) -> None:
        """Stop the writer thread once its write finished."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)

    def retry_in(self) -> float:
        return max(0.0, self._retry_at - self._clock())

    def waiting_for(self) -> str:
        """The step the pending micro-batch waits for ('' when none is pending)."""
        p = self._pending
        if p is None:
            return ""
        if not p.noted:
            return "changelog"
        if not p.store_done():
            return "store"
        if p.results is not None and any(m.any() for m in p.results.undelivered(p.exits_left)):
            return "results"
        if set(p.batch.changelog) - p.dropped - p.flushed:
            return "changelog"
        return "commit"

    # ---- the contract ------------------------------------------------------------------

    def add(
        self,
        lists: NeighbourLists,
        *,
        exited: npt.ArrayLike = (),
        head_state: State | None = None,
        offsets: Mapping[int, int] | None = None,
        event_time_ms: npt.ArrayLike = (),
        ttl_s: npt.ArrayLike | None = None,
        publish: npt.ArrayLike | None = None,
        entered: npt.ArrayLike = (),
    ) -> None:
        """Take a computed micro-batch: its lists (with a TTL per row, or None for the store's
        own), the queries that left the head set, the head-state rows it changed and the next
        engagement offset per partition it covers. `publish`: the rows that go to the results
        topic once stored (None: all; retired lists do not). `entered`: the queries that
        entered the head set (noted in the changelog before the store write)."""
        if not self.accepts():
            raise RuntimeError(
                "a micro-batch is already pending: flush() it (accepts()) before adding one"
            )
        offsets = {int(p): int(o) for p, o in (offsets or {}).items()}
        if offsets and head_state is None:
            raise ValueError("offsets need the head state they include (head_state)")
        exits = _ids(exited)
        entrants = _ids(entered)
        owner = self.partitions.of(entrants)
        batch = MicroBatch(
            lists=lists,
            exited=exits,
            changelog=self._split(head_state, offsets),
            offsets=offsets,
            event_time_ms=_ids(event_time_ms),
            ttl_s=None if ttl_s is None else _ids(ttl_s),
            added_s=self._wall_clock(),
            publish=None if publish is None else np.asarray(publish, dtype=bool).reshape(-1),
            entrants={q: entrants[owner == q] for q in set(owner.tolist()) - {UNKNOWN}},
        )
        if batch.ttl_s is not None and len(batch.ttl_s) != len(lists):
            raise ValueError(f"ttl_s has {len(batch.ttl_s)} rows, the lists {len(lists)}")
        if batch.publish is not None and len(batch.publish) != len(lists):
            raise ValueError(f"publish has {len(batch.publish)} rows, the lists {len(lists)}")
        pending = _Pending(
            batch=batch,
            row_partition=self.partitions.of(lists.query_ids),
            exit_partition=self.partitions.of(exits),
            rows_left=np.ones(len(lists), dtype=bool),
            exits_left=np.ones(len(exits), dtype=bool),
            noted=not batch.entrants,
            results=None
            if self.results is None
            else _Results.of(
                np.ones(len(lists), bool) if batch.publish is None else batch.publish, len(exits)
            ),
        )
        if self._pending is None:
            self._pending = pending
        else:
            self._next = pending

    def _split(self, state: State | None, offsets: Mapping[int, int]) -> dict[int, State]:
        """The head-state rows per owner partition, plus an empty record for each partition
        with an offset but no rows (the offset header alone moves its resume point)."""
        if state is None:
            return {}
        owner = self.partitions.of(state["query_ids"])
        parts = sorted((set(owner.tolist()) | set(offsets)) - {UNKNOWN})
        return {p: {k: v[owner == p] for k, v in state.items()} for p in parts}

    def flush(self, wait_s: float = 0.0) -> FlushReport:
        """One attempt at every step still open; never sleeps (but waits up to `wait_s` for a
        running store write), never raises for a step that failed (a store configuration
        error does raise). Once the pending micro-batch is complete, the queued one becomes
        pending and its store write starts."""
        report = FlushReport()
        hint = 0.0
        p = self._pending
        if p is not None:
            if self._note(p, report):
                hint = self._store(p, report, wait_s)
            self._publish(p, report)
            self._append(p, report)
            self._flush_changelog(p, report)
            for part, offset in p.to_commit().items():
                p.committed.add(part)
                self._uncommitted[part] = max(offset, self._uncommitted.get(part, offset))
        if self._uncommitted:
            self._commit(report)
        if p is not None and p.complete():
            self._pending, self._next = self._next, None
            report.completed = True
            nxt = self._pending
            if nxt is not None and self._writer is not None and self._note(nxt, report):
                self._start(nxt)
        self._settle(report, hint)
        return report

    def _note(self, p: _Pending, report: FlushReport) -> bool:
        """Before the micro-batch's first store write: its entering queries are durable in the
        changelog. Their head-state rows follow the store write, so without this a crash in
        between restores no head that owns their live lists (consumers.head_state)."""
        if not p.noted:
            try:
                for part, ids in p.batch.entrants.items():
                    self.changelog.note_entrants(part, ids)
                if p.batch.entrants:
                    self.changelog.flush(self.flush_timeout_s)
            except Exception as exc:
                report.errors.append(f"head-state entrants: {exc!r}")
                return False
            p.noted = True
        return True

    def _job(self, p: _Pending) -> _StoreJob | None:
        """The store step still open for `p`, or None when its store part is done."""
        if not (p.rows_left.any() or p.exits_left.any()):
            return None
        rows = np.flatnonzero(p.rows_left)
        lists = p.batch.lists.take(rows) if len(rows) else None
        ttls = p.batch.ttls(rows, self._wall_clock()) if len(rows) else None
        return _StoreJob(p, rows, lists, ttls, np.flatnonzero(p.exits_left))

    def _run(self, job: _StoreJob) -> _StoreOutcome:
        """The store I/O of one step (on the writer thread with `overlap`): one write of the
        rows, then the head exits unless the store could not be reached."""
        out = _StoreOutcome()
        try:
            if job.lists is not None:
                try:
                    out.result = self.writer.write(job.lists, job.ttl_s)
                except StoreUnavailableError as exc:
                    out.unavailable = exc
                    return out
            if len(job.exit_rows):
                try:
                    self.writer.head_exits(job.pending.batch.exited[job.exit_rows])
                    out.exits_done = True
                except StoreUnavailableError as exc:
                    out.exits_unavailable = exc
        except BaseException as exc:
            out.error = exc
        finally:
            out.finished_s = self._wall_clock()
        return out

    def _start(self, p: _Pending) -> None:
        job = self._job(p)
        if job is not None and self._writing is None and self._writer is not None:
            self._writing = (job, self._writer.submit(self._run, job))

    def _store(self, p: _Pending, report: FlushReport, wait_s: float = 0.0) -> float:
        """The store step: one write of the rows left, then the head exits (inline, or taken
        from the writer thread once it finished); returns the store's retry hint."""
        if self._writer is None:
            job = self._job(p)
            if job is None:
                return self._stored(p, report, 0.0)
            return self._taken(job, self._run(job), report)
        if self._writing is None:
            self._start(p)
            if self._writing is None:
                return self._stored(p, report, 0.0)
        job, future = self._writing
        if not future.done():
            self.wait(wait_s)
            if not future.done():
                return 0.0
        self._writing = None
        return self._taken(job, future.result(), report)

    def _taken(self, job: _StoreJob, out: _StoreOutcome, report: FlushReport) -> float:
        """Book what one store step achieved into its micro-batch."""
        p = job.pending
        report.store_asked = True
        if out.error is not None:
            raise out.error
        if out.unavailable is not None:
            report.store_error = str(out.unavailable)
            return out.unavailable.retry_after
        if job.lists is not None and out.result is not None:
            rows, lists, result = job.rows, job.lists, out.result
            done = result.stored | result.stale
            if p.results is not None:
                p.results.stored[rows[result.stored]] = True
            refused = np.zeros_like(done) if result.permanent is None else result.permanent & ~done
            p.rows_left[rows[done | refused]] = False
            report.stored_ids = lists.query_ids[done]
            report.stored_versions = lists.versions[done]
            for r in np.flatnonzero(refused).tolist():
                report.refused[int(lists.query_ids[r])] = result.errors.get(r, "refused")
            if p.rows_left.any():
                first = next(iter(result.errors.values()), "no reason given")
                report.store_error = (
                    f"{int(p.rows_left.sum())} of {len(p.rows_left)} neighbour lists not "
                    f"stored: {first}"
                )
        if out.exits_unavailable is not None:
            report.store_error = f"head exits not applied: {out.exits_unavailable}"
            return out.exits_unavailable.retry_after
        if out.exits_done:
            p.exits_left[job.exit_rows] = False
        return self._stored(p, report, out.finished_s)

    def _stored(self, p: _Pending, report: FlushReport, at_s: float) -> float:
        if p.store_done() and not p.store_reported:
            p.store_reported = True
            report.stored_batch = p.batch
            report.stored_at_s = at_s or self._wall_clock()
        return 0.0

    def _publish(self, p: _Pending, report: FlushReport) -> None:
        """Hand the newly stored lists and applied exits to the results topic, then one flush;
        what was not delivered is flushed again by the next attempt."""
        r = p.results
        if r is None or self.results is None:
            return
        rows = np.flatnonzero(r.rows & r.stored & ~r.handed_rows)
        exits = np.flatnonzero(r.exits & ~p.exits_left & ~r.handed_exits)
        if len(rows) or len(exits):
            try:
                self.results.publish(p.batch.lists.take(rows), p.batch.exited[exits])
            except Exception as exc:
                report.errors.append(f"results topic publish: {exc!r}")
                return
            r.handed_rows[rows] = True
            r.handed_exits[exits] = True
        if (
            not (r.handed_rows & ~r.delivered_rows).any()
            and not (r.handed_exits & ~r.delivered_exits).any()
        ):
            return
        try:
            self.results.flush(self.flush_timeout_s)
        except Exception as exc:
            report.errors.append(f"results topic flush: {exc!r}")
            return
        r.delivered_rows |= r.handed_rows
        r.delivered_exits |= r.handed_exits

    def _append(self, p: _Pending, report: FlushReport) -> None:
        for part in p.to_append():
            try:
                self.changelog.append(
                    part, p.batch.changelog[part], p.batch.offsets.get(part, UNKNOWN)
                )
            except Exception as exc:
                report.errors.append(f"head-state append for partition {part}: {exc!r}")
                continue
            p.appended.add(part)

    def _flush_changelog(self, p: _Pending, report: FlushReport) -> None:
        unflushed = p.appended - p.flushed
        if not unflushed:
            return
        try:
            self.changelog.flush(self.flush_timeout_s)
        except Exception as exc:
            report.errors.append(f"head-state flush: {exc!r}")
            return
        p.flushed |= unflushed

    def _commit(self, report: FlushReport) -> None:
        if self.committer is None:
            return
        offsets = dict(self._uncommitted)
        try:
            self.committer.commit(offsets)
        except Exception as exc:
            report.errors.append(f"engagement offset commit: {exc!r}")
            return
        for part, offset in offsets.items():
            if self._uncommitted.get(part) == offset:
                del self._uncommitted[part]
        report.committed = offsets

    def _settle(self, report: FlushReport, hint: float) -> None:
        """Back off and pause after a failed step; reset and resume once durable (a store
        write still running taught nothing yet)."""
        if report.ok and self._writing is not None and not report.store_asked:
            return
        if report.ok:
            self._delay = 0.0
            self._retry_at = 0.0
            self.failing_since = None
        else:
            self._delay = (
                self.backoff_s if self._delay == 0 else min(2 * self._delay, self.backoff_max_s)
            )
            wait = min(max(self._delay, hint), self.backoff_max_s)
            self._retry_at = self._clock() + wait
            self.failing_since = self.failing_since or self._clock()
            self.last_error = report.store_error or report.errors[0]
            logger.warning(
                "micro-batch not durable yet (waiting for %s), retrying in %.1fs: %s",
                self.waiting_for() or "commit",
                wait,
                "; ".join(([report.store_error] if report.store_error else []) + report.errors),
            )
        if self._pending is not None and not report.ok:
            self._pause()
        elif self._pending is None:
            self._resume()

    def _pause(self) -> None:
        if not self._paused and self.committer is not None:
            self.committer.pause()
            self._paused = True

    def _resume(self) -> None:
        if self._paused and self.committer is not None:
            self.committer.resume()
        self._paused = False

    # ---- rebalances --------------------------------------------------------------------

    @staticmethod
    def _drop(p: _Pending, gone: set[int]) -> None:
        """Forget what `p` still had to do for partitions owned elsewhere now."""
        rows_gone = np.isin(p.row_partition, list(gone))
        exits_gone = np.isin(p.exit_partition, list(gone))
        p.rows_left &= ~rows_gone
        p.exits_left &= ~exits_gone
        if p.results is not None:
            p.results.drop(rows_gone, exits_gone)
        p.dropped |= gone & (set(p.batch.changelog) | set(p.batch.offsets))

    def revoke(self, partitions: Iterable[int], lost: bool) -> tuple[Int64Array, FlushReport]:
        """Partitions now owned elsewhere: a revoke gets one more flush (waiting for a running
        store write; a lost partition none), then whatever of them is still not durable, in
        the pending and the queued micro-batch, is dropped, never committed; the new owner
        re-reads those events. Returns the queries those partitions owned."""
        gone = {int(x) for x in partitions}
        report = FlushReport()
        if self._next is not None:
            self._drop(self._next, gone)  # before the flush can start its write
        if not lost and (self._pending is not None or self._uncommitted):
            report = self.flush(wait_s=self.flush_timeout_s)
        for p in (self._pending, self._next):
            if p is not None:
                self._drop(p, gone)
        if self._next is not None and self._next.complete():
            self._next = None
        if self._pending is not None and self._pending.complete():
            self._pending, self._next = self._next, None
            report.completed = True
            if self._pending is None:
                self._resume()
        for part in gone:
            self._uncommitted.pop(part, None)
        return self.partitions.forget(gone), report
