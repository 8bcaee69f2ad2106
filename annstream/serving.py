"""The serving reader: batch lookup of neighbour lists, filtered by the caller's rules.

Neighbour lists are fixed when they are written, but serving still applies targeting and
budget rules. The store therefore keeps K + margin neighbours (and optionally their
campaign / advertiser ids): the reader drops the ones a predicate rejects and still returns
K while the surplus lasts, saying per query how many it filtered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from annstream.config import StoreConfig
from annstream.store import LookupResult, NeighbourStore, open_store
from annstream.store.base import as_query_ids

__all__ = ["NeighbourReader", "Predicate", "ServingResult", "exclude", "select"]

logger = logging.getLogger(__name__)

Int64Array = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
# (ids, campaign_ids or None, advertiser_ids or None), each [n, m] -> keep mask [n, m]
Predicate = Callable[[Int64Array, Int64Array | None, Int64Array | None], BoolArray]


@dataclass(frozen=True)
class ServingResult:
    """Per query, in the order asked: up to `k` neighbours, best first, padded with -1/-inf."""

    query_ids: Int64Array
    found: BoolArray
    ids: Int64Array
    scores: npt.NDArray[np.float32]
    counts: Int64Array  # neighbours returned per query (< k when the surplus ran out)
    filtered: Int64Array  # neighbours the predicate removed per query
    versions: Int64Array
    computed_at_ms: Int64Array
    errors: dict[int, str] = field(default_factory=dict)  # rows the store could not read

    @property
    def missing(self) -> Int64Array:
        return self.query_ids[~self.found]


def exclude(
    campaigns: Iterable[int] = (), advertisers: Iterable[int] = (), ids: Iterable[int] = ()
) -> Predicate:
    """A predicate dropping neighbours of the given campaigns, advertisers or ad ids."""
    bad_campaigns = np.fromiter(campaigns, dtype=np.int64)
    bad_advertisers = np.fromiter(advertisers, dtype=np.int64)
    bad_ids = np.fromiter(ids, dtype=np.int64)

    def keep(
        neighbour_ids: Int64Array,
        campaign_ids: Int64Array | None,
        advertiser_ids: Int64Array | None,
    ) -> BoolArray:
        mask = ~np.isin(neighbour_ids, bad_ids)
        for name, values, bad in (
            ("campaign", campaign_ids, bad_campaigns),
            ("advertiser", advertiser_ids, bad_advertisers),
        ):
            if bad.size == 0:
                continue
            if values is None:
                raise ValueError(
                    f"cannot filter by {name}: the stored lists carry no {name} ids; "
                    f"write NeighbourLists.{name}_ids or filter by ad id"
                )
            mask &= ~np.isin(values, bad)
        return mask

    return keep


class NeighbourReader:
    """Batch lookups over any NeighbourStore; `k` defaults to the K stored with each list.

    `NeighbourReader.open(url)` opens the store for reading only: it never creates a database
    (a missing SQLite file is a StoreError naming its absolute path).
    """

    def __init__(self, store: NeighbourStore, k: int | None = None) -> None:
        if k is not None and k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.store = store
        self.k = k

    @classmethod
    def open(
        cls, url: str, cfg: StoreConfig | None = None, k: int | None = None
    ) -> NeighbourReader:
        return cls(open_store(url, cfg, create=False), k)

    def close(self) -> None:
        self.store.close()

    def lookup(
        self,
        query_ids: npt.ArrayLike,
        *,
        k: int | None = None,
        predicate: Predicate | None = None,
    ) -> ServingResult:
        qids = as_query_ids(query_ids)
        raw = self.store.lookup(qids)
        return select(raw, k if k is not None else self.k, predicate)


def select(raw: LookupResult, k: int | None, predicate: Predicate | None) -> ServingResult:
    """Keep the neighbours the predicate accepts, in score order, up to k per query."""
    n, m = raw.ids.shape
    valid = raw.ids >= 0
    keep = valid.copy()
    if predicate is not None and m:
        accepted = np.asarray(predicate(raw.ids, raw.campaign_ids, raw.advertiser_ids))
        if accepted.shape != (n, m) or accepted.dtype != np.bool_:
            raise ValueError(f"predicate must return a bool mask of shape {(n, m)}")
        keep &= accepted
    filtered = (valid & ~keep).sum(axis=1).astype(np.int64)
    # Stable sort moves kept neighbours first without changing their (score) order.
    order = np.argsort(~keep, axis=1, kind="stable")
    ids = np.take_along_axis(raw.ids, order, axis=1)
    scores = np.take_along_axis(raw.scores, order, axis=1)
    limit = raw.k if k is None else np.full(n, k, dtype=np.int64)
    counts = np.minimum(keep.sum(axis=1), limit).astype(np.int64)
    width = int(limit.max(initial=0)) if k is None else k
    if width > m:
        pad = width - m
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    ids, scores = ids[:, :width].copy(), scores[:, :width].copy()
    beyond = np.arange(width)[None, :] >= counts[:, None]
    ids[beyond], scores[beyond] = -1, -np.inf
    return ServingResult(
        query_ids=raw.query_ids,
        found=raw.found,
        ids=ids,
        scores=scores.astype(np.float32, copy=False),
        counts=counts,
        filtered=filtered,
        versions=raw.versions,
        computed_at_ms=raw.computed_at_ms,
        errors=raw.errors,
    )
