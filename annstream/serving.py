"""The serving reader: lookups of neighbour lists, filtered by the caller's rules.

Neighbour lists are fixed when they are written, but serving still applies targeting and
budget rules. The store therefore keeps K + margin neighbours (and optionally their
campaign / advertiser ids): the reader drops the ones a predicate rejects and still returns
K while the surplus lasts, saying per query how many it filtered.

Serving is one key lookup instead of an ANN search, so the reader must cost what the store
costs: `lookup_one` is the single-key path (one `get`, two `frombuffer`, no columnar
assembly), `lookup` the batch path; both read the campaign / advertiser ids only when a
predicate is given. One reader serves many threads (`AsyncNeighbourReader` for asyncio).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import operator
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from annstream.config import StoreConfig
from annstream.store import LookupResult, NeighbourStore, StoredList, open_store

__all__ = [
    "AsyncNeighbourReader",
    "NeighbourReader",
    "Neighbours",
    "Predicate",
    "ServingResult",
    "exclude",
    "select",
    "select_one",
]

logger = logging.getLogger(__name__)

Int64Array = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
# (ids, campaign_ids or None, advertiser_ids or None), each [n, m] -> keep mask [n, m]
Predicate = Callable[[Int64Array, Int64Array | None, Int64Array | None], BoolArray]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_PADDING = np.array([-1], dtype=np.int64).tobytes()


class Neighbours(NamedTuple):
    """One query's neighbours: up to k, best first, no padding (`len(ids)` of them).

    `ids` and `scores` may be read-only views of the stored record. A key the store refused
    to read is not found and `error` says why.
    """

    query_id: int
    found: bool
    ids: Int64Array
    scores: npt.NDArray[np.float32]
    filtered: int  # neighbours the predicate removed
    version: int
    computed_at_ms: int
    error: str | None = None


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


def _member(values: Int64Array, sorted_bad: Int64Array) -> BoolArray:
    """values in sorted_bad, by binary search (np.isin re-sorts or builds a table per call)."""
    pos = np.searchsorted(sorted_bad, values)
    pos[pos == sorted_bad.size] = 0
    return np.asarray(sorted_bad[pos] == values)


def exclude(
    campaigns: Iterable[int] = (), advertisers: Iterable[int] = (), ids: Iterable[int] = ()
) -> Predicate:
    """A predicate dropping neighbours of the given campaigns, advertisers or ad ids."""
    bad_campaigns = np.unique(np.fromiter(campaigns, dtype=np.int64))
    bad_advertisers = np.unique(np.fromiter(advertisers, dtype=np.int64))
    bad_ids = np.unique(np.fromiter(ids, dtype=np.int64))

    def keep(
        neighbour_ids: Int64Array,
        campaign_ids: Int64Array | None,
        advertiser_ids: Int64Array | None,
    ) -> BoolArray:
        mask = np.ones(neighbour_ids.shape, dtype=bool)
        for name, values, bad in (
            ("ad", neighbour_ids, bad_ids),
            ("campaign", campaign_ids, bad_campaigns),
            ("advertiser", advertiser_ids, bad_advertisers),
        ):
            if bad.size == 0:
                continue
            if values is None:
                raise ValueError(
                    f"cannot filter by {name}: the stored lists carry no {name} ids "
                    f"(the writer ran with store.neighbour_metadata = false, or wrote no "
                    f"NeighbourLists.{name}_ids): filter by ad id"
                )
            mask &= ~_member(values, bad)
        return mask

    return keep


def _check_k(k: int | None) -> None:
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def _query_id(query_id: int) -> int:
    qid = query_id if type(query_id) is int else operator.index(query_id)
    if not _INT64_MIN <= qid <= _INT64_MAX:
        raise ValueError(f"query id {qid} is out of the int64 range")
    return qid


class NeighbourReader:
    """Lookups over any NeighbourStore; `k` defaults to the K stored with each list.

    `NeighbourReader.open(url)` opens the store for reading only: it never creates a database
    (a missing SQLite file is a StoreError naming its absolute path). A reader keeps no state
    between calls: share one between the threads of a serving process (the Aerospike client
    is thread-safe and releases the GIL; SQLite reads through one connection per thread).
    """

    def __init__(self, store: NeighbourStore, k: int | None = None) -> None:
        _check_k(k)
        self.store = store
        self.k = k

    @classmethod
    def open(
        cls, url: str, cfg: StoreConfig | None = None, k: int | None = None
    ) -> NeighbourReader:
        return cls(open_store(url, cfg, create=False), k)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> NeighbourReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lookup_one(
        self, query_id: int, *, k: int | None = None, predicate: Predicate | None = None
    ) -> Neighbours:
        """One query's neighbours: the hot path of a serving request."""
        if k is None:
            k = self.k
        elif k < 1:
            _check_k(k)
        one = self.store.lookup_one(_query_id(query_id), metadata=predicate is not None)
        return select_one(one, k, predicate)

    def lookup(
        self,
        query_ids: npt.ArrayLike,
        *,
        k: int | None = None,
        predicate: Predicate | None = None,
    ) -> ServingResult:
        """A batch of queries in one store call, columnar, in the order asked."""
        _check_k(k)
        raw = self.store.lookup(query_ids, metadata=predicate is not None)
        return select(raw, k if k is not None else self.k, predicate)


class AsyncNeighbourReader:
    """A NeighbourReader for asyncio: each lookup runs on `executor` (the loop's default
    thread pool when None), so the event loop never waits on the store."""

    def __init__(self, reader: NeighbourReader, executor: Executor | None = None) -> None:
        self.reader = reader
        self.executor = executor

    @classmethod
    def open(
        cls,
        url: str,
        cfg: StoreConfig | None = None,
        k: int | None = None,
        executor: Executor | None = None,
    ) -> AsyncNeighbourReader:
        return cls(NeighbourReader.open(url, cfg, k), executor)

    async def lookup_one(
        self, query_id: int, *, k: int | None = None, predicate: Predicate | None = None
    ) -> Neighbours:
        call = functools.partial(self.reader.lookup_one, query_id, k=k, predicate=predicate)
        return await asyncio.get_running_loop().run_in_executor(self.executor, call)

    async def lookup(
        self,
        query_ids: npt.ArrayLike,
        *,
        k: int | None = None,
        predicate: Predicate | None = None,
    ) -> ServingResult:
        call = functools.partial(self.reader.lookup, query_ids, k=k, predicate=predicate)
        return await asyncio.get_running_loop().run_in_executor(self.executor, call)

    def close(self) -> None:
        self.reader.close()

    async def __aenter__(self) -> AsyncNeighbourReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def _accepted(
    predicate: Predicate,
    ids: Int64Array,
    campaign_ids: Int64Array | None,
    advertiser_ids: Int64Array | None,
) -> BoolArray:
    accepted = np.asarray(predicate(ids, campaign_ids, advertiser_ids))
    if accepted.shape != ids.shape or accepted.dtype != np.bool_:
        raise ValueError(f"predicate must return a bool mask of shape {ids.shape}")
    return accepted


def select_one(one: StoredList, k: int | None, predicate: Predicate | None) -> Neighbours:
    """The first k neighbours of one stored list that the predicate accepts."""
    ids, scores = one.ids, one.scores
    if not one.found:
        return Neighbours(one.query_id, False, ids, scores, 0, 0, 0, one.error)
    limit = one.k if k is None else k
    if predicate is None:
        head = ids[:limit]
        # No -1 (padding) among the first k: a byte search costs a fraction of a numpy call.
        # A match across two ids is a false alarm the exact path below settles.
        if head.tobytes().find(_PADDING) < 0:
            return Neighbours(
                one.query_id, True, head, scores[:limit], 0, one.version, one.computed_at_ms
            )
        keep = ids >= 0
        filtered = 0
    else:
        valid = ids >= 0
        keep = (
            valid
            & _accepted(
                predicate,
                ids[None, :],
                None if one.campaign_ids is None else one.campaign_ids[None, :],
                None if one.advertiser_ids is None else one.advertiser_ids[None, :],
            )[0]
        )
        filtered = int(np.count_nonzero(valid & ~keep))
    picked = np.flatnonzero(keep)[:limit]
    return Neighbours(
        one.query_id, True, ids[picked], scores[picked], filtered, one.version, one.computed_at_ms
    )


def _select_all(raw: LookupResult, k: int | None) -> ServingResult | None:
    """select() without a predicate: views of the stored rows cut at k. None (the general
    path) when a row has a hole (-1 before a neighbour) or rows of several K are cut at
    their own."""
    n, m = raw.ids.shape
    width = int(raw.k.max(initial=0)) if k is None else k
    if width > m or (k is None and (raw.k[raw.found] != width).any()):
        return None
    if m == 0 or raw.ids.min() >= 0:  # every list found and full: the common case
        counts = np.full(n, min(width, m), dtype=np.int64)
    else:
        valid = raw.ids >= 0
        if (valid[:, 1:] & ~valid[:, :-1]).any():
            return None
        counts = np.minimum(np.count_nonzero(valid, axis=1), width).astype(np.int64)
    return ServingResult(
        query_ids=raw.query_ids,
        found=raw.found,
        ids=raw.ids[:, :width],
        scores=raw.scores[:, :width],
        counts=counts,
        filtered=np.zeros(n, dtype=np.int64),
        versions=raw.versions,
        computed_at_ms=raw.computed_at_ms,
        errors=raw.errors,
    )


def select(raw: LookupResult, k: int | None, predicate: Predicate | None) -> ServingResult:
    """Keep the neighbours the predicate accepts, in score order, up to k per query."""
    if predicate is None and (fast := _select_all(raw, k)) is not None:
        return fast
    n, m = raw.ids.shape
    valid = raw.ids >= 0
    keep = valid.copy()
    if predicate is not None and m:
        keep &= _accepted(predicate, raw.ids, raw.campaign_ids, raw.advertiser_ids)
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
