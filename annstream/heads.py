"""Head queries: which queries of this replica's shard deserve precomputed neighbour lists.

Engagement events (keyed by query id, so each replica sees its own shard) add weight to an
exponentially decayed score per query. A query enters the head set when its score reaches
`enter_score` (and, with `top_n`, it ranks in the top N of the shard) and leaves only when it
drops below `exit_score` (or out of the top N * (1 + `top_n_slack`)): the gap is the hysteresis
that stops queries from flapping. Memory is bounded by `max_tracked`: the coldest non-head
queries are evicted. Only query ids, scores, times and the latest query vector are kept (no
user identifiers). Everything is vectorised over the batch of events.

Scores decay against the tracker's clock: the latest event time seen, never beyond the wall
clock + `max_event_skew_s` (a far-future or microsecond timestamp counts as "now + skew", so one
event cannot age every query out). The clock travels with `state()`, so a restored tracker
decays from where the old one stopped instead of from 0.

A query that left the head set keeps its row while its stored list stays readable (the exit
TTL, `retire`): that expiry travels with `state()` too, so whoever restores the partition
knows which retired lists in the store it must keep clean of deleted ads. Those rows may take
the tracker past `max_tracked`; the refresher's `refresh.retired_max_mb` bounds them (a list
it empties is retired with -1, no longer kept).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from annstream.config import HeadsConfig, KafkaConfig

__all__ = ["HeadChanges", "HeadQueryTracker"]

logger = logging.getLogger(__name__)

Int64Array = npt.NDArray[np.int64]
Float32Array = npt.NDArray[np.float32]
Float64Array = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

_EVICT_TO = 0.9


def _empty_ids() -> Int64Array:
    return np.empty(0, dtype=np.int64)


@dataclass(frozen=True)
class HeadChanges:
    """What changed in the head set since the previous `changes()` call (sorted query ids).

    `dropped` are head queries forgotten by `drop()` (partition lost): the refresher forgets
    them like exits, but their stored lists belong to the new owner and must not be expired.
    `exited` includes restored head queries that did not re-enter (their stored lists were
    written by an earlier owner and must expire like any other exit).
    """

    entered: Int64Array = field(default_factory=_empty_ids)
    exited: Int64Array = field(default_factory=_empty_ids)
    vector_changed: Int64Array = field(default_factory=_empty_ids)
    dropped: Int64Array = field(default_factory=_empty_ids)

    def __len__(self) -> int:
        return len(self.entered) + len(self.exited) + len(self.vector_changed) + len(self.dropped)


class HeadQueryTracker:
    """Decayed engagement scores and cached vectors per query; decides the head set.

    `wall_clock` (seconds, like `time.time`) bounds the decay clock; tests inject their own.
    """

    def __init__(
        self,
        cfg: HeadsConfig,
        dim: int,
        max_event_skew_s: float = KafkaConfig.max_event_skew_s,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if cfg.half_life_s <= 0:
            raise ValueError(f"heads.half_life_s must be positive, got {cfg.half_life_s}")
        if cfg.exit_score > cfg.enter_score:
            raise ValueError(
                f"heads.exit_score ({cfg.exit_score}) must not exceed heads.enter_score "
                f"({cfg.enter_score}), or queries would flap"
            )
        if cfg.max_tracked <= 0 or cfg.top_n < 0 or cfg.top_n_slack < 0:
            raise ValueError("heads.max_tracked must be positive, top_n and top_n_slack >= 0")
        if not max_event_skew_s >= 0:
            raise ValueError(f"kafka.max_event_skew_s must be >= 0, got {max_event_skew_s}")
        self.cfg = cfg
        self.max_event_skew_s = max_event_skew_s
        self._wall_clock = wall_clock
        self.dim = dim
        self._half_life_ms = cfg.half_life_s * 1000.0
        cap = 1024
        self._qid = np.zeros(cap, dtype=np.int64)
        self._score = np.zeros(cap, dtype=np.float64)
        self._last = np.zeros(cap, dtype=np.int64)
        self._vec = np.zeros((cap, dim), dtype=np.float32)
        self._has_vec = np.zeros(cap, dtype=bool)
        self._head = np.zeros(cap, dtype=bool)
        self._dirty = np.zeros(cap, dtype=bool)
        self._resume = np.zeros(cap, dtype=bool)
        self._used = np.zeros(cap, dtype=bool)
        self._retired_until = np.full(cap, -1, dtype=np.int64)
        self._free: Int64Array = np.arange(cap - 1, -1, -1, dtype=np.int64)
        self._keys = _empty_ids()
        self._key_slots = _empty_ids()
        self._dropped_heads = _empty_ids()
        self._clock = 0

    # ---- bookkeeping -------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def clock_ms(self) -> int:
        """The decay clock: the latest event time observed or restored, bounded by the wall
        clock + max_event_skew_s at the time it was seen."""
        return self._clock

    def _max_time_ms(self) -> int:
        """The latest event time believed: wall clock + the allowed skew."""
        return int((self._wall_clock() + self.max_event_skew_s) * 1000.0)

    def _advance(self, time_ms: int) -> None:
        self._clock = max(self._clock, min(int(time_ms), self._max_time_ms()))

    def _grow(self, need: int) -> None:
        cap = len(self._qid)
        new_cap = max(cap * 2, cap + need)
        extra = new_cap - cap

        def pad(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
            return np.concatenate([a, np.zeros((extra, *a.shape[1:]), dtype=a.dtype)])

        self._qid, self._score, self._last = pad(self._qid), pad(self._score), pad(self._last)
        self._vec, self._has_vec, self._head = pad(self._vec), pad(self._has_vec), pad(self._head)
        self._dirty, self._resume, self._used = pad(self._dirty), pad(self._resume), pad(self._used)
        self._retired_until = np.concatenate([self._retired_until, np.full(extra, -1, np.int64)])
        self._free = np.concatenate(
            [np.arange(new_cap - 1, cap - 1, -1, dtype=np.int64), self._free]
        )

    def _alloc(self, n: int) -> Int64Array:
        if n > len(self._free):
            self._grow(n - len(self._free))
        slots = self._free[len(self._free) - n :][::-1].copy()
        self._free = self._free[: len(self._free) - n]
        return slots

    def _add(self, query_ids: Int64Array, last_ms: Int64Array) -> Int64Array:
        """Slots for untracked `query_ids` (sorted, unique): no score, no vector, no head."""
        fresh = self._alloc(len(query_ids))
        self._qid[fresh] = query_ids
        self._score[fresh] = 0.0
        self._last[fresh] = last_ms
        self._used[fresh] = True
        self._has_vec[fresh] = self._head[fresh] = self._dirty[fresh] = False
        self._resume[fresh] = False
        self._retired_until[fresh] = -1
        order = np.argsort(np.concatenate([self._keys, query_ids]), kind="stable")
        self._keys = np.concatenate([self._keys, query_ids])[order]
        self._key_slots = np.concatenate([self._key_slots, fresh])[order]
        return fresh

    def _lookup(self, query_ids: Int64Array) -> tuple[Int64Array, BoolArray]:
        """Slots of `query_ids` (sorted index search) and whether each is tracked."""
        if len(self._keys) == 0:
            return np.full(len(query_ids), -1, dtype=np.int64), np.zeros(len(query_ids), bool)
        pos = np.minimum(np.searchsorted(self._keys, query_ids), len(self._keys) - 1)
        found = self._keys[pos] == query_ids
        return np.where(found, self._key_slots[pos], -1).astype(np.int64), found

    def _forget(self, slots: Int64Array) -> None:
        if len(slots) == 0:
            return
        keep = ~np.isin(self._key_slots, slots)
        self._keys, self._key_slots = self._keys[keep], self._key_slots[keep]
        self._used[slots] = False
        self._head[slots] = self._has_vec[slots] = self._dirty[slots] = False
        self._resume[slots] = False
        self._retired_until[slots] = -1
        self._free = np.concatenate([self._free, slots])

    def _decayed(self, slots: Int64Array, now_ms: int) -> Float64Array:
        age = np.maximum(now_ms - self._last[slots], 0).astype(np.float64)
        return self._score[slots] * np.exp2(-age / self._half_life_ms)

    # ---- events ------------------------------------------------------------------------

    def observe(
        self,
        query_ids: npt.ArrayLike,
        weights: npt.ArrayLike,
        event_time_ms: npt.ArrayLike,
        vectors: npt.ArrayLike | None = None,
        has_vector: npt.ArrayLike | None = None,
    ) -> None:
        """Add a batch of engagement events; `vectors[i]` counts only where `has_vector[i]`.

        Event times are clipped to [0, wall clock + max_event_skew_s]: the consumer
        dead-letters events beyond the skew, this keeps the tracker safe without it.
        """
        qids = np.asarray(query_ids, dtype=np.int64).reshape(-1)
        n = len(qids)
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        t = np.clip(np.asarray(event_time_ms, dtype=np.int64).reshape(-1), 0, self._max_time_ms())
        if len(w) != n or len(t) != n:
            raise ValueError(
                f"observe: query_ids ({n}), weights ({len(w)}) and event_time_ms ({len(t)}) "
                "must have the same length"
            )
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("observe: weights must be finite and >= 0")
        vecs: Float32Array | None = None
        hv: BoolArray | None = None
        if vectors is not None:
            vecs = np.ascontiguousarray(vectors, dtype=np.float32)
            if vecs.ndim != 2 or vecs.shape != (n, self.dim):
                raise ValueError(
                    f"observe: vectors must have shape ({n}, {self.dim}), got {vecs.shape}"
                )
            hv = (
                np.ones(n, dtype=bool)
                if has_vector is None
                else np.asarray(has_vector, dtype=bool).reshape(-1)
            )
            if len(hv) != n:
                raise ValueError(f"observe: has_vector must have length {n}, got {len(hv)}")
            if not np.all(np.isfinite(vecs[hv])):
                raise ValueError("observe: query vectors must be finite (no NaN or inf)")
        if n == 0:
            return
        self._advance(int(t.max()))

        uq, inv = np.unique(qids, return_inverse=True)
        t_max = np.full(len(uq), np.iinfo(np.int64).min, dtype=np.int64)
        np.maximum.at(t_max, inv, t)
        gain = np.bincount(
            inv,
            weights=w * np.exp2((t - t_max[inv]).astype(np.float64) / self._half_life_ms),
            minlength=len(uq),
        )

        slots, found = self._lookup(uq)
        new = ~found
        if new.any():
            slots[new] = self._add(uq[new], t_max[new])

        last = self._last[slots]
        new_last = np.maximum(last, t_max)
        self._score[slots] = self._score[slots] * np.exp2(
            (last - new_last).astype(np.float64) / self._half_life_ms
        ) + gain * np.exp2((t_max - new_last).astype(np.float64) / self._half_life_ms)
        self._last[slots] = new_last

        if vecs is not None and hv is not None and hv.any():
            rows = np.flatnonzero(hv)
            # the last vector of each query in batch order wins
            rev = rows[::-1]
            uq_v, first_rev = np.unique(qids[rev], return_index=True)
            src = rev[first_rev]
            vslots, _ = self._lookup(uq_v)
            had = self._has_vec[vslots]
            differs = np.any(self._vec[vslots] != vecs[src], axis=1)
            self._dirty[vslots] |= had & differs
            self._vec[vslots] = vecs[src]
            self._has_vec[vslots] = True

        excess = len(self._keys) - self.cfg.max_tracked
        if excess > 0:
            self._evict(len(self._keys) - int(self.cfg.max_tracked * _EVICT_TO))

    def _evict(self, count: int) -> None:
        """Forget the `count` coldest non-head queries (by score decayed to a common time).

        Restored heads waiting for their first `changes()` and queries whose retired list is
        still readable are kept: forgetting them would leave their stored lists without an
        owner."""
        keys = self._key_slots
        readable = self._retired_until[keys] > int(self._wall_clock() * 1000.0)
        slots = keys[~(self._head[keys] | self._resume[keys] | readable)]
        count = min(count, len(slots))
        if count <= 0:
            logger.warning("head tracker over max_tracked but every query is a head query")
            return
        with np.errstate(divide="ignore"):
            key = np.log2(self._score[slots]) + self._last[slots] / self._half_life_ms
        cold = slots[np.argpartition(key, count - 1)[:count]] if count < len(slots) else slots
        self._forget(cold)
        logger.debug("evicted %d cold queries", count)

    # ---- head set ----------------------------------------------------------------------

    def changes(self, now_ms: int | None = None) -> HeadChanges:
        """Re-decide the head set at `now_ms` (default: the clock); report entries, exits and
        changed vectors.

        Restored heads (`load_state`) re-enter at the exit threshold (hysteresis survives a
        move between replicas); those that do not are reported as exited, once.
        """
        slots = self._key_slots
        cur = self._decayed(slots, self._clock if now_ms is None else int(now_ms))
        head = self._head[slots]
        resume = self._resume[slots]
        cfg = self.cfg
        enter_at = np.where(resume, cfg.exit_score, cfg.enter_score)
        enter = ~head & self._has_vec[slots] & (cur >= enter_at)
        leave = head & (cur < cfg.exit_score)
        if cfg.top_n > 0:
            keep_n = math.ceil(cfg.top_n * (1.0 + cfg.top_n_slack))
            cand = np.flatnonzero(self._has_vec[slots])
            in_top = np.zeros(len(slots), dtype=bool)
            in_keep = np.zeros(len(slots), dtype=bool)
            for n, mask in ((cfg.top_n, in_top), (keep_n, in_keep)):
                if n >= len(cand):
                    mask[cand] = True
                else:
                    mask[cand[np.argpartition(-cur[cand], n - 1)[:n]]] = True
            enter &= np.where(resume, in_keep, in_top)
            leave |= head & ~in_keep
        changed = head & ~leave & self._dirty[slots]
        self._head[slots[enter]] = True
        self._head[slots[leave]] = False
        self._retired_until[slots[enter]] = -1
        self._dirty[slots] = False
        self._resume[slots] = False
        qids = self._keys
        dropped, self._dropped_heads = np.sort(self._dropped_heads), _empty_ids()
        return HeadChanges(
            entered=qids[enter],
            exited=qids[leave | (resume & ~enter)],
            vector_changed=qids[changed],
            dropped=dropped,
        )

    def resume(self, query_ids: npt.ArrayLike) -> None:
        """Treat these queries as restored heads (tracked or not): their lists may be stored
        live, so the next `changes()` re-enters them at the exit threshold or reports them as
        exited (a query without a vector cannot re-enter)."""
        qids = np.unique(np.asarray(query_ids, dtype=np.int64).reshape(-1))
        slots, found = self._lookup(qids)
        if not found.all():
            slots[~found] = self._add(qids[~found], np.zeros(int((~found).sum()), np.int64))
        self._resume[slots[~self._head[slots]]] = True

    def head_ids(self) -> Int64Array:
        """The current head query ids, sorted."""
        return self._keys[self._head[self._key_slots]]

    def tracked_ids(self) -> Int64Array:
        """Every tracked query id (head or not), sorted."""
        return self._keys.copy()

    def retire(self, query_ids: npt.ArrayLike, until_ms: npt.ArrayLike) -> None:
        """Record until when (wall clock, ms) the stored lists of these exited queries stay
        readable; -1: not readable (deleted, or not kept). Untracked ids are skipped."""
        qids = np.asarray(query_ids, dtype=np.int64).reshape(-1)
        until = np.broadcast_to(np.asarray(until_ms, dtype=np.int64), qids.shape)
        slots, found = self._lookup(qids)
        self._retired_until[slots[found]] = until[found]

    def retired(
        self, query_ids: npt.ArrayLike | None = None, now_ms: int | None = None
    ) -> tuple[Int64Array, Int64Array]:
        """(query ids, readable until ms) of the tracked queries (all, or `query_ids`) whose
        retired list is still readable at `now_ms` (default: the wall clock), by query id."""
        if query_ids is None:
            slots = self._key_slots
        else:
            s, found = self._lookup(np.asarray(query_ids, dtype=np.int64).reshape(-1))
            slots = np.sort(s[found])
        now = int(self._wall_clock() * 1000.0) if now_ms is None else int(now_ms)
        slots = slots[~self._head[slots] & (self._retired_until[slots] > now)]
        order = np.argsort(self._qid[slots], kind="stable")
        return self._qid[slots][order], self._retired_until[slots][order]

    def vectors(self, query_ids: npt.ArrayLike) -> Float32Array:
        """Cached query vectors; every id must be tracked with a vector."""
        qids = np.asarray(query_ids, dtype=np.int64).reshape(-1)
        slots, found = self._lookup(qids)
        ok = found & self._has_vec[np.maximum(slots, 0)]
        if not ok.all():
            missing = qids[~ok][:5].tolist()
            raise KeyError(f"no cached vector for query ids {missing} (not tracked or no vector)")
        return np.ascontiguousarray(self._vec[slots])

    def score(self, query_ids: npt.ArrayLike, now_ms: int | None = None) -> Float64Array:
        """Decayed scores at `now_ms` (default: the clock); 0 if untracked."""
        qids = np.asarray(query_ids, dtype=np.int64).reshape(-1)
        slots, found = self._lookup(qids)
        out = np.zeros(len(qids), dtype=np.float64)
        at = self._clock if now_ms is None else int(now_ms)
        out[found] = self._decayed(slots[found], at)
        return out

    def drop(self, query_ids: npt.ArrayLike) -> Int64Array:
        """Forget queries of partitions this replica lost; returns the head ids among them.

        Those head ids are also reported once in the next `changes().dropped`.
        """
        qids = np.unique(np.asarray(query_ids, dtype=np.int64).reshape(-1))
        slots, found = self._lookup(qids)
        slots = slots[found]
        heads = np.sort(self._qid[slots[self._head[slots]]])
        self._forget(slots)
        self._dropped_heads = np.union1d(self._dropped_heads, heads)
        return heads

    # ---- state -------------------------------------------------------------------------

    def state(self, query_ids: npt.ArrayLike | None = None) -> dict[str, npt.NDArray[Any]]:
        """Columns per tracked query (all, or `query_ids`), enough to rebuild the tracker.

        `in_head` includes restored heads not decided yet (they stay heads if restored again).
        `clock_ms` repeats the clock on every row, so any subset of rows carries it.
        `retired_until_ms`: until when the query's retired list stays readable (-1: none)."""
        if query_ids is None:
            slots = self._key_slots
        else:
            s, found = self._lookup(np.asarray(query_ids, dtype=np.int64).reshape(-1))
            slots = s[found]
        return {
            "query_ids": self._qid[slots].copy(),
            "scores": self._score[slots].copy(),
            "last_ms": self._last[slots].copy(),
            "in_head": self._head[slots] | self._resume[slots],
            "has_vector": self._has_vec[slots].copy(),
            "vectors": self._vec[slots].copy(),
            "clock_ms": np.full(len(slots), self._clock, dtype=np.int64),
            "retired_until_ms": self._retired_until[slots].copy(),
        }

    def load_state(self, state: dict[str, npt.NDArray[Any]]) -> None:
        """Merge rows from `state()` (replacing tracked ones; the last row of a query wins).

        Earlier heads re-enter at the exit threshold in the next `changes()` or are reported
        as exited there. The clock moves to the latest restored clock (rows without a
        `clock_ms` column: their latest `last_ms`), bounded like event times."""
        qids = np.asarray(state["query_ids"], dtype=np.int64).reshape(-1)
        n = len(qids)
        if n == 0:  # a changelog chunk that only records an engagement offset
            return
        vecs = np.ascontiguousarray(state["vectors"], dtype=np.float32).reshape(n, -1)
        if n and vecs.shape[1] != self.dim:
            raise ValueError(
                f"load_state: vectors have dim {vecs.shape[1]}, tracker has {self.dim}"
            )
        uq, first = np.unique(qids[::-1], return_index=True)
        rows = (n - 1 - first).astype(np.int64)
        old, found = self._lookup(uq)
        self._forget(old[found])
        slots = self._alloc(len(uq))
        self._qid[slots] = uq
        self._score[slots] = np.asarray(state["scores"], dtype=np.float64)[rows]
        last = np.asarray(state["last_ms"], dtype=np.int64)[rows]
        self._last[slots] = np.clip(last, 0, self._max_time_ms())
        self._has_vec[slots] = np.asarray(state["has_vector"], dtype=bool)[rows]
        self._vec[slots] = vecs[rows]
        self._resume[slots] = np.asarray(state["in_head"], dtype=bool)[rows]
        until = state.get("retired_until_ms")
        self._retired_until[slots] = (
            -1 if until is None else np.asarray(until, dtype=np.int64).reshape(-1)[rows]
        )
        self._head[slots] = self._dirty[slots] = False
        self._used[slots] = True
        order = np.argsort(np.concatenate([self._keys, uq]), kind="stable")
        self._keys = np.concatenate([self._keys, uq])[order]
        self._key_slots = np.concatenate([self._key_slots, slots])[order]
        if len(uq):
            clocks = np.asarray(state.get("clock_ms", last), dtype=np.int64)
            self._advance(max(int(clocks.max()), int(last.max())))

    @classmethod
    def from_state(
        cls,
        cfg: HeadsConfig,
        dim: int,
        state: dict[str, npt.NDArray[Any]],
        max_event_skew_s: float = KafkaConfig.max_event_skew_s,
        wall_clock: Callable[[], float] = time.time,
    ) -> HeadQueryTracker:
        """A tracker rebuilt from `state()`."""
        tracker = cls(cfg, dim, max_event_skew_s, wall_clock)
        tracker.load_state(state)
        return tracker
