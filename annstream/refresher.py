"""The incremental refresher: keeps every head query's K + margin list fresh, micro-batch by
micro-batch.

Each head query keeps K + margin neighbours in the index's search order (score, ties by id), a
valid-prefix length `c` (the first `c` entries are exactly the best `c` ads its IVF probe lists
hold; a -1 inside the prefix means "no more ads"; entries past it are -1 padding) and its probe
lists. A CSR table lists, per IVF list, the head queries probing it (the routes).

One micro-batch (`Refresher.apply`), on two threads in step 1:
1. the net ad changes (`AdChanges`, trusted) are prepared and assigned to their IVF list once;
   a background thread applies them to the index (one remove call, one add call); meanwhile
   each new ad is scored against the head queries routed from its list, keeping the pairs
   that may beat the query's last valid score (`refresh_kernels.route_candidates`, then scored
   again with the kernel the index's search uses), and the rows holding a removed ad (deletes
   and the old version of updates) are found (`rows_holding`);
2. one pass over the affected rows (`update_rows`) removes the removed ads and merges the
   candidates that still beat the (possibly raised) last valid score, in place, and says
   which rows changed; a row whose valid prefix falls below K, or that gets more than
   `scan_k` candidates, is left for a full search;
3. new head queries, changed query vectors and the rows of step 2 get a full search; after a
   retrain (index version changed) every head query is recomputed, at most
   `full_recompute_per_batch` per micro-batch (`pending_full` shows the progress), and until
   then keeps receiving inserts and deletes routed by the new quantizer;
4. every list whose stored content changed (any id, order or score of the K + margin) is
   returned, once, plus new and changed queries: the whole stored list is the contract, so a
   list is never left holding a deleted ad or a stale score, even in its margin.

Retired lists: the store keeps the list of a query that left the head set readable until its
exit TTL. The refresher keeps those lists (ids, scores, expiry; no vector, no routing) and
removes deleted and re-embedded ads from them, returning them for a rewrite with their
remaining TTL (`RefreshResult.retired`); nothing enters them, so they only get shorter.

Exactness rests on the quantizer: an ad can only enter the result of a query that probes the
ad's list, so after a retrain everything is recomputed. Scores of routed ads are computed with
the kernel the index's search uses, from the vectors it holds (decoded codes under IVFPQ).

Memory per head query: its prepared vector (4d bytes), probe lists and routes (8 bytes per
probe), the list (12 bytes per entry) and ~20 bytes of bookkeeping. Slots of departed queries
are reused, and the arrays shrink when three quarters are free.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from annstream import idmap, refresh_kernels
from annstream.config import RefreshConfig
from annstream.events import AdChanges
from annstream.heads import HeadChanges
from annstream.index import LiveIvfIndex
from annstream.refresh_kernels import (
    ROW_CHANGED,
    ROW_OVERFLOW,
    ROW_UNDERFLOW,
    build_routes,
    compact_rows,
    group_rows,
    held_entries,
    route_candidates,
    rows_holding,
    update_rows,
)

__all__ = [
    "RETIRED_GRACE_S",
    "AdChanges",
    "MicroBatcher",
    "RefreshResult",
    "Refresher",
    "RetiredLists",
    "warm_up",
]

logger = logging.getLogger(__name__)

Int64Array = npt.NDArray[np.int64]
Float32Array = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]
VectorLookup = Callable[[Int64Array], npt.ArrayLike]

_FILTER_TOL = 1e-4
_MIN_SLOTS = 1024
_PROBE_CHUNK = 16_384
_NEVER = np.iinfo(np.int64).max
# A retired list is kept this long past its expiry: the store's TTL starts when the micro-batch
# is written, a little after the refresher computed it, and a late delete must still reach it.
RETIRED_GRACE_S = 600

_warm = False


def warm_up() -> None:
    """Load the compiled kernels (compiling them once per machine) before the first
    micro-batch, so no freshness figure pays for it. `Refresher()` calls it."""
    global _warm
    if not _warm:
        idmap.warm_up()
        refresh_kernels.warm_up()
        _warm = True


def _empty_ids() -> Int64Array:
    return np.empty(0, dtype=np.int64)


class _AsIs:
    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        pass


class _OneThread:
    """Faiss (OpenMP) on one thread in this block: the refresher's per-batch calls are small,
    and on a busy machine waking a second thread costs more than it saves."""

    def __enter__(self) -> None:
        self._was = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        faiss.omp_set_num_threads(self._was)


@dataclass(frozen=True)
class RetiredLists:
    """Lists of queries that left the head set, to rewrite with their remaining TTL.

    They lost ads deleted or re-embedded since (nothing enters them, so they may be shorter,
    padded with -1 / -inf, or empty when evicted). `ttl_s` is each row's remaining TTL in
    seconds as of the micro-batch (at least 1; the configured exit TTL itself when it is not
    positive), `expires_at_ms` the wall-clock expiry the refresher keeps (-1: none).
    """

    query_ids: Int64Array
    ids: Int64Array
    scores: Float32Array
    ttl_s: Int64Array
    expires_at_ms: Int64Array

    @classmethod
    def empty(cls, width: int) -> RetiredLists:
        return cls(
            _empty_ids(),
            np.empty((0, width), dtype=np.int64),
            np.empty((0, width), dtype=np.float32),
            _empty_ids(),
            _empty_ids(),
        )

    def __len__(self) -> int:
        return len(self.query_ids)


@dataclass(frozen=True)
class RefreshResult:
    """Head queries whose stored list changed: K + margin neighbours each, -1 / -inf padded.

    Every row is the whole list to store (entries past a query's valid prefix are padding).
    `retired`: lists of queries that left the head set, rewritten with a per-row TTL.
    """

    query_ids: Int64Array
    ids: Int64Array
    scores: Float32Array
    version: int
    stats: dict[str, float | int]
    retired: RetiredLists = field(default_factory=lambda: RetiredLists.empty(0))


class MicroBatcher:
    """Time-or-count trigger: a micro-batch is due every `batch_ms` or `batch_events`.

    Under load the batch grows by itself (what arrived while the last one was processed).
    Catching up (`lag`, the events still waiting in the topics, above `batch_events`; or
    `behind_ms`, the age of the oldest event waiting, at least `refresh.catch_up_behind_ms`:
    a backfill, a restart), the batch grows up to `catch_up_events` or `catch_up_ms`, or until
    a poll found nothing more (`drained`): the refresher then writes each changed list once per
    larger batch instead of once per `batch_events` (at 50,000 head queries, 50,000-ad
    batches wrote 1 list per ad where 5,000-ad batches wrote 8.7; `bench scale` catch-up).
    """

    def __init__(
        self,
        cfg: RefreshConfig,
        now_ms: float | None = None,
        *,
        catch_up_events: int | None = None,
        catch_up_ms: float | None = None,
    ) -> None:
        if cfg.batch_ms <= 0 or cfg.batch_events <= 0:
            raise ValueError(
                f"refresh.batch_ms ({cfg.batch_ms}) and refresh.batch_events "
                f"({cfg.batch_events}) must be positive"
            )
        self.batch_ms = float(cfg.batch_ms)
        self.batch_events = int(cfg.batch_events)
        events = cfg.catch_up_events if catch_up_events is None else catch_up_events
        self.catch_up_events = max(int(events), self.batch_events)
        self.catch_up_ms = max(
            float(cfg.catch_up_ms if catch_up_ms is None else catch_up_ms), self.batch_ms
        )
        self.catch_up_behind_ms = float(cfg.catch_up_behind_ms)
        self.events = 0
        self.started_ms = self._now(now_ms)

    @staticmethod
    def _now(now_ms: float | None) -> float:
        return time.monotonic() * 1000.0 if now_ms is None else float(now_ms)

    def add(self, n_events: int) -> None:
        self.events += int(n_events)

    def catching_up(self, lag: int = 0, behind_ms: float = 0.0, drained: bool = False) -> bool:
        """Far enough behind that a larger batch pays (see the class docstring)."""
        if lag > self.batch_events:
            return True
        far = 0 < self.catch_up_behind_ms <= behind_ms
        return far and not drained

    def due(
        self,
        now_ms: float | None = None,
        lag: int = 0,
        behind_ms: float = 0.0,
        drained: bool = False,
    ) -> bool:
        """True once `batch_events` were added or `batch_ms` passed since the last reset;
        catching up, once the catch-up bounds are reached or the backlog is drained."""
        elapsed = self._now(now_ms) - self.started_ms
        if not self.catching_up(lag, behind_ms, drained):
            return self.events >= self.batch_events or elapsed >= self.batch_ms
        return self.events >= self.catch_up_events or elapsed >= self.catch_up_ms

    def remaining_ms(self, now_ms: float | None = None) -> float:
        """How long to wait (poll timeout) before the batch is due by time."""
        return max(0.0, self.batch_ms - (self._now(now_ms) - self.started_ms))

    def reset(self, now_ms: float | None = None) -> None:
        self.events = 0
        self.started_ms = self._now(now_ms)


_F32_EMPTY = np.empty(0, dtype=np.float32)


@dataclass
class _AdPlan:
    """A micro-batch's ad changes, prepared once; `removed`: live ids that leave. `lists`
    (the new ads' IVF lists) and `screen` are set by the owner thread, then `ready`."""

    ids: Int64Array
    x: Float32Array
    delete_ids: Int64Array
    removed: Int64Array
    lists: Int64Array = field(default_factory=_empty_ids)
    screen: _Screen | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    aborted: bool = False


class _Background:
    """Runs one call in a thread (Faiss and large numpy operations release the GIL)."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._fn, self._args = fn, args
        self._out: Any = None
        self._err: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="refresher-scan", daemon=True)

    def _run(self) -> None:
        try:
            # one core for the scan, the other for the caller's numpy work meanwhile (the
            # OpenMP setting is per thread)
            faiss.omp_set_num_threads(1)
            self._out = self._fn(*self._args)
        except BaseException as exc:  # re-raised in the caller's thread by result()
            self._err = exc

    def start(self) -> None:
        self._thread.start()

    def result(self) -> Any:
        self._thread.join()
        if self._err is not None:
            raise self._err
        return self._out


class _Retired:
    """The retired lists in arrival order: query id, ids, scores, expiry (ms; _NEVER: none).

    Removed ads leave holes (id -1) in place, closed when rows are read (`lists`).

    `ttl_s` is the store's exit TTL: positive, rows expire that long after they retire;
    otherwise they never expire here and are rewritten with that TTL as is.
    """

    def __init__(self, width: int, ttl_s: int, max_bytes: int) -> None:
        self.width = width
        self.ttl_s = int(ttl_s)
        self.max_rows = max(1, max_bytes // self.row_bytes)
        self._n = 0
        self._qid: Int64Array = _empty_ids()
        self._exp: Int64Array = _empty_ids()
        self._ids: Int64Array = np.empty((0, width), np.int64)
        self._scores: Float32Array = np.empty((0, width), np.float32)

    def _alloc(self, cap: int) -> None:
        """Backing arrays of `cap` rows holding the first `_n` (grown by doubling, shrunk
        when three quarters are free: no whole-array copy per micro-batch)."""
        n, w = self._n, self.width
        qid: Int64Array = np.zeros(cap, np.int64)
        exp: Int64Array = np.zeros(cap, np.int64)
        ids: Int64Array = np.full((cap, w), -1, np.int64)
        scores: Float32Array = np.full((cap, w), -np.inf, np.float32)
        if n:
            qid[:n], exp[:n] = self._qid[:n], self._exp[:n]
            ids[:n], scores[:n] = self._ids[:n], self._scores[:n]
        self._qid, self._exp, self._ids, self._scores = qid, exp, ids, scores

    @property
    def qid(self) -> Int64Array:
        return self._qid[: self._n]

    @property
    def ids(self) -> Int64Array:
        return self._ids[: self._n]

    @property
    def scores(self) -> Float32Array:
        return self._scores[: self._n]

    @property
    def expires_ms(self) -> Int64Array:
        return self._exp[: self._n]

    def __len__(self) -> int:
        return self._n

    @property
    def row_bytes(self) -> int:
        """Query id, expiry, and 8 + 4 bytes per entry (id, score)."""
        return 16 + 12 * self.width

    @property
    def nbytes(self) -> int:
        """Bytes of the rows kept."""
        return len(self) * self.row_bytes

    @property
    def capacity_bytes(self) -> int:
        """Bytes allocated (kept rows and room for more)."""
        return len(self._qid) * self.row_bytes

    def keep(self, mask: BoolArray) -> None:
        if mask.all():
            return
        m = int(mask.sum())
        for a in (self._qid, self._exp, self._ids, self._scores):
            a[:m] = a[: self._n][mask]
        self._n = m
        if len(self._qid) > 64 and 4 * m < len(self._qid):
            self._alloc(2 * m)

    def remove(self, qids: Int64Array) -> int:
        if not len(self) or not len(qids):
            return 0
        gone = np.isin(self.qid, qids)
        self.keep(~gone)
        return int(gone.sum())

    def add(
        self, qids: Int64Array, ids: Int64Array, scores: Float32Array, expires_ms: Int64Array
    ) -> None:
        self.remove(qids)
        n, m = self._n, len(qids)
        if n + m > len(self._qid):
            self._alloc(max(2 * len(self._qid), n + m, 64))
        self._qid[n : n + m], self._exp[n : n + m] = qids, expires_ms
        self._ids[n : n + m], self._scores[n : n + m] = ids, scores
        self._n = n + m

    def expiry(self, n: int, now_ms: int) -> Int64Array:
        at = now_ms + 1000 * self.ttl_s if self.ttl_s > 0 else _NEVER
        return np.full(n, at, dtype=np.int64)

    def expire(self, now_ms: int) -> int:
        """Forget the rows whose store record expired (a grace period after their expiry)."""
        live = self.expires_ms > now_ms - 1000 * RETIRED_GRACE_S
        self.keep(live)
        return int((~live).sum())

    def drop_ads(self, removed: Int64Array, start: int = 0) -> Int64Array:
        """Punch `removed` ads (sorted, unique) out of rows `start:` (holes: id -1, compacted
        when the rows are read); returns the rows changed."""
        rows, cols = held_entries(self.ids[start:], removed)
        rows += start
        self.ids[rows, cols] = -1
        self.scores[rows, cols] = -np.inf
        return np.unique(rows)

    def evict(self) -> Int64Array:
        """Empty the rows expiring soonest beyond `max_rows`; returns them (to forget later)."""
        over = len(self) - self.max_rows
        if over <= 0:
            return _empty_ids()
        rows = np.sort(np.argsort(self.expires_ms, kind="stable")[:over])
        self.ids[rows] = -1
        self.scores[rows] = -np.inf
        return rows

    def lists(self, rows: Int64Array, now_ms: int) -> RetiredLists:
        rows = rows[np.argsort(self.qid[rows], kind="stable")]
        exp = self.expires_ms[rows]
        if self.ttl_s > 0:
            ttl = np.maximum(1, -((now_ms - exp) // 1000))
        else:
            ttl = np.full(len(rows), self.ttl_s, dtype=np.int64)
        ids, scores = compact_rows(self.ids[rows], self.scores[rows])
        return RetiredLists(
            self.qid[rows],
            ids,
            scores,
            ttl.astype(np.int64),
            np.where(exp == _NEVER, -1, exp).astype(np.int64),
        )


class _Screen:
    """The routed screen of a micro-batch's new ads, in chunks of ads that whichever thread is
    free takes (the refresher's two threads share it once the background one is done)."""

    _CHUNK = 256

    def __init__(
        self,
        q: Float32Array,
        thr: Float32Array,
        vecs: Float32Array,
        lists: Int64Array,
        routes: tuple[Int64Array, npt.NDArray[np.int32]],
        l2: bool,
        tol: float,
    ) -> None:
        self.q, self.thr, self.vecs, self.lists = q, thr, vecs, lists
        self.routes, self.l2, self.tol = routes, l2, tol
        self._next = 0
        self._lock = threading.Lock()
        self._parts: list[tuple[Int64Array, Int64Array]] = []

    def run(self) -> None:
        """Screen chunks until none is left."""
        while True:
            with self._lock:
                a = self._next
                self._next += self._CHUNK
            if a >= len(self.vecs):
                return
            sl = slice(a, a + self._CHUNK)
            slots, rows = route_candidates(
                self.q,
                self.thr,
                self.vecs[sl],
                self.lists[sl],
                *self.routes,
                l2=self.l2,
                tol=self.tol,
            )
            self._parts.append((slots, rows + a))

    def pairs(self) -> tuple[Int64Array, Int64Array]:
        """(slot, row of vecs) of every screened pair; call once every `run` returned."""
        if not self._parts:
            return _empty_ids(), _empty_ids()
        return (
            np.concatenate([p[0] for p in self._parts]),
            np.concatenate([p[1] for p in self._parts]),
        )


class Refresher:
    """Maintains the K + margin neighbour lists of the head queries against a live index.

    `retired_ttl_s`: the store's exit TTL when lists of queries that leave the head set stay
    readable (`store.on_head_exit = "expire"`: pass `store.exit_ttl_s`); the refresher then
    keeps removing deleted ads from them until they expire. None: exited lists are removed
    from the store, nothing to keep. `clock` gives wall-clock seconds (TTLs).
    """

    def __init__(
        self,
        index: LiveIvfIndex,
        cfg: RefreshConfig,
        *,
        retired_ttl_s: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if cfg.k <= 0 or cfg.margin < 0:
            raise ValueError(
                f"refresh.k must be > 0 and refresh.margin >= 0, got {cfg.k}, {cfg.margin}"
            )
        if cfg.full_recompute_per_batch <= 0:
            raise ValueError("refresh.full_recompute_per_batch must be positive")
        if cfg.retired_max_mb <= 0:
            raise ValueError(f"refresh.retired_max_mb must be positive, got {cfg.retired_max_mb}")
        warm_up()
        self.cfg = cfg
        self.k = int(cfg.k)
        self.width = int(cfg.k + cfg.margin)
        self.index = index
        self.nprobe = int(cfg.nprobe or index.nprobe)
        self._index_version = index.version
        self._nlist = int(index.ivf.nlist)
        self._last_version: int | None = None
        self._n = 0
        self._resize(_MIN_SLOTS)
        self._keys = _empty_ids()
        self._key_slots = _empty_ids()
        self._pending = _empty_ids()
        self._routes: tuple[Int64Array, npt.NDArray[np.int32]] = build_routes(
            self._probe[:0], _empty_ids(), self._nlist
        )
        self._clock = clock
        self._retired = (
            None
            if retired_ttl_s is None
            else _Retired(self.width, int(retired_ttl_s), int(cfg.retired_max_mb) << 20)
        )

    @property
    def nprobe_eff(self) -> int:
        return min(self.nprobe, int(self.index.ivf.nlist))

    # ---- slots -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def pending_full(self) -> int:
        """Head queries still waiting for their full recompute after a retrain."""
        return int(self._alive[self._pending].sum()) if len(self._pending) else 0

    def head_ids(self) -> Int64Array:
        return self._keys.copy()

    @property
    def capacity(self) -> int:
        """Slots allocated (live head queries plus free slots)."""
        return len(self._qid)

    @property
    def nbytes(self) -> int:
        """Memory held for the head queries: slots, routes and retired lists."""
        slots = sum(
            int(a.nbytes)
            for a in (
                self._qid,
                self._alive,
                self._q,
                self._qnorm,
                self._probe,
                self._S,
                self._I,
                self._c,
            )
        )
        routes = int(self._routes[0].nbytes + self._routes[1].nbytes)
        retired = 0 if self._retired is None else self._retired.capacity_bytes
        return slots + routes + retired

    def _resize(self, cap: int) -> None:
        """(Re)allocate every per-slot array at `cap` slots, keeping the first `_n`."""
        d, w, p, n = self.index.dim, self.width, self.nprobe_eff, self._n

        def fresh(old: npt.NDArray[Any] | None, shape: tuple[int, ...], fill: Any, dt: Any) -> Any:
            out = np.full(shape, fill, dtype=dt)
            if old is not None and n:
                out[:n] = old[:n]
            return out

        first = not hasattr(self, "_qid")
        get = (lambda name: None) if first else (lambda name: getattr(self, name))
        self._qid: Int64Array = fresh(get("_qid"), (cap,), 0, np.int64)
        self._alive: BoolArray = fresh(get("_alive"), (cap,), False, bool)
        self._q: Float32Array = fresh(get("_q"), (cap, d), 0, np.float32)
        self._qnorm: Float32Array = fresh(get("_qnorm"), (cap,), 0, np.float32)
        self._probe: npt.NDArray[np.int32] = fresh(get("_probe"), (cap, p), -1, np.int32)
        self._S: Float32Array = fresh(get("_S"), (cap, w), -np.inf, np.float32)
        self._I: Int64Array = fresh(get("_I"), (cap, w), -1, np.int64)
        self._c: npt.NDArray[np.int32] = fresh(get("_c"), (cap,), 0, np.int32)

    def _alloc(self, qids: Int64Array) -> Int64Array:
        """Slots for new head queries: free slots first (lowest), then new ones."""
        free = np.flatnonzero(~self._alive[: self._n])[: len(qids)]
        extra = len(qids) - len(free)
        if self._n + extra > self.capacity:
            self._resize(max(2 * self.capacity, self._n + extra))
        slots = np.concatenate([free, np.arange(self._n, self._n + extra)]).astype(np.int64)
        self._n += extra
        self._qid[slots] = qids
        self._alive[slots] = True
        self._c[slots] = 0
        return slots

    def _lookup(self, qids: Int64Array) -> tuple[Int64Array, BoolArray]:
        if len(self._keys) == 0:
            return np.full(len(qids), -1, dtype=np.int64), np.zeros(len(qids), dtype=bool)
        pos = np.minimum(np.searchsorted(self._keys, qids), len(self._keys) - 1)
        found = self._keys[pos] == qids
        return np.where(found, self._key_slots[pos], -1).astype(np.int64), found

    def _reindex(self) -> None:
        live = np.flatnonzero(self._alive[: self._n])
        order = np.argsort(self._qid[live], kind="stable")
        self._key_slots = live[order]
        self._keys = self._qid[self._key_slots]

    def compact(self) -> bool:
        """Renumber the live slots from 0 and shrink the arrays to twice that (at least
        1024); done by `apply` when three quarters of the slots are free. True if it shrank."""
        live = np.flatnonzero(self._alive[: self._n])
        cap = max(_MIN_SLOTS, 2 * len(live))
        if cap >= self.capacity:
            return False
        remap = np.full(self._n, -1, dtype=np.int64)
        remap[live] = np.arange(len(live))
        for name in ("_qid", "_alive", "_q", "_qnorm", "_probe", "_S", "_I", "_c"):
            arr = getattr(self, name)
            arr[: len(live)] = arr[live]
        self._n = len(live)
        self._resize(cap)
        self._pending = remap[self._pending]
        self._pending = self._pending[self._pending >= 0]
        self._reindex()
        self._rebuild_routes()
        return True

    def _rebuild_routes(self) -> None:
        self._routes = build_routes(self._probe, self._key_slots, int(self.index.ivf.nlist))

    def _set_probes(self, slots: Int64Array) -> None:
        """Probe lists of `slots` from their prepared vectors (the live quantizer)."""
        with _OneThread() if len(slots) < _PROBE_CHUNK else _AsIs():
            for a in range(0, len(slots), _PROBE_CHUNK):
                part = slots[a : a + _PROBE_CHUNK]
                self._probe[part] = self.index.probe_lists(
                    self._q[part], self.nprobe_eff, prepared=True
                )

    # ---- scoring -----------------------------------------------------------------------

    def _screen(self, vecs: Float32Array, lists: Int64Array, thr: Float32Array) -> _Screen:
        """The routed float32 screen of new ads (`vecs` at IVF lists `lists`) against `thr`."""
        n = self._n
        live_thr = thr[np.isfinite(thr)]
        t_max = float(np.abs(live_thr).max()) if len(live_thr) else 0.0
        a_max = float(np.sqrt((vecs * vecs).sum(axis=1).max())) if len(vecs) else 0.0
        q_max = float(np.sqrt(self._qnorm[:n].max())) if n else 0.0
        l2 = self.index.metric == "l2"
        scale = (q_max + a_max) ** 2 if l2 else q_max * a_max
        return _Screen(
            self._q, thr, vecs, lists, self._routes, l2, _FILTER_TOL * (1 + scale + t_max)
        )

    def _candidates(
        self, screen: _Screen, ad_ids: Int64Array, thr: Float32Array
    ) -> tuple[Int64Array, Int64Array, Float32Array]:
        """(slot, ad id, score) of the screened pairs whose ad reaches the slot's `thr`.

        The screen keeps pairs within a tolerance below the threshold; they are scored again
        with the kernel the index's search uses, so scores and ties match it.
        """
        slots, rows = screen.pairs()
        scores = np.empty(len(rows), dtype=np.float32)
        if len(rows):
            l2 = self.index.metric == "l2"
            kernel = (
                faiss.pairwise_indexed_L2sqr  # type: ignore[attr-defined]
                if l2
                else faiss.pairwise_indexed_inner_product  # type: ignore[attr-defined]
            )
            # no numpy wrapper in Faiss for this one: the exact kernel of the index's scan
            with _OneThread():
                kernel(
                    self.index.dim,
                    len(rows),
                    faiss.swig_ptr(self._q),
                    faiss.swig_ptr(slots),
                    faiss.swig_ptr(screen.vecs),
                    faiss.swig_ptr(rows),
                    faiss.swig_ptr(scores),
                )
            if l2:
                np.negative(scores, out=scores)
        ids = ad_ids[rows]
        ok = scores >= thr[slots]
        if self.cfg.exclude_self:
            ok &= ids != self._qid[slots]
        return slots[ok], ids[ok], scores[ok]

    def _threshold(self) -> Float32Array:
        """Per slot, the last valid score: an ad must beat it to enter the valid prefix."""
        n = self._n
        c = self._c[:n]
        thr = np.full(n, np.inf, dtype=np.float32)
        idx = np.flatnonzero(self._alive[:n] & (c > 0))
        thr[idx] = self._S[idx, c[idx] - 1]
        return thr

    # ---- the micro-batch ---------------------------------------------------------------

    def swap_index(self, index: LiveIvfIndex) -> None:
        """Use a new index (e.g. after a retrain); a new quantizer recomputes every query."""
        self.index = index
        if index.version != self._index_version or int(index.ivf.nlist) != self._nlist:
            self._new_quantizer()

    def _new_quantizer(self) -> None:
        """New probe lists for every head query now (cheap: the coarse quantizer only); their
        full recompute follows at `full_recompute_per_batch` a micro-batch, and meanwhile
        they keep getting inserts (routed by the new lists) and deletes."""
        logger.info(
            "index version %d -> %d: recomputing every head query",
            self._index_version,
            self.index.version,
        )
        self._index_version = self.index.version
        self._nlist = int(self.index.ivf.nlist)
        if self._probe.shape[1] != self.nprobe_eff:
            self._probe = np.full((self.capacity, self.nprobe_eff), -1, dtype=np.int32)
        self._set_probes(self._key_slots)
        self._rebuild_routes()
        self.recompute_all()

    def set_nprobe(self, nprobe: int) -> None:
        """Probe `nprobe` lists per head query from now on: new probe lists and routes now,
        then every list recomputed at `full_recompute_per_batch` a micro-batch, as after a
        retrain (meanwhile inserts are routed by the new probe lists)."""
        if nprobe <= 0:
            raise ValueError(f"nprobe must be positive, got {nprobe}")
        self.nprobe = int(nprobe)
        self._probe = np.full((self.capacity, self.nprobe_eff), -1, dtype=np.int32)
        self._set_probes(self._key_slots)
        self._rebuild_routes()
        self.recompute_all()

    def recompute_all(self) -> None:
        """Schedule a full search of every head query (rate-limited per micro-batch)."""
        self._pending = self._key_slots.copy()
        logger.info("full recompute of %d head queries scheduled", len(self._pending))

    def topk(self, query_ids: npt.ArrayLike) -> tuple[Float32Array, Int64Array]:
        """Current K + margin lists (scores, ids); unknown queries get -inf / -1 rows."""
        qids = np.asarray(query_ids, dtype=np.int64).reshape(-1)
        slots, found = self._lookup(qids)
        scores = np.full((len(qids), self.width), -np.inf, dtype=np.float32)
        ids = np.full((len(qids), self.width), -1, dtype=np.int64)
        scores[found] = self._S[slots[found]]
        ids[found] = self._I[slots[found]]
        return scores, ids

    def _kill(self, qids: Int64Array) -> None:
        """Forget the slots of `qids` (free for reuse)."""
        slots, found = self._lookup(qids)
        old = slots[found]
        self._alive[old] = False
        self._c[old] = 0

    def _plan_ads(self, ads: AdChanges) -> _AdPlan:
        """Prepare and assign the new ads once; find the live ids that leave. No change yet."""
        index = self.index
        if ads.dim != index.dim:
            raise ValueError(
                f"AdChanges: upsert_vectors must have shape (n, {index.dim}), "
                f"got {ads.upsert_vectors.shape}"
            )
        ids, dels = ads.upsert_ids, ads.delete_ids
        x = index.prepare(ads.upsert_vectors, checked=True)
        touched = np.concatenate([ids, dels])
        removed = touched[index.contains(touched)] if len(touched) else _empty_ids()
        return _AdPlan(ids, x, dels, np.sort(removed))

    def _background(
        self, plan: _AdPlan
    ) -> tuple[int, float, Float32Array | None, BoolArray, Int64Array]:
        """The other thread's share of step 1: the rows (live and retired) holding a removed
        ad; then, once the owner thread assigned the new ads (`plan.ready`), the index update
        (and, under IVFPQ, the decoded vectors of the new ads) and what is left of the
        screen. Returns (deleted, index seconds, decoded, rows holding, retired rows hit)."""
        n = self._n
        holds = np.zeros(n, dtype=bool)
        retired_hit = _empty_ids()
        if len(plan.removed):
            holds = rows_holding(self._I[:n], self._c[:n], plan.removed) & self._alive[:n]
            if self._retired is not None:
                retired_hit = self._retired.drop_ads(plan.removed)
        plan.ready.wait()
        if plan.aborted:
            return 0, 0.0, None, holds, retired_hit
        t0 = time.perf_counter()
        old = self.index.apply(plan.ids, plan.x, plan.lists, plan.delete_ids)
        n_deleted = int(np.isin(plan.delete_ids, old, assume_unique=True).sum())
        decoded = None
        if self.index.cfg.kind != "ivfflat" and len(plan.ids):
            decoded = np.ascontiguousarray(
                self.index.ivf.reconstruct_batch(plan.ids), dtype=np.float32
            )
        index_s = time.perf_counter() - t0
        if plan.screen is not None:
            plan.screen.run()
        return n_deleted, index_s, decoded, holds, retired_hit

    def _search_rows(self, slots: Int64Array) -> tuple[Float32Array, Int64Array]:
        """Full search of `slots` (K + margin each; without the query's own id if excluded)."""
        w, q = self.width, self._q[slots]
        if not self.cfg.exclude_self:
            return self.index.search(q, w, nprobe=self.nprobe, prepared=True)
        s, i = self.index.search(q, w + 1, nprobe=self.nprobe, prepared=True)
        keep = i != self._qid[slots][:, None]
        keep[keep.all(axis=1), w] = False
        return s[keep].reshape(-1, w), i[keep].reshape(-1, w)

    def _retire(self, exited: Int64Array, now_ms: int) -> None:
        """Keep the current lists of queries leaving the head set until their exit TTL."""
        if self._retired is None or not len(exited):
            return
        slots, found = self._lookup(exited)
        slots = slots[found]
        self._retired.add(
            self._qid[slots],
            self._I[slots].copy(),
            self._S[slots].copy(),
            self._retired.expiry(len(slots), now_ms),
        )

    def _retired_out(self, changed: Int64Array, now_ms: int) -> tuple[RetiredLists, int]:
        """The retired rows to rewrite (changed or evicted); evicted rows are then forgotten."""
        r = self._retired
        if r is None:
            return RetiredLists.empty(self.width), 0
        evicted = r.evict()
        if len(evicted):
            logger.warning(
                "refresh.retired_max_mb (%d) reached: %d lists of former head queries are "
                "rewritten empty and no longer maintained",
                self.cfg.retired_max_mb,
                len(evicted),
            )
        out = r.lists(np.union1d(changed, evicted), now_ms)
        if len(evicted):
            keep = np.ones(len(r), dtype=bool)
            keep[evicted] = False
            r.keep(keep)
        return out, len(evicted)

    def retired_lists(self, query_ids: npt.ArrayLike | None = None) -> RetiredLists:
        """Every retired list kept (or those of `query_ids`), by query id, with its remaining
        TTL as of now."""
        if self._retired is None:
            return RetiredLists.empty(self.width)
        now_ms = int(self._clock() * 1000)
        rows = np.arange(len(self._retired))
        if query_ids is not None:
            qids = np.asarray(query_ids, dtype=np.int64).reshape(-1)
            rows = rows[np.isin(self._retired.qid, qids)]
        return self._retired.lists(rows, now_ms)

    def retired_expiry(self, query_ids: npt.ArrayLike) -> Int64Array:
        """Per query, the wall-clock expiry (ms) of its kept retired list (int64 max: it
        never expires); -1 where none is kept."""
        qids = np.asarray(query_ids, dtype=np.int64).reshape(-1)
        out = np.full(len(qids), -1, dtype=np.int64)
        r = self._retired
        if r is None or not len(r) or not len(qids):
            return out
        order = np.argsort(r.qid, kind="stable")
        keys = r.qid[order]
        pos = np.minimum(np.searchsorted(keys, qids), len(keys) - 1)
        found = keys[pos] == qids
        out[found] = r.expires_ms[order][pos][found]
        return out

    @property
    def retired_bytes(self) -> int:
        """Memory held by the retired lists (`RetiredLists` rows kept in the refresher)."""
        return 0 if self._retired is None else self._retired.nbytes

    def forget_retired(self, query_ids: npt.ArrayLike) -> int:
        """Stop maintaining these retired lists (e.g. their partition moved to another owner)."""
        if self._retired is None:
            return 0
        return self._retired.remove(np.asarray(query_ids, dtype=np.int64).reshape(-1))

    def load_retired(
        self,
        query_ids: npt.ArrayLike,
        ids: npt.ArrayLike,
        scores: npt.ArrayLike,
        expires_at_ms: npt.ArrayLike,
    ) -> RetiredLists:
        """Take back retired lists read from the store after a restart; returns the rewrites.

        Lists of current head queries and lists already expired are skipped; ids the index no
        longer holds are removed, and those lists (and lists with no expiry, `expires_at_ms`
        < 0, which get the exit TTL from now) are returned for a rewrite with their TTL.
        Rows are padded or cut to K + margin.
        """
        w = self.width
        if self._retired is None:
            return RetiredLists.empty(w)
        r = self._retired
        qids = np.asarray(query_ids, dtype=np.int64).reshape(-1)
        n = len(qids)
        ids_a = np.asarray(ids, dtype=np.int64)
        scores_a = np.asarray(scores, dtype=np.float32)
        exp = np.asarray(expires_at_ms, dtype=np.int64).reshape(-1)
        if ids_a.ndim != 2 or ids_a.shape[0] != n or scores_a.shape != ids_a.shape:
            raise ValueError(
                f"load_retired: ids and scores must have shape ({n}, width), got "
                f"{ids_a.shape} and {scores_a.shape}"
            )
        if exp.shape != (n,):
            raise ValueError(f"load_retired: expires_at_ms must have {n} values, got {exp.shape}")
        m = min(w, ids_a.shape[1])
        row_i = np.full((n, w), -1, dtype=np.int64)
        row_s = np.full((n, w), -np.inf, dtype=np.float32)
        row_i[:, :m], row_s[:, :m] = ids_a[:, :m], scores_a[:, :m]
        now_ms = int(self._clock() * 1000)
        _, live = self._lookup(qids)
        take = ~live & ~((exp >= 0) & (exp <= now_ms))
        qids, row_i, row_s, exp = qids[take], row_i[take], row_s[take], exp[take]
        unknown = exp < 0
        exp = np.where(unknown, r.expiry(len(exp), now_ms), exp)
        r.remove(qids)
        start = len(r)
        r.add(qids, row_i, row_s, exp)
        held = np.unique(row_i[row_i >= 0])
        absent = held[~self.index.contains(held)] if len(held) else _empty_ids()
        changed = r.drop_ads(absent, start) if len(absent) else _empty_ids()
        if r.ttl_s > 0:
            changed = np.union1d(changed, start + np.flatnonzero(unknown))
        out, _ = self._retired_out(changed, now_ms)
        logger.info(
            "%d retired lists loaded (%d skipped), %d to rewrite",
            len(qids),
            n - len(qids),
            len(out),
        )
        return out

    def apply(
        self,
        ads: AdChanges,
        heads: HeadChanges,
        head_vectors_lookup: VectorLookup,
        version: int,
    ) -> RefreshResult:
        """Run one micro-batch; returns the lists to store (changed or new, live and retired)."""
        if self._last_version is not None and version <= self._last_version:
            raise ValueError(
                f"version {version} is not above the previous one ({self._last_version}): "
                "pass a monotonically increasing version"
            )
        t_start = time.perf_counter()
        now_ms = int(self._clock() * 1000)
        index = self.index
        if index.version != self._index_version or int(index.ivf.nlist) != self._nlist:
            self._new_quantizer()
        plan = self._plan_ads(ads)

        # head set changes: exits and drops forget the query (an exit keeps its list as a
        # retired list), entries and new vectors re-enter; bad input raises before any change
        gone = np.union1d(heads.exited, heads.dropped).astype(np.int64)
        fresh_q = np.union1d(heads.entered, heads.vector_changed).astype(np.int64)
        fresh_q = fresh_q[~np.isin(fresh_q, gone)]
        raw_fresh = np.asarray(head_vectors_lookup(fresh_q), dtype=np.float32)
        if raw_fresh.shape != (len(fresh_q), index.dim):
            raise ValueError(
                f"head_vectors_lookup returned shape {raw_fresh.shape}, "
                f"expected ({len(fresh_q)}, {index.dim})"
            )
        q_fresh = index.prepare(raw_fresh)
        retired_expired = 0
        if self._retired is not None:
            self._retired.remove(fresh_q)
            retired_expired = self._retired.expire(now_ms)
        self._retire(np.asarray(heads.exited, dtype=np.int64), now_ms)
        self._kill(gone)
        self._kill(fresh_q)
        t0 = time.perf_counter()

        # 1. the index update, then the rows holding a removed ad, in the background;
        #    meanwhile the new ads' candidate rows (from the vectors as prepared: IVFFlat
        #    stores exactly those). Thresholds are taken before the removals (those only raise
        #    them when an ad leaves a valid prefix): the candidates are a superset.
        n = self._n
        thr = self._threshold()
        pend = self._pending[self._alive[self._pending]] if len(self._pending) else _empty_ids()
        batch = pend[: self.cfg.full_recompute_per_batch]
        self._pending = pend[len(batch) :]
        exact = index.cfg.kind == "ivfflat"
        worker = _Background(self._background, plan)
        worker.start()
        try:
            if len(plan.ids):
                with _OneThread():
                    plan.lists = index.assign_lists(plan.x, prepared=True)
                if exact:
                    plan.screen = self._screen(plan.x, plan.lists, thr)
        except BaseException:
            plan.aborted = True  # the index is left untouched
            plan.ready.set()
            worker.result()
            raise
        plan.ready.set()
        screen = plan.screen
        if screen is not None:
            screen.run()
        t1 = time.perf_counter()
        n_deleted, index_s, decoded, holds, retired_hit = worker.result()
        t2 = time.perf_counter()
        if decoded is not None:  # IVFPQ: scores from the codes the index now holds
            screen = self._screen(decoded, plan.lists, thr)
            screen.run()
        cand: tuple[Int64Array, Int64Array, Float32Array] = (
            self._candidates(screen, plan.ids, thr)
            if screen is not None
            else (_empty_ids(), _empty_ids(), _F32_EMPTY)
        )

        # 2. one pass over the affected rows: removals out, candidates in, change detected
        c_slots, c_ids, c_scores = cand
        rows, cand_start, order = group_rows(holds, c_slots)
        status = np.zeros(len(rows), dtype=np.int8)
        added = np.zeros(len(rows), dtype=np.int32)
        if len(rows):
            skip = np.zeros(n, dtype=bool)
            skip[batch] = True
            status, _, added = update_rows(
                self._I,
                self._S,
                self._c,
                rows,
                holds,
                skip,
                plan.removed,
                cand_start,
                c_ids[order],
                c_scores[order],
                k=self.k,
                scan_k=self.cfg.scan_k,
                larger_first=index.metric != "l2",
            )
        reset = rows[(status == ROW_UNDERFLOW) | (status == ROW_OVERFLOW)]
        t3 = time.perf_counter()

        # 3. full searches: rows short of K or over scan_k, the retrain backlog, new queries
        new_slots = self._alloc(fresh_q)
        self._q[new_slots] = q_fresh
        self._qnorm[new_slots] = np.einsum("ij,ij->i", q_fresh, q_fresh)
        self._set_probes(new_slots)
        redo = np.concatenate([reset, batch])
        before_i, before_s = self._I[redo], self._S[redo]
        search = np.concatenate([redo, new_slots])
        if len(search):
            with _OneThread() if len(search) < 1024 else _AsIs():
                s, i = self._search_rows(search)
            self._S[search], self._I[search] = s, i
            self._c[search] = self.width
        diff = np.any(self._I[redo] != before_i, axis=1) | np.any(self._S[redo] != before_s, axis=1)
        t4 = time.perf_counter()

        # 4. every list that changed, once, in query id order
        if len(gone) or len(fresh_q):
            self._reindex()
        changed = np.zeros(self._n, dtype=bool)
        changed[rows[status == ROW_CHANGED]] = True
        changed[redo[diff]] = True
        changed[new_slots] = True
        out = self._key_slots[changed[self._key_slots]]
        out_q, out_s, out_i = self._qid[out], self._S[out], self._I[out]
        retired, evicted = self._retired_out(retired_hit, now_ms)
        if len(fresh_q):
            self._rebuild_routes()
        if self.capacity > _MIN_SLOTS and 4 * len(self._keys) < self.capacity:
            self.compact()
        self._last_version = version
        t5 = time.perf_counter()
        stats: dict[str, float | int] = dict(
            inserted=len(plan.ids),
            deleted=n_deleted,
            removed=len(plan.removed),
            entered=len(heads.entered),
            exited=len(heads.exited) + len(heads.dropped),
            head_queries=len(self._keys),
            touched=len(c_slots),
            overflow_searches=int((status == ROW_OVERFLOW).sum()),
            delete_hits=int(holds.sum()),
            merged=int((added > 0).sum()),
            affected=len(rows) + len(search),
            full_searches=len(search),
            re_searched=len(reset),
            pending_full=self.pending_full,
            changed=len(out),
            retired=0 if self._retired is None else len(self._retired),
            retired_bytes=self.retired_bytes,
            retired_rewrites=len(retired),
            retired_expired=retired_expired,
            retired_evicted=evicted,
            heads_s=t0 - t_start,
            index_s=index_s,
            insert_s=t1 - t0,
            scan_wait_s=t2 - t1,
            merge_s=t3 - t2,
            search_s=t4 - t3,
            emit_s=t5 - t4,
            total_s=t5 - t_start,
        )
        return RefreshResult(out_q, out_i, out_s, version, stats, retired)
