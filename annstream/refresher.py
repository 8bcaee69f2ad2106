"""The incremental refresher: keeps every head query's K + margin list fresh, micro-batch by
micro-batch.

Each head query keeps K + margin neighbours in the index's search order (score, ties by id), a
valid-prefix length `c` (the first `c` entries are exactly the best `c` ads its IVF probe lists
hold; a -1 inside the prefix means "no more ads"; entries past it are -1 padding) and its probe
lists.

One micro-batch (`Refresher.apply`), two cores busy in steps 1-2:
1. in a background thread: the new ads, routed to their list, are scored against the head
   queries probing it with one `range_search_preassigned` whose threshold rides in two extra
   dimensions, so only ads beating a query's last valid score come back; then the upserts and
   deletes go to the index in one call each;
2. meanwhile the removed ads (deletes and the old version of updates) are found by id in the
   neighbour lists and those rows are compacted (`c` shrinks); a row whose valid prefix falls
   below K is re-searched; the retired lists (below) lose them too;
3. the candidates still beating the (possibly raised) last valid score are merged into their
   rows, all at once (`c` grows up to K + margin);
4. new head queries, changed query vectors and the re-searches above get a full search; after a
   retrain (index version changed) every head query is recomputed, at most
   `full_recompute_per_batch` per micro-batch (`pending_full` shows the progress);
5. every list whose stored content changed (any id, order or score of the K + margin) is
   returned, plus new and changed queries: the whole stored list is the contract, so a list
   is never left holding a deleted ad or a stale score, even in its margin.

Retired lists: the store keeps the list of a query that left the head set readable until its
exit TTL. The refresher keeps those lists (ids, scores, expiry; no vector, no routing) and
removes deleted and re-embedded ads from them, returning them for a rewrite with their
remaining TTL (`RefreshResult.retired`); nothing enters them, so they only get shorter.

Exactness rests on the quantizer: an ad can only enter the result of a query that probes the
ad's list, so after a retrain everything is recomputed. Scores of routed ads are computed with
the kernel the index's search uses, from the vectors it holds (decoded codes under IVFPQ).
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

from annstream.config import RefreshConfig
from annstream.heads import HeadChanges
from annstream.index import LiveIvfIndex

__all__ = [
    "RETIRED_GRACE_S",
    "AdChanges",
    "MicroBatcher",
    "RefreshResult",
    "Refresher",
    "RetiredLists",
    "compact_rows",
    "drop_entries",
    "held_entries",
]

logger = logging.getLogger(__name__)

Int64Array = npt.NDArray[np.int64]
Float32Array = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]
VectorLookup = Callable[[Int64Array], npt.ArrayLike]

_HOLD_BITS = 18
_HOLD_CHUNK = 1 << 20
_FILTER_TOL = 1e-4
_NEVER = np.iinfo(np.int64).max
# A retired list is kept this long past its expiry: the store's TTL starts when the micro-batch
# is written, a little after the refresher computed it, and a late delete must still reach it.
RETIRED_GRACE_S = 600


def _empty_ids() -> Int64Array:
    return np.empty(0, dtype=np.int64)


def held_entries(ids: Int64Array, removed: Int64Array) -> tuple[Int64Array, Int64Array]:
    """(rows, columns) of the entries of `ids` (rows of ad ids) holding an id of `removed`.

    `removed` is sorted and unique. A bitmap on the low id bits screens every entry in one
    pass (in chunks, to bound the temporaries); only the few entries it lets through are
    looked up exactly. Padding (-1) never matches.
    """
    removed = removed[removed != -1]
    n, w = ids.shape
    if n == 0 or w == 0 or len(removed) == 0:
        return _empty_ids(), _empty_ids()
    mask = (1 << _HOLD_BITS) - 1
    bitmap = np.zeros(1 << _HOLD_BITS, dtype=bool)
    bitmap[removed & mask] = True
    flat = np.ascontiguousarray(ids).reshape(-1)
    step = max(1, _HOLD_CHUNK // w) * w
    parts = []
    for a in range(0, len(flat), step):
        chunk = flat[a : a + step]
        hit = np.flatnonzero(bitmap[chunk & mask])
        found = chunk[hit]
        pos = np.minimum(np.searchsorted(removed, found), len(removed) - 1)
        parts.append(hit[removed[pos] == found] + a)
    rows, cols = np.divmod(np.concatenate(parts), w)
    return rows, cols


def compact_rows(ids: Int64Array, scores: Float32Array) -> tuple[Int64Array, Float32Array]:
    """Rows with holes (id -1) as lists: the other entries first, in order, then -1 / -inf."""
    keep = ids != -1
    fill = np.arange(ids.shape[1])[None, :] < keep.sum(axis=1)[:, None]
    out_i = np.full(ids.shape, -1, dtype=np.int64)
    out_s = np.full(scores.shape, -np.inf, dtype=np.float32)
    out_i[fill] = ids[keep]
    out_s[fill] = scores[keep]
    return out_i, out_s


def drop_entries(
    ids: Int64Array, scores: Float32Array, rows: Int64Array, cols: Int64Array
) -> tuple[Int64Array, Int64Array, Int64Array, Float32Array]:
    """Remove the entries (rows, cols) from their rows; the rest move up, -1 / -inf pad.

    Returns the distinct rows hit, how many entries each lost and their new ids and scores.
    """
    hit, inv, gone_n = np.unique(rows, return_inverse=True, return_counts=True)
    sub_i, sub_s = ids[hit], scores[hit]
    sub_i[inv.reshape(-1), cols] = -1
    out_i, out_s = compact_rows(sub_i, sub_s)
    return hit, gone_n.astype(np.int64), out_i, out_s


@dataclass(frozen=True)
class AdChanges:
    """The ad updates of one micro-batch: upserts (insert or replace) and deletes by id.

    Within the batch the last upsert of an id wins; an id both upserted and deleted is deleted.
    """

    upsert_ids: Int64Array
    upsert_vectors: Float32Array
    delete_ids: Int64Array = field(default_factory=_empty_ids)

    @classmethod
    def empty(cls, dim: int) -> AdChanges:
        return cls(_empty_ids(), np.empty((0, dim), dtype=np.float32), _empty_ids())


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
    """Time-or-count trigger: a micro-batch is due every `batch_ms` or `batch_events`."""

    def __init__(self, cfg: RefreshConfig, now_ms: float | None = None) -> None:
        if cfg.batch_ms <= 0 or cfg.batch_events <= 0:
            raise ValueError(
                f"refresh.batch_ms ({cfg.batch_ms}) and refresh.batch_events "
                f"({cfg.batch_events}) must be positive"
            )
        self.batch_ms = float(cfg.batch_ms)
        self.batch_events = int(cfg.batch_events)
        self.events = 0
        self.started_ms = self._now(now_ms)

    @staticmethod
    def _now(now_ms: float | None) -> float:
        return time.monotonic() * 1000.0 if now_ms is None else float(now_ms)

    def add(self, n_events: int) -> None:
        self.events += int(n_events)

    def due(self, now_ms: float | None = None) -> bool:
        """True once `batch_events` were added or `batch_ms` passed since the last reset."""
        return (
            self.events >= self.batch_events or self._now(now_ms) - self.started_ms >= self.batch_ms
        )

    def remaining_ms(self, now_ms: float | None = None) -> float:
        """How long to wait (poll timeout) before the batch is due by time."""
        return max(0.0, self.batch_ms - (self._now(now_ms) - self.started_ms))

    def reset(self, now_ms: float | None = None) -> None:
        self.events = 0
        self.started_ms = self._now(now_ms)


_F32_EMPTY = np.empty(0, dtype=np.float32)


@dataclass(frozen=True)
class _AdPlan:
    """Validated, deduplicated ad changes and the ids they remove from the index."""

    up_ids: Int64Array
    up_vecs: Float32Array
    del_ids: Int64Array
    removed: Int64Array
    ins_ids: Int64Array
    ins_vecs: Float32Array


@dataclass(frozen=True)
class _Applied:
    """What the background step did: deletes, scan size, the candidates (slot, id, score)."""

    n_deleted: int
    scanned: int
    slots: Int64Array
    ids: Int64Array
    scores: Float32Array
    index_s: float


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
        self.qid = _empty_ids()
        self.ids = np.empty((0, width), dtype=np.int64)
        self.scores = np.empty((0, width), dtype=np.float32)
        self.expires_ms = _empty_ids()

    def __len__(self) -> int:
        return len(self.qid)

    @property
    def row_bytes(self) -> int:
        """Query id, expiry, and 8 + 4 bytes per entry (id, score)."""
        return 16 + 12 * self.width

    @property
    def nbytes(self) -> int:
        return len(self) * self.row_bytes

    def keep(self, mask: BoolArray) -> None:
        if mask.all():
            return
        self.qid, self.expires_ms = self.qid[mask], self.expires_ms[mask]
        self.ids, self.scores = self.ids[mask], self.scores[mask]

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
        self.qid = np.concatenate([self.qid, qids])
        self.ids = np.concatenate([self.ids, ids])
        self.scores = np.concatenate([self.scores, scores])
        self.expires_ms = np.concatenate([self.expires_ms, expires_ms])

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
        self.cfg = cfg
        self.k = int(cfg.k)
        self.width = int(cfg.k + cfg.margin)
        self.index = index
        self.nprobe = int(cfg.nprobe or index.nprobe)
        self._index_version = index.version
        self._last_version: int | None = None
        d, w = index.dim, self.width
        cap = 1024
        self._n = 0
        self._qid = np.zeros(cap, dtype=np.int64)
        self._alive = np.zeros(cap, dtype=bool)
        self._routed = np.zeros(cap, dtype=bool)
        self._raw = np.zeros((cap, d), dtype=np.float32)
        self._q = np.zeros((cap, d), dtype=np.float32)
        self._qnorm = np.zeros(cap, dtype=np.float32)
        self._probe = np.full((cap, self.nprobe_eff), -1, dtype=np.int64)
        self._S = np.full((cap, w), -np.inf, dtype=np.float32)
        self._I = np.full((cap, w), -1, dtype=np.int64)
        self._c = np.zeros(cap, dtype=np.int64)
        self._keys = _empty_ids()
        self._key_slots = _empty_ids()
        self._pending = _empty_ids()
        self._snapped = np.zeros(0, dtype=bool)
        self._before_slots: list[Int64Array] = []
        self._before_ids: list[Int64Array] = []
        self._before_scores: list[Float32Array] = []
        self._nlist = int(index.ivf.nlist)
        self._clock = clock
        self._retired = (
            None
            if retired_ttl_s is None
            else _Retired(w, int(retired_ttl_s), int(cfg.retired_max_mb) << 20)
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

    def _grow(self, need: int) -> None:
        cap = len(self._qid)
        if self._n + need <= cap:
            return
        new_cap = max(2 * cap, self._n + need)
        extra = new_cap - cap

        def pad(a: npt.NDArray[Any], fill: Any) -> npt.NDArray[Any]:
            return np.concatenate([a, np.full((extra, *a.shape[1:]), fill, dtype=a.dtype)])

        self._qid, self._alive, self._routed = (
            pad(self._qid, 0),
            pad(self._alive, False),
            pad(self._routed, False),
        )
        self._raw, self._q, self._qnorm = pad(self._raw, 0), pad(self._q, 0), pad(self._qnorm, 0)
        self._probe, self._S, self._I = (
            pad(self._probe, -1),
            pad(self._S, -np.inf),
            pad(self._I, -1),
        )
        self._c = pad(self._c, 0)

    def _alloc(self, qids: Int64Array) -> Int64Array:
        self._grow(len(qids))
        slots = np.arange(self._n, self._n + len(qids), dtype=np.int64)
        self._n += len(qids)
        self._qid[slots] = qids
        self._alive[slots] = True
        self._routed[slots] = False
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

    def _compact(self) -> None:
        """Drop dead slots (renumbering) and rebuild the routing table from the live ones."""
        live = np.flatnonzero(self._alive[: self._n])
        remap = np.full(self._n, -1, dtype=np.int64)
        remap[live] = np.arange(len(live))
        for name in (
            "_qid",
            "_alive",
            "_routed",
            "_raw",
            "_q",
            "_qnorm",
            "_probe",
            "_S",
            "_I",
            "_c",
        ):
            arr = getattr(self, name)
            fresh = arr.copy()
            fresh[: len(live)] = arr[live]
            setattr(self, name, fresh)
        self._alive[len(live) : self._n] = False
        self._routed[len(live) : self._n] = False
        self._n = len(live)
        self._pending = remap[self._pending]
        self._pending = self._pending[self._pending >= 0]
        self._reindex()

    # ---- scoring -----------------------------------------------------------------------

    def _held(self, removed: Int64Array) -> tuple[Int64Array, Int64Array]:
        """(rows, columns) of the live head queries' entries holding a removed ad.

        Rows still waiting for their recompute after a retrain lose removed ads too: their
        stored list must not serve them meanwhile.
        """
        rows, cols = held_entries(self._I[: self._n], removed)
        ok = self._alive[rows]
        return rows[ok], cols[ok]

    def _candidates(
        self, vecs: Float32Array, lists: Int64Array, slots: Int64Array, thr: Float32Array
    ) -> tuple[Int64Array, Int64Array, Float32Array]:
        """Pairs (slot, row into `vecs`, score) where a new ad beats the slot's threshold.

        One `range_search_preassigned` over a throwaway IVF holding the new ads at their live
        lists finds them: the threshold rides in two extra dimensions (score - thr > 0 as one
        inner product), so each head query scans only its own probe lists and gets back only
        qualifying ads, however many. Survivors of that float32 filter (with a tolerance) are
        scored again with the kernel the index's search uses, so scores and ties match it.
        """
        d = self.index.dim
        q = self._q[slots]
        finite = thr[np.isfinite(thr)]
        t_max = float(np.abs(finite).max()) if len(finite) else 0.0
        a_max = float(np.sqrt((vecs * vecs).sum(axis=1).max()))
        q_max = float(np.sqrt(self._qnorm[slots].max()))
        aug_a = np.zeros((len(vecs), d + 2), dtype=np.float32)
        aug_q = np.empty((len(slots), d + 2), dtype=np.float32)
        l2 = self.index.metric == "l2"
        with np.errstate(over="ignore", invalid="ignore"):
            if l2:  # -|q - a|^2 - thr = 2 q.a - |a|^2 - (|q|^2 + thr)
                aug_a[:, :d] = 2.0 * vecs
                aug_a[:, d] = -np.einsum("ij,ij->i", vecs, vecs)
                aug_q[:, d] = 1.0
                aug_q[:, d + 1] = -(self._qnorm[slots] + thr)
                scale = (q_max + a_max) ** 2
            else:
                aug_a[:, :d] = vecs
                aug_q[:, d] = 0.0
                aug_q[:, d + 1] = -thr
                scale = q_max * a_max
        aug_a[:, d + 1] = 1.0
        aug_q[:, :d] = q
        tol = _FILTER_TOL * (1.0 + scale + t_max)
        coarse = faiss.IndexFlatIP(d + 2)
        tmp = faiss.IndexIVFFlat(
            coarse, d + 2, int(self.index.ivf.nlist), faiss.METRIC_INNER_PRODUCT
        )
        tmp.is_trained = True
        ids = np.arange(len(vecs), dtype=np.int64)
        assign = np.ascontiguousarray(lists, dtype=np.int64)
        tmp.add_core(len(vecs), faiss.swig_ptr(aug_a), faiss.swig_ptr(ids), faiss.swig_ptr(assign))
        probes = np.ascontiguousarray(self._probe[slots])
        tmp.nprobe = probes.shape[1]
        searcher: Any = tmp  # the numpy wrapper of faiss, not the SWIG signature
        lims, _, rows = searcher.range_search_preassigned(
            aug_q, -tol, probes, np.zeros(probes.shape, dtype=np.float32)
        )
        qi = np.repeat(np.arange(len(slots), dtype=np.int64), np.diff(lims.astype(np.int64)))
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        q_rows = np.ascontiguousarray(slots[qi])
        scores = np.empty(len(rows), dtype=np.float32)
        if len(rows):
            base = np.ascontiguousarray(self._q)
            kernel = (
                faiss.pairwise_indexed_L2sqr  # type: ignore[attr-defined]
                if l2
                else faiss.pairwise_indexed_inner_product  # type: ignore[attr-defined]
            )
            kernel(
                d,
                len(rows),
                faiss.swig_ptr(base),
                faiss.swig_ptr(q_rows),
                faiss.swig_ptr(vecs),
                faiss.swig_ptr(rows),
                faiss.swig_ptr(scores),
            )
            if l2:
                np.negative(scores, out=scores)
        ok = scores >= thr[qi]
        return q_rows[ok], rows[ok], scores[ok]

    def _threshold(self) -> Float32Array:
        """Per slot, the last valid score: an ad must beat it to enter the valid prefix."""
        n = self._n
        c = self._c[:n]
        thr = np.full(n, np.inf, dtype=np.float32)
        ok = self._routed[:n] & (c > 0)
        idx = np.flatnonzero(ok)
        thr[idx] = self._S[idx, c[idx] - 1]
        return thr

    # ---- the micro-batch ---------------------------------------------------------------

    def swap_index(self, index: LiveIvfIndex) -> None:
        """Use a new index (e.g. after a retrain); a new quantizer recomputes every query."""
        self.index = index
        if int(index.ivf.nlist) != self._nlist or self._probe.shape[1] != self.nprobe_eff:
            self._nlist = int(index.ivf.nlist)
            self._probe_width_check()
            self.recompute_all()

    def _probe_width_check(self) -> None:
        p = self.nprobe_eff
        if self._probe.shape[1] != p:
            self._probe = np.full((len(self._qid), p), -1, dtype=np.int64)
            self._routed[:] = False

    def recompute_all(self) -> None:
        """Schedule a full search of every head query (rate-limited per micro-batch)."""
        live = self._key_slots
        self._routed[: self._n] = False
        self._pending = live.copy()
        logger.info("full recompute of %d head queries scheduled", len(live))

    def topk(self, query_ids: npt.ArrayLike) -> tuple[Float32Array, Int64Array]:
        """Current K + margin lists (scores, ids); unknown queries get -inf / -1 rows."""
        qids = np.asarray(query_ids, dtype=np.int64).reshape(-1)
        slots, found = self._lookup(qids)
        scores = np.full((len(qids), self.width), -np.inf, dtype=np.float32)
        ids = np.full((len(qids), self.width), -1, dtype=np.int64)
        scores[found] = self._S[slots[found]]
        ids[found] = self._I[slots[found]]
        return scores, ids

    def _kill(self, qids: Int64Array) -> Int64Array:
        """Forget the slots of `qids`; returns the old slots (for change detection)."""
        slots, found = self._lookup(qids)
        old = slots[found]
        self._alive[old] = False
        self._routed[old] = False
        return old

    def _plan_ads(self, ads: AdChanges) -> _AdPlan:
        """Validate and deduplicate the ad changes; the index is not touched yet."""
        index = self.index
        up_ids = np.ascontiguousarray(ads.upsert_ids, dtype=np.int64).reshape(-1)
        up_vecs = np.ascontiguousarray(ads.upsert_vectors, dtype=np.float32)
        if up_vecs.shape != (len(up_ids), index.dim):
            raise ValueError(
                f"AdChanges: upsert_vectors must have shape ({len(up_ids)}, {index.dim}), "
                f"got {up_vecs.shape}"
            )
        del_ids = np.unique(np.asarray(ads.delete_ids, dtype=np.int64).reshape(-1))
        prepared = np.empty((0, index.dim), dtype=np.float32)
        if len(up_ids):
            _, last = np.unique(up_ids[::-1], return_index=True)
            keep = np.sort(len(up_ids) - 1 - last)
            up_ids, up_vecs = up_ids[keep], np.ascontiguousarray(up_vecs[keep])
            prepared = index.prepare(up_vecs)  # bad vectors raise here, before any change
        touched = np.unique(np.concatenate([up_ids, del_ids]))
        removed = touched[index.contains(touched)] if len(touched) else _empty_ids()
        ins = ~np.isin(up_ids, del_ids)
        ins_ids = np.ascontiguousarray(up_ids[ins])
        return _AdPlan(up_ids, up_vecs, del_ids, removed, ins_ids, prepared[ins])

    def _apply_and_scan(self, plan: _AdPlan, thr: Float32Array) -> _Applied:
        """Apply the ad changes to the index and find the new ads' candidate rows.

        `thr` is each slot's threshold before the deletes: the candidates are a superset.
        IVFFlat lists hold the prepared vectors themselves, so the scan needs nothing from
        the index and runs first; IVFPQ scores come from the decoded codes, after the add.
        """
        index = self.index
        n = self._n
        scan = _empty_ids()
        # the lists the index adds the new ads to (from the same prepared rows)
        ins_lists = index.assign_lists(plan.ins_vecs) if len(plan.ins_ids) else _empty_ids()
        if len(plan.ins_ids):
            lists_hit = np.zeros(self._nlist + 1, dtype=bool)  # the last entry catches -1
            lists_hit[ins_lists] = True
            probing = lists_hit[self._probe[:n]].any(axis=1)
            scan = np.flatnonzero(probing & self._routed[:n] & (thr < np.inf))
        found = (_empty_ids(), _empty_ids(), _F32_EMPTY)
        exact = index.cfg.kind == "ivfflat"
        if exact and len(scan):
            found = self._candidates(plan.ins_vecs, ins_lists, scan, thr[scan])
        t0 = time.perf_counter()
        if len(plan.up_ids):
            index.upsert(plan.up_ids, plan.up_vecs)
        n_deleted = len(index.delete(plan.del_ids)) if len(plan.del_ids) else 0
        index_s = time.perf_counter() - t0
        if not exact and len(scan):
            decoded = index.ivf.reconstruct_batch(plan.ins_ids)
            found = self._candidates(
                np.ascontiguousarray(decoded, dtype=np.float32), ins_lists, scan, thr[scan]
            )
        slots, rows, scores = found
        return _Applied(n_deleted, len(scan), slots, plan.ins_ids[rows], scores, index_s)

    def _snapshot(self, slots: Int64Array) -> None:
        """Remember the whole list of `slots` (first time only) for change detection."""
        new = slots[~self._snapped[slots]]
        if len(new):
            self._snapped[new] = True
            self._before_slots.append(new)
            self._before_ids.append(self._I[new].copy())
            self._before_scores.append(self._S[new].copy())

    def _drop_held(self, rows: Int64Array, cols: Int64Array) -> Int64Array:
        """Compact the rows holding removed ads (`c` shrinks); returns rows now short of K."""
        hit, gone_n, out_i, out_s = drop_entries(self._I, self._S, rows, cols)
        self._snapshot(hit)
        c = self._c[hit]
        complete = (c > 0) & (self._S[hit, np.maximum(c - 1, 0)] == -np.inf)
        self._I[hit], self._S[hit] = out_i, out_s
        c_new = np.where(complete, c, c - gone_n)
        self._c[hit] = c_new
        return hit[c_new < self.k]

    def _beats_last(
        self, slots: Int64Array, ids: Int64Array, scores: Float32Array, thr: Float32Array
    ) -> BoolArray:
        """Which candidates come before their row's last valid entry in search order."""
        t = thr[slots]
        ok = scores > t
        tie = np.flatnonzero((scores == t) & np.isfinite(t))
        if len(tie):
            last = self._I[slots[tie], self._c[slots[tie]] - 1]
            ok[tie] = ids[tie] > last if self.index.metric != "l2" else ids[tie] < last
        return ok

    def _count_ahead(
        self, rows_s: Float32Array, r: Int64Array, scores: Float32Array, *, strict: bool
    ) -> Int64Array:
        """Per candidate, entries of its row (descending) scoring above it (or at least it)."""
        w = rows_s.shape[1]
        lo = np.zeros(len(scores), dtype=np.int64)
        hi = np.full(len(scores), w, dtype=np.int64)
        while True:
            open_ = lo < hi
            if not open_.any():
                return lo
            mid = (lo + hi) >> 1
            got = rows_s[r, np.minimum(mid, w - 1)]
            ahead = open_ & ((got > scores) if strict else (got >= scores))
            lo = np.where(ahead, mid + 1, lo)
            hi = np.where(open_ & ~ahead, mid, hi)

    def _merge(
        self, slots: Int64Array, ids: Int64Array, scores: Float32Array
    ) -> tuple[Int64Array, Int64Array, Int64Array]:
        """Insert candidates into their rows, all rows at once.

        Returns the merged rows, the rows sent to a full search instead (more than `scan_k`
        candidates) and the merged rows whose list changed (a candidate landed in it).
        """
        # the order of the index's search: by score, ties by id (larger first under inner
        # product, smaller under L2)
        larger_first = self.index.metric != "l2"
        order = np.lexsort((-ids if larger_first else ids, -scores, slots))
        slots, ids, scores = slots[order], ids[order], scores[order]
        upd, start, counts = np.unique(slots, return_index=True, return_counts=True)
        over = counts > self.cfg.scan_k
        overflow = upd[over]
        if over.any():
            keep = np.repeat(~over, counts)
            slots, ids, scores = slots[keep], ids[keep], scores[keep]
            upd, counts = upd[~over], counts[~over]
            start = np.cumsum(counts) - counts
        if not len(upd):
            return upd, overflow, _empty_ids()
        w, m = self.width, len(upd)
        r = np.repeat(np.arange(m), counts)
        j = np.arange(len(slots)) - np.repeat(start, counts)
        rows_s, rows_i = self._S[upd], self._I[upd]
        # rank in the merged row: candidates before it plus entries ahead of it (rows are in
        # search order: a binary search per candidate, then the rare equal scores by id)
        lo = self._count_ahead(rows_s, r, scores, strict=True)
        hi = self._count_ahead(rows_s, r, scores, strict=False)
        tied = np.flatnonzero(hi > lo)
        first = lo[tied]
        for t in range(int((hi - lo).max()) if len(tied) else 0):
            col = first + t
            other = rows_i[r[tied], np.minimum(col, w - 1)]
            ahead = other > ids[tied] if larger_first else other < ids[tied]
            lo[tied] += (col < hi[tied]) & ahead
        pos = j + lo
        wc = int(counts.max())
        taken = np.zeros((m, w + wc), dtype=bool)
        taken[r, pos] = True
        taken[:, w:] |= np.arange(wc)[None, :] >= counts[:, None]
        cand_s = np.full((m, wc), -np.inf, dtype=np.float32)
        cand_i = np.full((m, wc), -1, dtype=np.int64)
        cand_s[r, j], cand_i[r, j] = scores, ids
        out_s = np.empty((m, w + wc), dtype=np.float32)
        out_i = np.empty((m, w + wc), dtype=np.int64)
        out_s[taken], out_i[taken] = cand_s.reshape(-1), cand_i.reshape(-1)
        rest = ~taken
        out_s[rest], out_i[rest] = rows_s.reshape(-1), rows_i.reshape(-1)
        self._S[upd], self._I[upd] = out_s[:, :w], out_i[:, :w]
        self._c[upd] = np.minimum(self._c[upd] + counts, w)
        return upd, overflow, upd[pos[start] < w]

    def _search_rows(self, slots: Int64Array) -> tuple[Float32Array, Int64Array]:
        """Full search of `slots` (K + margin each; without the query's own id if excluded)."""
        w = self.width
        if not self.cfg.exclude_self:
            return self.index.search(self._raw[slots], w, nprobe=self.nprobe)
        s, i = self.index.search(self._raw[slots], w + 1, nprobe=self.nprobe)
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

    def retired_lists(self) -> RetiredLists:
        """Every retired list kept (by query id), with its remaining TTL as of now."""
        if self._retired is None:
            return RetiredLists.empty(self.width)
        now_ms = int(self._clock() * 1000)
        return self._retired.lists(np.arange(len(self._retired)), now_ms)

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
        stats: dict[str, float | int] = {}
        index = self.index
        if index.version != self._index_version:
            logger.info(
                "index version %d -> %d: recomputing every head query",
                self._index_version,
                index.version,
            )
            self._index_version = index.version
            self._probe_width_check()
            self.recompute_all()

        plan = self._plan_ads(ads)

        # head set changes: exits and drops forget the query (an exit keeps its list as a
        # retired list), entries and new vectors re-enter
        gone = np.union1d(heads.exited, heads.dropped).astype(np.int64)
        fresh_q = np.union1d(heads.entered, heads.vector_changed).astype(np.int64)
        fresh_q = fresh_q[~np.isin(fresh_q, gone)]
        raw_fresh = np.ascontiguousarray(head_vectors_lookup(fresh_q), dtype=np.float32)
        if raw_fresh.shape != (len(fresh_q), index.dim):
            raise ValueError(
                f"head_vectors_lookup returned shape {raw_fresh.shape}, "
                f"expected ({len(fresh_q)}, {index.dim})"
            )
        retired_expired = 0
        if self._retired is not None:
            self._retired.remove(fresh_q)
            retired_expired = self._retired.expire(now_ms)
        self._retire(np.asarray(heads.exited, dtype=np.int64), now_ms)
        self._kill(gone)
        self._kill(fresh_q)
        t0 = time.perf_counter()

        n = self._n
        self._snapped = np.zeros(n, dtype=bool)
        self._before_slots, self._before_ids, self._before_scores = [], [], []

        # 1. in the background, on one core: the new ads scored against the head queries
        #    probing their list with the thresholds before the deletes (those only rise when
        #    ads leave a valid prefix: a superset, filtered below) and the index updates
        worker = _Background(self._apply_and_scan, plan, self._threshold())
        worker.start()

        # 2. meanwhile removed ads leave the rows holding them (a row short of K is searched
        #    again) and the retired lists
        reset = _empty_ids()
        hit_rows = 0
        retired_hit = _empty_ids()
        if len(plan.removed):
            rows, cols = self._held(plan.removed)
            if len(rows):
                reset = self._drop_held(rows, cols)
                hit_rows = len(np.unique(rows))
            if self._retired is not None:
                retired_hit = self._retired.drop_ads(plan.removed)
        t1 = time.perf_counter()
        applied: _Applied = worker.result()
        t2 = time.perf_counter()

        # 3. new ads enter the rows where they beat the last valid score after the deletes
        merged = n_overflow = 0
        merged_changed = _empty_ids()
        if len(applied.slots):
            thr = self._threshold()
            thr[reset] = np.inf
            ok = self._beats_last(applied.slots, applied.ids, applied.scores, thr)
            if self.cfg.exclude_self:
                ok &= applied.ids != self._qid[applied.slots]
            upd, overflow, merged_changed = self._merge(
                applied.slots[ok], applied.ids[ok], applied.scores[ok]
            )
            merged, n_overflow = len(upd), len(overflow)
            if n_overflow:
                reset = np.union1d(reset, overflow)
        t3 = time.perf_counter()

        # 4. full searches: new and changed queries, underflowing rows, the retrain backlog
        #    (recomputed in place, new probe lists)
        new_slots = self._alloc(fresh_q)
        self._raw[new_slots] = raw_fresh
        pend = self._pending[self._alive[self._pending]] if len(self._pending) else _empty_ids()
        batch = pend[: self.cfg.full_recompute_per_batch]
        self._pending = pend[len(batch) :]
        self._snapshot(reset)
        self._snapshot(batch)
        routed_new = np.concatenate([new_slots, batch])
        if len(routed_new):
            self._q[routed_new] = index.prepare(self._raw[routed_new])
            self._qnorm[routed_new] = np.einsum(
                "ij,ij->i", self._q[routed_new], self._q[routed_new]
            )
            self._probe[routed_new] = index.probe_lists(self._raw[routed_new], self.nprobe_eff)
        search = np.union1d(reset, routed_new)
        if len(search):
            s, i = self._search_rows(search)
            self._S[search], self._I[search] = s, i
            self._c[search] = self.width
        self._routed[routed_new] = True
        t4 = time.perf_counter()

        # 5. what changed: snapshotted rows by comparing whole lists, merged-only rows by
        #    where the candidates landed
        b_slots = np.concatenate(self._before_slots) if self._before_slots else _empty_ids()
        diff = np.zeros(len(b_slots), dtype=bool)
        if len(b_slots):
            diff = np.any(self._I[b_slots] != np.concatenate(self._before_ids), axis=1)
            diff |= np.any(self._S[b_slots] != np.concatenate(self._before_scores), axis=1)
        merged_only = merged_changed[~self._snapped[merged_changed]]
        out = np.concatenate([b_slots[diff], merged_only, new_slots])
        out = out[np.argsort(self._qid[out], kind="stable")]
        out_q = self._qid[out]
        out_s = self._S[out]
        out_i = self._I[out]
        retired, evicted = self._retired_out(retired_hit, now_ms)
        if len(gone) or len(fresh_q) or len(batch):
            self._reindex()
            if self._n > 2 * len(self._keys) + 1024:
                self._compact()
        self._snapped = np.zeros(0, dtype=bool)
        self._before_slots, self._before_ids, self._before_scores = [], [], []
        self._last_version = version
        t5 = time.perf_counter()
        stats.update(
            inserted=len(plan.ins_ids),
            deleted=applied.n_deleted,
            removed=len(plan.removed),
            entered=len(heads.entered),
            exited=len(heads.exited) + len(heads.dropped),
            head_queries=len(self._keys),
            touched=applied.scanned,
            overflow_searches=n_overflow,
            delete_hits=hit_rows,
            merged=merged,
            affected=int(len(b_slots) + len(merged_only) + len(new_slots)),
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
            index_s=applied.index_s,
            delete_s=t1 - t0,
            scan_wait_s=t2 - t1,
            insert_s=t3 - t2,
            search_s=t4 - t3,
            emit_s=t5 - t4,
            total_s=t5 - t_start,
        )
        return RefreshResult(out_q, out_i, out_s, version, stats, retired)
