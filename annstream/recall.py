"""Sampled recall of what serving actually reads: stored neighbour lists vs an exact search.

The figure covers every way a stored list can go wrong at once: IVF approximation (nprobe),
incremental-refresh drift, a missed write, a stale version. It is measured in the thread that
owns the index (exact search reads the index), after micro-batches reached the store. The
exact side scans every ad (about a second for 100 queries at a million 384-d ads), so it is an
`ExactSweep`: a time slice of the ads per stored micro-batch (IVFFlat lists, or id chunks of
the IVFPQ exact store), the store read once the sweep is done. Ads changed during the sweep
bias the figure by about the share of the catalogue changed meanwhile.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from annstream.ann import knn_exact, recall_at_k
from annstream.config import ServiceConfig
from annstream.index import LiveIvfIndex
from annstream.store.base import NeighbourStore, as_query_ids

__all__ = ["ExactSweep", "RecallMonitor", "stored_recall"]

logger = logging.getLogger(__name__)

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]
VectorLookup = Callable[[I64], npt.ArrayLike]
_ID_CHUNK = 16_384


class ExactSweep:
    """The exact top-k of sample queries, a slice of the ads at a time: IVFFlat lists (their
    vectors are exact), or, under IVFPQ, chunks of the ids live at the start read from the
    exact vector store.

    Keeps 2k candidates per query (deleted ones are dropped at the end); finished when every
    list (or id) was scanned once.
    """

    def __init__(self, index: LiveIvfIndex, queries: F32, k: int) -> None:
        self.index, self.version = index, index.version
        self.queries = index.prepare(queries)
        self.k = k
        self.keep = 2 * k
        n = self.queries.shape[0]
        self.scores = np.full((n, self.keep), -np.inf, dtype="float32")
        self.ids = np.full((n, self.keep), -1, dtype="int64")
        self.next_list = 0
        self.lists_per_call = 16
        self._ids: I64 | None = None if index.cfg.kind == "ivfflat" else index.ids()
        self._next_row = 0

    def step(self, budget_s: float) -> bool:
        """Scan for about `budget_s` seconds (at least one slice); True once all was scanned."""
        if self._ids is not None:
            return self._step_ids(budget_s, self._ids)
        ivf = self.index.ivf
        nlist, n = int(ivf.nlist), self.queries.shape[0]
        t0 = time.perf_counter()
        was = ivf.nprobe
        try:
            while self.next_list < nlist:
                a = self.next_list
                b = min(nlist, a + self.lists_per_call)
                ivf.nprobe = b - a  # Faiss reads the probe width from the index
                assign = np.broadcast_to(np.arange(a, b, dtype="int64"), (n, b - a))
                searcher: Any = ivf  # the numpy wrapper of Faiss, not the SWIG signature
                dist, ids = searcher.search_preassigned(self.queries, self.keep, assign, None)
                scores = -dist if self.index.metric == "l2" else dist
                self._merge(np.asarray(scores, dtype="float32"), ids)
                self.next_list = b
                if time.perf_counter() - t0 >= budget_s:
                    break
        finally:
            ivf.nprobe = was
        return self.next_list >= nlist

    def _step_ids(self, budget_s: float, ids: I64) -> bool:
        t0 = time.perf_counter()
        while self._next_row < len(ids):
            chunk = ids[self._next_row : self._next_row + _ID_CHUNK]
            self._next_row += _ID_CHUNK
            chunk = chunk[self.index.contains(chunk)]
            if len(chunk):
                vectors = self.index.vectors(chunk)
                scores, found = knn_exact(
                    vectors, chunk, self.queries, self.keep, self.index.metric
                )
                self._merge(scores, found)
            if time.perf_counter() - t0 >= budget_s:
                break
        return self._next_row >= len(ids)

    def _merge(self, scores: F32, ids: I64) -> None:
        s = np.concatenate([self.scores, scores], axis=1)
        i = np.concatenate([self.ids, ids], axis=1)
        s[i < 0] = -np.inf
        top = np.argpartition(-s, self.keep - 1, axis=1)[:, : self.keep]
        self.scores = np.take_along_axis(s, top, axis=1)
        self.ids = np.take_along_axis(i, top, axis=1)

    def exact_ids(self) -> I64:
        """int64[n, k]: the exact top-k live ids per query once swept (-1 pads)."""
        ids, scores = self.ids.copy(), self.scores.copy()
        live = ids >= 0
        live[live] = self.index.contains(ids[live])
        scores[~live] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, : self.k]
        return np.where(
            np.take_along_axis(live, order, axis=1), np.take_along_axis(ids, order, axis=1), -1
        )

    def recall(self) -> float:
        """recall@k of the index's search (live nprobe) against the swept exact top-k."""
        _, found = self.index.search(self.queries, self.k, prepared=True)
        return recall_at_k(found, self.exact_ids(), self.k)


def stored_recall(
    store: NeighbourStore,
    index: LiveIvfIndex,
    query_ids: npt.ArrayLike,
    query_vectors: npt.ArrayLike,
    k: int,
) -> float:
    """Mean recall@k of the stored lists of `query_ids` against the exact top k of the index.

    A query with no stored list counts as recall 0 (serving would return nothing); NaN when
    `query_ids` is empty.
    """
    qids = as_query_ids(query_ids)
    x = np.ascontiguousarray(query_vectors, dtype="float32")
    if x.ndim != 2 or x.shape[0] != qids.size:
        raise ValueError(
            f"query_vectors must have shape ({qids.size}, d), one row per query id, got {x.shape}"
        )
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if qids.size == 0:
        return math.nan
    _, true_ids = index.search_exact(x, k)
    return _stored_against(store, qids, true_ids, k)


def _stored_against(store: NeighbourStore, qids: I64, true_ids: I64, k: int) -> float:
    """Mean recall@k of the stored lists of `qids` against `true_ids` (their exact top k)."""
    found = store.lookup(qids)
    stored = np.full((qids.size, k), -1, dtype="int64")
    width = min(k, found.ids.shape[1])
    stored[:, :width] = found.ids[:, :width]
    stored[~found.found] = -1
    no_truth = (true_ids < 0).all(axis=1)
    if no_truth.all():
        return 1.0
    return recall_at_k(stored[~no_truth], true_ids[~no_truth], k)


class RecallMonitor:
    """Every `every_batches` micro-batches (or when `request`ed), recall@k of `sample` random
    head queries; the exact side swept `slice_s` seconds per stored micro-batch."""

    def __init__(
        self,
        every_batches: int,
        sample: int,
        k: int,
        warn_below: float,
        *,
        seed: int | None = 0,
        slice_s: float = 0.02,
    ) -> None:
        if every_batches < 0:
            raise ValueError(f"recall every_batches must be >= 0 (0 = off), got {every_batches}")
        if sample <= 0 or k <= 0:
            raise ValueError(f"recall sample ({sample}) and k ({k}) must be positive")
        if not 0.0 <= warn_below <= 1.0:
            raise ValueError(f"recall warn_below must be in [0, 1], got {warn_below}")
        self.every_batches = every_batches
        self.sample = sample
        self.k = k
        self.warn_below = warn_below
        self.batches = 0
        self.last: float | None = None
        self.slice_s = slice_s
        self._rng = np.random.default_rng(seed)
        self._requested = False
        self._sweep: ExactSweep | None = None
        self._picked: I64 = np.empty(0, dtype="int64")

    @classmethod
    def from_config(cls, cfg: ServiceConfig, k: int) -> RecallMonitor:
        return cls(cfg.recall_every_batches, cfg.recall_sample, k, cfg.recall_warn_below)

    @property
    def measuring(self) -> bool:
        """A measurement is under way (its exact side needs more micro-batches)."""
        return self._sweep is not None or self._requested

    def request(self) -> None:
        """Measure at the next stored micro-batch, whatever `every_batches` says."""
        self._requested = True

    def after_batch(
        self,
        store: NeighbourStore,
        index: LiveIvfIndex,
        head_ids: npt.ArrayLike,
        vectors: VectorLookup,
    ) -> float | None:
        """Count one stored micro-batch; when due, start a measurement, and scan a slice of
        its exact side. Returns the figure once a measurement is complete, else None."""
        self.batches += 1
        sweep = self._sweep
        if sweep is not None and (sweep.index is not index or sweep.version != index.version):
            sweep = self._sweep = None  # the index was swapped: start again
        if sweep is None:
            due = self.every_batches and not self.batches % self.every_batches
            if not (due or self._requested):
                return None
            self._requested = False
            picked = self._pick(index, head_ids, vectors)
            if picked is None:
                return None
            pick, x = picked
            sweep = self._sweep = ExactSweep(index, x, self.k)
            self._picked = pick
        if not sweep.step(self.slice_s):
            return None
        self._sweep = None
        still = np.isin(self._picked, as_query_ids(head_ids))  # left meanwhile: not counted
        if not still.any():
            return None
        true_ids = sweep.exact_ids()[still]
        recall = _stored_against(store, self._picked[still], true_ids, self.k)
        return self._report(recall, len(true_ids))

    def _pick(
        self, index: LiveIvfIndex, head_ids: npt.ArrayLike, vectors: VectorLookup
    ) -> tuple[I64, F32] | None:
        heads = as_query_ids(head_ids)
        if heads.size == 0 or index.ntotal == 0:
            return None
        pick = np.sort(self._rng.choice(heads, min(self.sample, heads.size), replace=False))
        try:
            x = np.ascontiguousarray(vectors(pick), dtype="float32")
        except KeyError as exc:
            logger.warning("recall sample skipped: %s", exc)
            return None
        return pick, x

    def measure(
        self,
        store: NeighbourStore,
        index: LiveIvfIndex,
        head_ids: npt.ArrayLike,
        vectors: VectorLookup,
    ) -> float | None:
        """Recall@k of a fresh random sample of `head_ids`, now, in one go (None when there
        is nothing to sample or the query vectors are gone)."""
        picked = self._pick(index, head_ids, vectors)
        if picked is None:
            return None
        pick, x = picked
        return self._report(stored_recall(store, index, pick, x, self.k), pick.size)

    def _report(self, recall: float, n: int) -> float:
        self.last = recall
        if recall < self.warn_below:
            logger.warning(
                "stored recall@%d is %.3f over %d head queries, under %.3f: check nprobe, "
                "list imbalance (retrain) and store errors",
                self.k,
                recall,
                n,
                self.warn_below,
            )
        else:
            logger.debug("stored recall@%d %.4f over %d head queries", self.k, recall, n)
        return recall
