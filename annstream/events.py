"""Columnar batches of ad and engagement events: what producers write and consumers act on.

Domain classes never import Avro; annstream.codec converts between these and Kafka payloads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

__all__ = [
    "ENGAGEMENT_TYPES",
    "OP_DELETE",
    "OP_UPSERT",
    "AdBatch",
    "AdChanges",
    "EngagementBatch",
    "Rejection",
]

OP_UPSERT = 0
OP_DELETE = 1
OPS = ("UPSERT", "DELETE")
ENGAGEMENT_TYPES = ("IMPRESSION", "CLOSEUP", "CLICK", "SAVE", "CHECKOUT", "OTHER")
NO_ID = -1


def _check(name: str, a: np.ndarray, dtype: str, n: int, ndim: int = 1) -> None:
    if a.dtype != np.dtype(dtype) or a.ndim != ndim or a.shape[0] != n:
        raise ValueError(
            f"{name}: expected {dtype} with {ndim} dimension(s) and {n} rows, "
            f"got {a.dtype} of shape {a.shape}"
        )


def _empty_ids() -> np.ndarray:
    return np.empty(0, dtype=np.int64)


def _last_rows(ids: np.ndarray) -> np.ndarray:
    """Row of the last occurrence of each distinct id, in id order."""
    n = len(ids)
    if n < 2 or bool(np.all(ids[1:] > ids[:-1])):
        return np.arange(n)
    _, first_in_reversed = np.unique(ids[::-1], return_index=True)
    return n - 1 - first_in_reversed


@dataclass(frozen=True)
class AdChanges:
    """The net ad changes of one micro-batch: each ad once, upserts and deletes disjoint.

    Normalised once, here, and trusted downstream (index, refresher, ad metadata): from any
    input, the last upsert of an id wins, an id both upserted and deleted is deleted, upserts
    come sorted by id with float32 C-ordered finite vectors (one per id), deletes sorted and
    unique. `AdBatch.net()` builds one with "last event wins" between upserts and deletes.
    `advertiser_ids` / `campaign_ids` line up with `upsert_ids` (NO_ID when unknown).
    """

    upsert_ids: np.ndarray  # int64[n], sorted, unique
    upsert_vectors: np.ndarray  # float32[n, d]
    delete_ids: np.ndarray = field(default_factory=_empty_ids)  # int64[m], sorted, unique
    advertiser_ids: np.ndarray | None = None  # int64[n]
    campaign_ids: np.ndarray | None = None  # int64[n]

    def __post_init__(self) -> None:
        ids = np.ascontiguousarray(self.upsert_ids, dtype=np.int64).reshape(-1)
        x = np.asarray(self.upsert_vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] != len(ids):
            raise ValueError(
                f"AdChanges: upsert_vectors must have shape ({len(ids)}, d), got {x.shape}"
            )
        if not np.isfinite(x).all():
            bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
            raise ValueError(
                f"AdChanges: the vectors of ads {ids[bad[:10]].tolist()} contain NaN or inf: "
                "drop those ads first"
            )
        dels = np.asarray(self.delete_ids, dtype=np.int64).reshape(-1)
        if len(dels) > 1 and not bool(np.all(dels[1:] > dels[:-1])):
            dels = np.unique(dels)
        rows = _last_rows(ids)
        if len(dels) and len(rows):
            rows = rows[~np.isin(ids[rows], dels, assume_unique=True)]
        full = len(rows) == len(ids) and bool(np.all(rows == np.arange(len(ids))))
        columns = {"advertiser_ids": self.advertiser_ids, "campaign_ids": self.campaign_ids}
        for name, col in columns.items():
            a = _ids_or_none(col, len(ids))
            if a.shape != ids.shape:
                raise ValueError(f"AdChanges: {name} must have {len(ids)} entries, got {a.shape}")
            object.__setattr__(self, name, a if full else a[rows])
        object.__setattr__(self, "upsert_ids", ids if full else ids[rows])
        object.__setattr__(self, "upsert_vectors", np.ascontiguousarray(x if full else x[rows]))
        object.__setattr__(self, "delete_ids", np.ascontiguousarray(dels))

    @classmethod
    def empty(cls, dim: int) -> AdChanges:
        return cls(_empty_ids(), np.empty((0, dim), dtype=np.float32), _empty_ids())

    @property
    def dim(self) -> int:
        return int(self.upsert_vectors.shape[1])

    def __len__(self) -> int:
        return len(self.upsert_ids) + len(self.delete_ids)


@dataclass(frozen=True)
class AdBatch:
    """n ad events in arrival order; vectors are zero rows for deletes."""

    ad_ids: np.ndarray  # int64[n]
    ops: np.ndarray  # uint8[n]: OP_UPSERT / OP_DELETE
    vectors: np.ndarray  # float32[n, d]
    event_time_ms: np.ndarray  # int64[n]
    advertiser_ids: np.ndarray  # int64[n], NO_ID when unknown
    campaign_ids: np.ndarray  # int64[n], NO_ID when unknown
    model_versions: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        n = len(self.ad_ids)
        _check("ad_ids", self.ad_ids, "int64", n)
        _check("ops", self.ops, "uint8", n)
        _check("vectors", self.vectors, "float32", n, ndim=2)
        _check("event_time_ms", self.event_time_ms, "int64", n)
        _check("advertiser_ids", self.advertiser_ids, "int64", n)
        _check("campaign_ids", self.campaign_ids, "int64", n)
        if self.model_versions and len(self.model_versions) != n:
            raise ValueError(f"model_versions: expected {n} entries or none")

    def __len__(self) -> int:
        return len(self.ad_ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @classmethod
    def upserts(
        cls,
        ad_ids: np.ndarray,
        vectors: np.ndarray,
        event_time_ms: np.ndarray | int,
        advertiser_ids: np.ndarray | None = None,
        campaign_ids: np.ndarray | None = None,
        model_version: str = "",
    ) -> AdBatch:
        ids = np.ascontiguousarray(ad_ids, dtype="int64")
        n = len(ids)
        return cls(
            ad_ids=ids,
            ops=np.full(n, OP_UPSERT, dtype="uint8"),
            vectors=np.ascontiguousarray(vectors, dtype="float32"),
            event_time_ms=np.broadcast_to(np.asarray(event_time_ms, dtype="int64"), (n,)).copy(),
            advertiser_ids=_ids_or_none(advertiser_ids, n),
            campaign_ids=_ids_or_none(campaign_ids, n),
            model_versions=(model_version,) * n if model_version else (),
        )

    @classmethod
    def deletes(cls, ad_ids: np.ndarray, dim: int, event_time_ms: np.ndarray | int) -> AdBatch:
        ids = np.ascontiguousarray(ad_ids, dtype="int64")
        n = len(ids)
        return cls(
            ad_ids=ids,
            ops=np.full(n, OP_DELETE, dtype="uint8"),
            vectors=np.zeros((n, dim), dtype="float32"),
            event_time_ms=np.broadcast_to(np.asarray(event_time_ms, dtype="int64"), (n,)).copy(),
            advertiser_ids=np.full(n, NO_ID, dtype="int64"),
            campaign_ids=np.full(n, NO_ID, dtype="int64"),
        )

    @classmethod
    def concat(cls, batches: Sequence[AdBatch], dim: int) -> AdBatch:
        """One batch of all events in order (an empty batch of dimension `dim` for none)."""
        if len(batches) == 1:
            return batches[0]
        if not batches:
            return cls.deletes(np.empty(0, "int64"), dim, 0)
        versions = (
            ()
            if any(not b.model_versions for b in batches)
            else sum((b.model_versions for b in batches), ())
        )
        return cls(**_stacked(batches, "model_versions"), model_versions=versions)

    def net_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(upsert rows, delete rows), in event order: the last event of each ad wins.

        Rows rather than ids, so every column of an upsert (vector, advertiser, campaign)
        lines up.
        """
        n = len(self)
        if n == 0:
            empty = np.empty(0, dtype=np.intp)
            return empty, empty
        last = np.sort(_last_rows(self.ad_ids))
        upsert = self.ops[last] == OP_UPSERT
        return last[upsert], last[~upsert]

    def net(self) -> AdChanges:
        """The net changes of the batch (last event of each ad wins), normalised once."""
        up, dels = self.net_rows()
        order = up[np.argsort(self.ad_ids[up], kind="stable")]
        return AdChanges(
            self.ad_ids[order],
            self.vectors[order],
            np.sort(self.ad_ids[dels]),
            self.advertiser_ids[order],
            self.campaign_ids[order],
        )

    def take(self, rows: np.ndarray) -> AdBatch:
        """The events at `rows` (indices or a boolean mask), in that order."""
        idx = np.flatnonzero(rows) if rows.dtype == bool else rows
        return AdBatch(
            ad_ids=self.ad_ids[idx],
            ops=self.ops[idx],
            vectors=np.ascontiguousarray(self.vectors[idx]),
            event_time_ms=self.event_time_ms[idx],
            advertiser_ids=self.advertiser_ids[idx],
            campaign_ids=self.campaign_ids[idx],
            model_versions=tuple(self.model_versions[i] for i in idx)
            if self.model_versions
            else (),
        )


@dataclass(frozen=True)
class EngagementBatch:
    """n engagement events; `has_vector` marks rows whose event carried the query's vector."""

    query_ids: np.ndarray  # int64[n]
    item_ids: np.ndarray  # int64[n], NO_ID when none
    event_types: np.ndarray  # uint8[n], index into ENGAGEMENT_TYPES
    weights: np.ndarray  # float32[n]
    event_time_ms: np.ndarray  # int64[n]
    vectors: np.ndarray  # float32[n, d], zero rows where has_vector is False
    has_vector: np.ndarray  # bool[n]

    def __post_init__(self) -> None:
        n = len(self.query_ids)
        _check("query_ids", self.query_ids, "int64", n)
        _check("item_ids", self.item_ids, "int64", n)
        _check("event_types", self.event_types, "uint8", n)
        _check("weights", self.weights, "float32", n)
        _check("event_time_ms", self.event_time_ms, "int64", n)
        _check("vectors", self.vectors, "float32", n, ndim=2)
        _check("has_vector", self.has_vector, "bool", n)

    def __len__(self) -> int:
        return len(self.query_ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @classmethod
    def concat(cls, batches: Sequence[EngagementBatch], dim: int) -> EngagementBatch:
        """One batch of all events in order (an empty batch of dimension `dim` for none)."""
        if len(batches) == 1:
            return batches[0]
        if not batches:
            empty = np.empty(0, "int64")
            return cls(
                empty,
                empty,
                np.empty(0, "uint8"),
                np.empty(0, "float32"),
                empty,
                np.empty((0, dim), "float32"),
                np.empty(0, bool),
            )
        return cls(**_stacked(batches))

    def take(self, rows: np.ndarray) -> EngagementBatch:
        idx = np.flatnonzero(rows) if rows.dtype == bool else rows
        return EngagementBatch(
            query_ids=self.query_ids[idx],
            item_ids=self.item_ids[idx],
            event_types=self.event_types[idx],
            weights=self.weights[idx],
            event_time_ms=self.event_time_ms[idx],
            vectors=np.ascontiguousarray(self.vectors[idx]),
            has_vector=self.has_vector[idx],
        )


@dataclass(frozen=True)
class Rejection:
    """Message `index` of a decoded batch was refused for `reason` (for the dead-letter topic)."""

    index: int
    reason: str


def _stacked(batches: Sequence[Any], *skip: str) -> dict[str, np.ndarray]:
    """The array columns of same-typed batches, concatenated."""
    names = [f.name for f in fields(batches[0]) if f.name not in skip]
    return {name: np.concatenate([getattr(b, name) for b in batches]) for name in names}


def _ids_or_none(a: np.ndarray | None, n: int) -> np.ndarray:
    if a is None:
        return np.full(n, NO_ID, dtype="int64")
    return np.ascontiguousarray(a, dtype="int64")
