"""The incremental refresher: keeps every head query's top K fresh, micro-batch by micro-batch.

Each head query keeps K + margin neighbours, a valid-prefix length `c` (the first `c` entries
are exactly the best `c` ads its IVF probe lists hold; a -1 inside the prefix means "no more
ads") and its probe lists, from which a list -> head queries routing table (CSR) is built.

One micro-batch (`Refresher.apply`):
1. the ad upserts and deletes go to the index in one call each;
2. removed ads (deletes and the old version of updates) are scored against the head queries
   probing their old list; a query holds such an ad only if its score reaches the query's last
   valid score, and only those rows are checked and compacted (`c` shrinks); a query whose
   valid prefix falls below K is re-searched;
3. new ads are scored against the head queries probing their list (reverse routing) and merged
   where they beat the last valid score (`c` grows up to K + margin);
4. new head queries, changed query vectors and the re-searches above get a full search; after a
   retrain (index version changed) every head query is recomputed, at most
   `full_recompute_per_batch` per micro-batch (`pending_full` shows the progress);
5. only the queries whose top K ids changed (plus new and changed queries) are returned.

Exactness rests on the quantizer: an ad can only enter the result of a query that probes the
ad's list, so after a retrain the routing is rebuilt from scratch. Scores of routed ads are
computed from the vectors the index holds (decoded codes under IVFPQ), as its search does.
"""

from __future__ import annotations

import logging
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

__all__ = ["AdChanges", "MicroBatcher", "RefreshResult", "Refresher"]

logger = logging.getLogger(__name__)

Int64Array = npt.NDArray[np.int64]
Float32Array = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]
VectorLookup = Callable[[Int64Array], npt.ArrayLike]

_REBUILD_FRACTION = 0.1
_DELETE_TOL = 1e-3


def _empty_ids() -> Int64Array:
    return np.empty(0, dtype=np.int64)


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
class RefreshResult:
    """Head queries whose top K changed: K + margin neighbours each, padded with -1 / -inf.

    Entries past a query's valid prefix are padding too; consumers keep the first K.
    """

    query_ids: Int64Array
    ids: Int64Array
    scores: Float32Array
    version: int
    stats: dict[str, float | int]


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


class _Routing:
    """list -> head query slots, as a CSR table plus a small CSR of recent additions."""

    def __init__(self, nlist: int) -> None:
        self.nlist = nlist
        self.ptr = np.zeros(nlist + 1, dtype=np.int64)
        self.slots = _empty_ids()
        self.xptr = np.zeros(nlist + 1, dtype=np.int64)
        self.xslots = _empty_ids()
        self.extra: list[Int64Array] = []
        self.n_extra = 0

    def _csr(self, slots: Int64Array, probes: Int64Array) -> tuple[Int64Array, Int64Array]:
        lists = probes.reshape(-1)
        owners = np.repeat(slots, probes.shape[1])
        ok = lists >= 0
        lists, owners = lists[ok], owners[ok]
        order = np.argsort(lists, kind="stable")
        counts = np.bincount(lists, minlength=self.nlist)
        ptr = np.zeros(self.nlist + 1, dtype=np.int64)
        np.cumsum(counts, out=ptr[1:])
        return ptr, owners[order]

    def rebuild(self, slots: Int64Array, probes: Int64Array) -> None:
        self.ptr, self.slots = self._csr(slots, probes)
        self.xptr = np.zeros(self.nlist + 1, dtype=np.int64)
        self.xslots = _empty_ids()
        self.extra, self.n_extra = [], 0

    def add(self, slots: Int64Array, all_probes: npt.NDArray[np.int64]) -> bool:
        """Route new slots; True when the caller should rebuild the main table instead."""
        if len(slots) == 0:
            return False
        self.extra.append(slots)
        self.n_extra += len(slots)
        if self.n_extra > _REBUILD_FRACTION * max(
            len(self.slots) / max(all_probes.shape[1], 1), 1024
        ):
            return True
        extra = np.concatenate(self.extra)
        self.xptr, self.xslots = self._csr(extra, all_probes[extra])
        return False

    def gather(self, lists: Int64Array) -> Int64Array:
        """Slots routed to any of `lists` (with repeats and dead slots)."""
        parts = []
        for ptr, slots in ((self.ptr, self.slots), (self.xptr, self.xslots)):
            if len(slots) == 0:
                continue
            start, stop = ptr[lists], ptr[lists + 1]
            counts = stop - start
            total = int(counts.sum())
            offsets = np.repeat(start - np.cumsum(counts) + counts, counts)
            parts.append(slots[np.arange(total) + offsets])
        return np.concatenate(parts) if parts else _empty_ids()


class Refresher:
    """Maintains the K + margin neighbour lists of the head queries against a live index."""

    def __init__(self, index: LiveIvfIndex, cfg: RefreshConfig) -> None:
        if cfg.k <= 0 or cfg.margin < 0:
            raise ValueError(
                f"refresh.k must be > 0 and refresh.margin >= 0, got {cfg.k}, {cfg.margin}"
            )
        if cfg.full_recompute_per_batch <= 0:
            raise ValueError("refresh.full_recompute_per_batch must be positive")
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
        self._routing = _Routing(int(index.ivf.nlist))

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
        routed = np.flatnonzero(self._routed[: self._n])
        self._routing.rebuild(routed, self._probe[routed])
        self._reindex()

    def _route_new(self, slots: Int64Array) -> None:
        if self._routing.add(slots, self._probe):
            if self._n > 2 * len(self._keys) + 1024:
                self._compact()
            else:
                routed = np.flatnonzero(self._routed[: self._n])
                self._routing.rebuild(routed, self._probe[routed])

    # ---- scoring -----------------------------------------------------------------------

    def _scan(
        self, vecs: Float32Array, lists: Int64Array, slots: Int64Array, k: int
    ) -> tuple[Float32Array, Int64Array]:
        """Score the batch's changed ads against `slots` through their stored probe lists.

        The ads go into a throwaway IVFFlat sharing the live quantizer, at the lists they
        hold in the live index; one `search_preassigned` then returns, per head query, the
        best `k` of them among its probe lists: (scores higher-is-better, rows into `vecs`).
        """
        ivf = self.index.ivf
        tmp = faiss.IndexIVFFlat(ivf.quantizer, self.index.dim, int(ivf.nlist), ivf.metric_type)
        tmp.is_trained = True
        ids = np.arange(len(vecs), dtype=np.int64)
        assign = np.ascontiguousarray(lists, dtype=np.int64)
        tmp.add_core(len(vecs), faiss.swig_ptr(vecs), faiss.swig_ptr(ids), faiss.swig_ptr(assign))
        probes = np.ascontiguousarray(self._probe[slots])
        tmp.nprobe = probes.shape[1]
        searcher: Any = tmp  # the numpy wrapper of faiss, not the SWIG signature
        out: tuple[Float32Array, Int64Array] = searcher.search_preassigned(
            np.ascontiguousarray(self._q[slots]),
            k,
            probes,
            np.zeros(probes.shape, dtype=np.float32),
        )
        dist, rows = out
        scores = np.ascontiguousarray(dist, dtype=np.float32)
        if self.index.metric == "l2":
            np.negative(scores, out=scores)
        scores[rows < 0] = -np.inf
        return scores, np.ascontiguousarray(rows, dtype=np.int64)

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
        if int(index.ivf.nlist) != self._routing.nlist or self._probe.shape[1] != self.nprobe_eff:
            self._routing = _Routing(int(index.ivf.nlist))
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
        self._routing.rebuild(_empty_ids(), np.zeros((0, self.nprobe_eff), dtype=np.int64))
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

    def _apply_ads(
        self, ads: AdChanges
    ) -> tuple[Int64Array, Int64Array, Float32Array, Int64Array, Int64Array, Float32Array, int]:
        """Apply to the index; returns the removed ids with their old lists and vectors, the
        inserted ids with their lists and vectors, and the number of deletes."""
        index = self.index
        up_ids = np.ascontiguousarray(ads.upsert_ids, dtype=np.int64).reshape(-1)
        up_vecs = np.ascontiguousarray(ads.upsert_vectors, dtype=np.float32)
        if up_vecs.shape != (len(up_ids), index.dim):
            raise ValueError(
                f"AdChanges: upsert_vectors must have shape ({len(up_ids)}, {index.dim}), "
                f"got {up_vecs.shape}"
            )
        del_ids = np.unique(np.asarray(ads.delete_ids, dtype=np.int64).reshape(-1))
        if len(up_ids):
            _, last = np.unique(up_ids[::-1], return_index=True)
            keep = np.sort(len(up_ids) - 1 - last)
            up_ids, up_vecs = up_ids[keep], np.ascontiguousarray(up_vecs[keep])
        touched = np.unique(np.concatenate([up_ids, del_ids]))
        old_ids = touched[index.contains(touched)] if len(touched) else _empty_ids()
        if len(old_ids):
            # scores come from what the lists hold (decoded codes under IVFPQ), lists from
            # the exact vectors, as when the ads were added
            old_vecs = np.ascontiguousarray(index.ivf.reconstruct_batch(old_ids), dtype=np.float32)
            exact = old_vecs if index.cfg.kind == "ivfflat" else index.vectors(old_ids)
            old_lists = index.assign_lists(exact)
        else:
            old_vecs = np.empty((0, index.dim), dtype=np.float32)
            old_lists = _empty_ids()
        ins = ~np.isin(up_ids, del_ids)
        if len(up_ids):
            index.upsert(up_ids, up_vecs)
            ins_lists = index.assign_lists(up_vecs)[ins]
        else:
            ins_lists = _empty_ids()
        n_deleted = len(index.delete(del_ids)) if len(del_ids) else 0
        ins_ids = np.ascontiguousarray(up_ids[ins])
        if len(ins_ids):
            new_vecs = np.ascontiguousarray(index.ivf.reconstruct_batch(ins_ids), dtype=np.float32)
        else:
            new_vecs = np.empty((0, index.dim), dtype=np.float32)
        return old_ids, old_lists, old_vecs, ins_ids, ins_lists, new_vecs, n_deleted

    def apply(
        self,
        ads: AdChanges,
        heads: HeadChanges,
        head_vectors_lookup: VectorLookup,
        version: int,
    ) -> RefreshResult:
        """Run one micro-batch; returns the head queries whose top K changed."""
        if self._last_version is not None and version <= self._last_version:
            raise ValueError(
                f"version {version} is not above the previous one ({self._last_version}): "
                "pass a monotonically increasing version"
            )
        t_start = time.perf_counter()
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

        # head set changes: exits and drops forget the query, entries and new vectors re-enter
        gone = np.union1d(heads.exited, heads.dropped).astype(np.int64)
        fresh_q = np.union1d(heads.entered, heads.vector_changed).astype(np.int64)
        fresh_q = fresh_q[~np.isin(fresh_q, gone)]
        self._kill(gone)
        self._kill(fresh_q)
        raw_fresh = np.ascontiguousarray(head_vectors_lookup(fresh_q), dtype=np.float32)
        if raw_fresh.shape != (len(fresh_q), index.dim):
            raise ValueError(
                f"head_vectors_lookup returned shape {raw_fresh.shape}, "
                f"expected ({len(fresh_q)}, {index.dim})"
            )
        t0 = time.perf_counter()

        # 1. the index
        old_ids, old_lists, old_vecs, ins_ids, ins_lists, new_vecs, n_deleted = self._apply_ads(ads)
        t1 = time.perf_counter()

        n = self._n
        before_slots: list[Int64Array] = []
        before_ids: list[Int64Array] = []
        snapped = np.zeros(n, dtype=bool)

        def snapshot(slots: Int64Array) -> None:
            new = slots[~snapped[slots]]
            snapped[new] = True
            before_slots.append(new)
            before_ids.append(self._I[new, : self.k].copy())

        # 2. one scan of the changed ads (old versions and new) over the routed head queries
        #    probing their lists; thresholds only rise when ads leave a valid prefix, so the
        #    pre-delete threshold selects a superset of the insert candidates
        old_n = len(old_ids)
        lists = np.concatenate([old_lists, ins_lists])
        scan = _empty_ids()
        if len(lists):
            hit_mask = np.zeros(n, dtype=bool)
            hit_mask[self._routing.gather(np.unique(lists))] = True
            scan = np.flatnonzero(hit_mask & self._routed[:n])
        thr = self._threshold()
        reset = _empty_ids()
        n_overflow = 0
        del_slots, del_ids = _empty_ids(), _empty_ids()
        ins_slots, ins_rows = _empty_ids(), _empty_ids()
        ins_scores = np.empty(0, dtype=np.float32)
        if len(scan):
            kscan = min(self.cfg.scan_k, len(lists))
            vecs = np.ascontiguousarray(np.concatenate([old_vecs, new_vecs]))
            sc, rows = self._scan(vecs, lists, scan, kscan)
            t_row = thr[scan]
            finite = np.isfinite(t_row)
            t_del = t_row.copy()
            t_del[finite] -= _DELETE_TOL * (np.abs(t_row[finite]) + 1.0)
            # a full row whose worst candidate still qualifies may hide more: search it again
            full = (rows[:, -1] >= 0) & (sc[:, -1] >= t_del)
            reset = scan[full]
            n_overflow = len(reset)
            keep = ~full
            scan, sc, rows, t_row, t_del = (
                scan[keep],
                sc[keep],
                rows[keep],
                t_row[keep],
                t_del[keep],
            )
            is_old = (rows >= 0) & (rows < old_n)
            qi, ci = np.nonzero(is_old & (sc >= t_del[:, None]))
            del_slots, del_ids = scan[qi], old_ids[rows[qi, ci]]
            qi, ci = np.nonzero((rows >= old_n) & (sc > t_row[:, None]))
            ins_slots, ins_rows, ins_scores = scan[qi], rows[qi, ci] - old_n, sc[qi, ci]
        scanned = len(scan) + len(reset)

        # removed ads: check the rows whose valid prefix can hold them, compact them
        hit_rows = 0
        if len(del_slots):
            eq = self._I[del_slots] == del_ids[:, None]
            has = eq.any(axis=1)
            slots, pos = del_slots[has], eq[has].argmax(axis=1)
            if len(slots):
                hit = np.unique(slots)
                hit_rows = len(hit)
                snapshot(hit)
                r = np.searchsorted(hit, slots)
                mask = np.zeros((len(hit), self.width), dtype=bool)
                mask[r, pos] = True
                order = np.argsort(mask, axis=1, kind="stable")
                c = self._c[hit]
                complete = self._S[hit, c - 1] == -np.inf
                sub_i = np.take_along_axis(self._I[hit], order, axis=1)
                sub_s = np.take_along_axis(self._S[hit], order, axis=1)
                gone_n = mask.sum(axis=1)
                tail = np.arange(self.width)[None, :] >= (self.width - gone_n)[:, None]
                sub_i[tail] = -1
                sub_s[tail] = -np.inf
                self._I[hit], self._S[hit] = sub_i, sub_s
                self._c[hit] = np.where(complete, c, c - gone_n)
                reset = np.union1d(reset, hit[self._c[hit] < self.k])
        t2 = time.perf_counter()

        # 3. new ads merged where they beat the last valid score (after the deletes)
        thr = self._threshold()
        thr[reset] = np.inf
        ok = ins_scores > thr[ins_slots]
        rows, slots, scores = ins_rows[ok], ins_slots[ok], ins_scores[ok]
        merged = 0
        if len(rows):
            order = np.argsort(slots, kind="stable")
            rows, slots, scores = rows[order], slots[order], scores[order]
            upd, start, counts = np.unique(slots, return_index=True, return_counts=True)
            merged = len(upd)
            snapshot(upd)
            width_c = int(counts.max())
            col = np.arange(len(slots)) - np.repeat(start, counts)
            r = np.repeat(np.arange(len(upd)), counts)
            cand_s = np.full((len(upd), width_c), -np.inf, dtype=np.float32)
            cand_i = np.full((len(upd), width_c), -1, dtype=np.int64)
            cand_s[r, col] = scores
            cand_i[r, col] = ins_ids[rows]
            all_s = np.concatenate([self._S[upd], cand_s], axis=1)
            all_i = np.concatenate([self._I[upd], cand_i], axis=1)
            top = np.argsort(-all_s, axis=1, kind="stable")[:, : self.width]
            self._S[upd] = np.take_along_axis(all_s, top, axis=1)
            self._I[upd] = np.take_along_axis(all_i, top, axis=1)
            self._c[upd] = np.minimum(self._c[upd] + counts, self.width)
        if len(reset):
            snapshot(reset)
        t3 = time.perf_counter()

        # 4. full searches: new and changed queries, underflowing rows, the retrain backlog
        new_slots = self._alloc(fresh_q)
        self._raw[new_slots] = raw_fresh
        pend = self._pending[self._alive[self._pending]] if len(self._pending) else _empty_ids()
        batch = pend[: self.cfg.full_recompute_per_batch]
        self._pending = pend[len(batch) :]
        moved = self._alloc(self._qid[batch]) if len(batch) else _empty_ids()
        if len(batch):
            self._raw[moved] = self._raw[batch]
            self._alive[batch] = False
        routed_new = np.concatenate([new_slots, moved])
        if len(routed_new):
            self._q[routed_new] = index.prepare(self._raw[routed_new])
            self._qnorm[routed_new] = np.einsum(
                "ij,ij->i", self._q[routed_new], self._q[routed_new]
            )
            self._probe[routed_new] = index.probe_lists(self._raw[routed_new], self.nprobe_eff)
        search = np.concatenate([reset, routed_new])
        if len(search):
            s, i = index.search(self._raw[search], self.width, nprobe=self.nprobe)
            self._S[search], self._I[search] = s, i
            self._c[search] = self.width
        self._routed[routed_new] = True
        t4 = time.perf_counter()

        # 5. what changed
        b_slots = np.concatenate(before_slots) if before_slots else _empty_ids()
        b_ids = np.concatenate(before_ids) if before_ids else np.empty((0, self.k), np.int64)
        diff = np.any(self._I[b_slots, : self.k] != b_ids, axis=1)
        changed_old = b_slots[diff]
        moved_changed = moved[np.any(self._I[moved, : self.k] != self._I[batch, : self.k], axis=1)]
        out = np.concatenate([changed_old, new_slots, moved_changed])
        out = out[np.argsort(self._qid[out], kind="stable")]
        out_q = self._qid[out]
        out_s = self._S[out].copy()
        out_i = self._I[out].copy()
        self._reindex()
        self._route_new(routed_new)
        self._last_version = version
        t5 = time.perf_counter()
        stats.update(
            inserted=len(ins_ids),
            deleted=n_deleted,
            removed=len(old_ids),
            entered=len(heads.entered),
            exited=len(heads.exited) + len(heads.dropped),
            head_queries=len(self._keys),
            touched=scanned,
            overflow_searches=n_overflow,
            delete_hits=hit_rows,
            merged=merged,
            affected=int(len(b_slots) + len(routed_new)),
            full_searches=len(search),
            re_searched=len(reset),
            pending_full=self.pending_full,
            changed=len(out),
            heads_s=t0 - t_start,
            index_s=t1 - t0,
            delete_s=t2 - t1,
            insert_s=t3 - t2,
            search_s=t4 - t3,
            emit_s=t5 - t4,
            total_s=t5 - t_start,
        )
        return RefreshResult(out_q, out_i, out_s, version, stats)
