"""Sampled recall of what serving actually reads: stored neighbour lists vs an exact search.

The figure covers every way a stored list can go wrong at once: IVF approximation (nprobe),
incremental-refresh drift, a missed write, a stale version. It is measured in the thread that
owns the index (exact search reads the index), right after a micro-batch reached the store,
so the store and the index describe the same moment.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from annstream.ann import recall_at_k
from annstream.config import ServiceConfig
from annstream.index import LiveIvfIndex
from annstream.store.base import NeighbourStore, as_query_ids

__all__ = ["RecallMonitor", "stored_recall"]

logger = logging.getLogger(__name__)

I64 = npt.NDArray[np.int64]
VectorLookup = Callable[[I64], npt.ArrayLike]


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
    """Every `every_batches` micro-batches, recall@k of `sample` random head queries."""

    def __init__(
        self,
        every_batches: int,
        sample: int,
        k: int,
        warn_below: float,
        *,
        seed: int | None = 0,
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
        self._rng = np.random.default_rng(seed)

    @classmethod
    def from_config(cls, cfg: ServiceConfig, k: int) -> RecallMonitor:
        return cls(cfg.recall_every_batches, cfg.recall_sample, k, cfg.recall_warn_below)

    def after_batch(
        self,
        store: NeighbourStore,
        index: LiveIvfIndex,
        head_ids: npt.ArrayLike,
        vectors: VectorLookup,
    ) -> float | None:
        """Count one stored micro-batch; measure when due. Returns the new figure or None."""
        self.batches += 1
        if self.every_batches == 0 or self.batches % self.every_batches:
            return None
        return self.measure(store, index, head_ids, vectors)

    def measure(
        self,
        store: NeighbourStore,
        index: LiveIvfIndex,
        head_ids: npt.ArrayLike,
        vectors: VectorLookup,
    ) -> float | None:
        """Recall@k of a fresh random sample of `head_ids` (None when there is nothing to
        sample or the query vectors are gone)."""
        heads = as_query_ids(head_ids)
        if heads.size == 0 or index.ntotal == 0:
            return None
        pick = np.sort(self._rng.choice(heads, min(self.sample, heads.size), replace=False))
        try:
            x = vectors(pick)
        except KeyError as exc:
            logger.warning("recall sample skipped: %s", exc)
            return None
        recall = stored_recall(store, index, pick, x, self.k)
        self.last = recall
        if recall < self.warn_below:
            logger.warning(
                "stored recall@%d is %.3f over %d head queries, under %.3f: check nprobe, "
                "list imbalance (retrain) and store errors",
                self.k,
                recall,
                pick.size,
                self.warn_below,
            )
        else:
            logger.debug("stored recall@%d %.4f over %d head queries", self.k, recall, pick.size)
        return recall
