"""The neighbour-list record: columnar micro-batches in, one record of bins per query out.

The bin layout is documented in schemas/neighbour_record.md so that a Java or Go serving
system can read the records without annstream: ids and scores are little-endian arrays in
bytes bins, so a reader decodes them with one `frombuffer` and no per-element parsing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "BIN_ADVERTISERS",
    "BIN_AT",
    "BIN_CAMPAIGNS",
    "BIN_FORMAT",
    "BIN_IDS",
    "BIN_K",
    "BIN_QUERY",
    "BIN_SCORES",
    "BIN_VERSION",
    "RECORD_FORMAT",
    "LookupResult",
    "NeighbourLists",
    "UpsertResult",
    "lookup_result",
    "pack_record",
    "pack_records",
    "unpack_record",
]

RECORD_FORMAT = 1
BIN_FORMAT = "fmt"
BIN_QUERY = "qid"
BIN_VERSION = "v"
BIN_AT = "at"
BIN_K = "k"
BIN_IDS = "ids"
BIN_SCORES = "sc"
BIN_CAMPAIGNS = "cmp"
BIN_ADVERTISERS = "adv"

IDS_DTYPE = np.dtype("<i8")
SCORES_DTYPE = np.dtype("<f4")

Int64Array = npt.NDArray[np.int64]
Float32Array = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


def _check(name: str, value: Any, dtype: str, shape: tuple[int, ...]) -> None:
    if not isinstance(value, np.ndarray):
        raise ValueError(f"NeighbourLists.{name} must be a numpy array, got {type(value).__name__}")
    if value.dtype != np.dtype(dtype):
        raise ValueError(f"NeighbourLists.{name} must be {dtype}, got {value.dtype}: cast it")
    if value.shape != shape:
        raise ValueError(f"NeighbourLists.{name} must have shape {shape}, got {value.shape}")


@dataclass(frozen=True)
class NeighbourLists:
    """One micro-batch of results, columnar; rows are padded with id -1 and score -inf."""

    query_ids: Int64Array
    ids: Int64Array
    scores: Float32Array
    versions: Int64Array
    computed_at_ms: Int64Array
    k: int
    campaign_ids: Int64Array | None = None
    advertiser_ids: Int64Array | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.query_ids, np.ndarray) or self.query_ids.ndim != 1:
            raise ValueError("NeighbourLists.query_ids must be a 1-d int64 array")
        if not isinstance(self.ids, np.ndarray) or self.ids.ndim != 2:
            raise ValueError(
                "NeighbourLists.ids must be a 2-d int64 array of shape (n, K + margin)"
            )
        n, m = self.ids.shape
        _check("query_ids", self.query_ids, "int64", (n,))
        _check("ids", self.ids, "int64", (n, m))
        _check("scores", self.scores, "float32", (n, m))
        _check("versions", self.versions, "int64", (n,))
        _check("computed_at_ms", self.computed_at_ms, "int64", (n,))
        if self.campaign_ids is not None:
            _check("campaign_ids", self.campaign_ids, "int64", (n, m))
        if self.advertiser_ids is not None:
            _check("advertiser_ids", self.advertiser_ids, "int64", (n, m))
        if isinstance(self.k, bool) or not isinstance(self.k, int | np.integer):
            raise ValueError(f"NeighbourLists.k must be an int, got {self.k!r}")
        if not 0 < self.k <= m:
            raise ValueError(f"NeighbourLists.k must be in 1..{m} (the row width), got {self.k}")
        if n and self.versions.min() < 0:
            raise ValueError("NeighbourLists.versions must be >= 0")

    def __len__(self) -> int:
        return int(self.query_ids.shape[0])

    def take(self, rows: npt.NDArray[np.intp] | BoolArray) -> NeighbourLists:
        """The sub-batch of the given rows (index array or mask), e.g. the ones to retry."""
        return NeighbourLists(
            query_ids=self.query_ids[rows],
            ids=self.ids[rows],
            scores=self.scores[rows],
            versions=self.versions[rows],
            computed_at_ms=self.computed_at_ms[rows],
            k=self.k,
            campaign_ids=None if self.campaign_ids is None else self.campaign_ids[rows],
            advertiser_ids=None if self.advertiser_ids is None else self.advertiser_ids[rows],
        )


def _no_rows() -> BoolArray:
    return np.zeros(0, dtype=bool)


@dataclass(frozen=True)
class UpsertResult:
    """Per row of an upsert, exactly one of four outcomes.

    - `stored`: written now.
    - `stale`: not written because the store holds this version or a newer one (done).
    - `failed`: not written for a reason that may pass (timeout, busy key, full server): the
      caller retries the row and does not commit past it.
    - `permanent`: refused for good (record too big, another set at the key's digest): not
      stored and must not be retried; the caller reports it and moves on.

    `errors` names the reason (with the store's result code) of every failed or permanent row.
    """

    stored: BoolArray
    stale: BoolArray
    failed: BoolArray
    errors: dict[int, str] = field(default_factory=dict)
    permanent: BoolArray = field(default_factory=_no_rows)

    def __post_init__(self) -> None:
        n = self.stored.shape
        if self.permanent.size == 0 and n != (0,):
            object.__setattr__(self, "permanent", np.zeros(n, dtype=bool))
        masks = (self.stored, self.stale, self.failed, self.permanent)
        if any(m.shape != n or m.dtype != np.bool_ for m in masks):
            raise ValueError("UpsertResult masks must be bool arrays of one shape (n,)")
        outcomes = np.sum(np.stack(masks), axis=0)
        if n[0] and not (outcomes == 1).all():
            rows = np.flatnonzero(outcomes != 1)[:5].tolist()
            raise ValueError(
                f"UpsertResult rows {rows} must be exactly one of stored, stale, "
                "failed or permanent"
            )

    @property
    def done(self) -> BoolArray:
        """Rows the store holds at this version or newer: commit past them."""
        return self.stored | self.stale

    @property
    def settled(self) -> BoolArray:
        """Rows that need no retry: done, or refused for good."""
        return self.stored | self.stale | self.permanent


@dataclass(frozen=True)
class LookupResult:
    """Batch lookup in the order asked; rows not found are padded (ids -1, scores -inf).

    A key the store refused to read (e.g. a record of another set at its digest) is not found
    and `errors` names the reason for its row; the other rows are read as usual.
    """

    query_ids: Int64Array
    found: BoolArray
    ids: Int64Array
    scores: Float32Array
    versions: Int64Array
    computed_at_ms: Int64Array
    k: Int64Array
    campaign_ids: Int64Array | None
    advertiser_ids: Int64Array | None
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def missing(self) -> Int64Array:
        """Queries with no readable list (not stored, expired, or a row in `errors`)."""
        return self.query_ids[~self.found]


def _row_bytes(array: npt.NDArray[Any], dtype: np.dtype[Any]) -> list[bytes]:
    data = np.ascontiguousarray(array, dtype=dtype)
    width = data.shape[1] * dtype.itemsize
    blob = data.tobytes()
    return [blob[i : i + width] for i in range(0, len(blob), width)] if width else []


def pack_records(lists: NeighbourLists) -> list[dict[str, int | bytes]]:
    """The bins of every row of a micro-batch, in row order."""
    ids = _row_bytes(lists.ids, IDS_DTYPE)
    scores = _row_bytes(lists.scores, SCORES_DTYPE)
    camp = None if lists.campaign_ids is None else _row_bytes(lists.campaign_ids, IDS_DTYPE)
    adv = None if lists.advertiser_ids is None else _row_bytes(lists.advertiser_ids, IDS_DTYPE)
    qids, versions, at = (
        a.tolist() for a in (lists.query_ids, lists.versions, lists.computed_at_ms)
    )
    k = int(lists.k)
    out: list[dict[str, int | bytes]] = []
    for i in range(len(lists)):
        bins: dict[str, int | bytes] = {
            BIN_FORMAT: RECORD_FORMAT,
            BIN_QUERY: qids[i],
            BIN_VERSION: versions[i],
            BIN_AT: at[i],
            BIN_K: k,
            BIN_IDS: ids[i],
            BIN_SCORES: scores[i],
        }
        if camp is not None:
            bins[BIN_CAMPAIGNS] = camp[i]
        if adv is not None:
            bins[BIN_ADVERTISERS] = adv[i]
        out.append(bins)
    return out


def pack_record(lists: NeighbourLists, row: int) -> dict[str, int | bytes]:
    """The bins of one row (see schemas/neighbour_record.md)."""
    return pack_records(lists.take(np.array([row])))[0]


@dataclass(frozen=True)
class UnpackedRecord:
    ids: Int64Array
    scores: Float32Array
    version: int
    computed_at_ms: int
    k: int
    campaign_ids: Int64Array | None
    advertiser_ids: Int64Array | None


def unpack_record(bins: dict[str, Any]) -> UnpackedRecord:
    """Arrays of one record's bins; raises ValueError on a record of another format."""
    fmt = bins.get(BIN_FORMAT)
    if fmt != RECORD_FORMAT:
        raise ValueError(f"neighbour record format {fmt!r} is not {RECORD_FORMAT}: upgrade reader")
    ids = np.frombuffer(bins[BIN_IDS], dtype=IDS_DTYPE).astype(np.int64)
    scores = np.frombuffer(bins[BIN_SCORES], dtype=SCORES_DTYPE).astype(np.float32)
    if ids.shape != scores.shape:
        raise ValueError(f"neighbour record has {ids.size} ids but {scores.size} scores")
    camp, adv = bins.get(BIN_CAMPAIGNS), bins.get(BIN_ADVERTISERS)
    return UnpackedRecord(
        ids=ids,
        scores=scores,
        version=int(bins[BIN_VERSION]),
        computed_at_ms=int(bins[BIN_AT]),
        k=int(bins[BIN_K]),
        campaign_ids=None if camp is None else np.frombuffer(camp, IDS_DTYPE).astype(np.int64),
        advertiser_ids=None if adv is None else np.frombuffer(adv, IDS_DTYPE).astype(np.int64),
    )


def _stack(rows: list[bytes | None], n: int, width: int, dtype: np.dtype[Any], pad: Any) -> Any:
    out = np.full((n, width), pad, dtype=dtype.newbyteorder("="))
    present = [i for i, raw in enumerate(rows) if raw]
    if not present:
        return out
    row_size = width * dtype.itemsize
    if all(len(rows[i] or b"") == row_size for i in present):
        joined = b"".join(rows[i] or b"" for i in present)
        out[present] = np.frombuffer(joined, dtype=dtype).reshape(len(present), width)
        return out
    for i in present:
        values = np.frombuffer(rows[i] or b"", dtype=dtype)
        out[i, : values.size] = values
    return out


def lookup_result(
    query_ids: Int64Array,
    found_bins: list[dict[str, Any] | None],
    errors: dict[int, str] | None = None,
) -> LookupResult:
    """Assemble a LookupResult from each query's bins (None = not found), in query order.

    A record this reader cannot decode (another format, missing bins) is not found and its
    row gets an error; it does not fail the other rows.
    """
    errors = dict(errors or {})
    found_bins = list(found_bins)
    for i, b in enumerate(found_bins):
        if b is None:
            continue
        if b.get(BIN_FORMAT) != RECORD_FORMAT:
            errors[i] = (
                f"neighbour record format {b.get(BIN_FORMAT)!r} is not {RECORD_FORMAT}: "
                "upgrade the reader (or another writer uses this set)"
            )
        elif not all(isinstance(b.get(name), bytes) for name in (BIN_IDS, BIN_SCORES)) or not all(
            isinstance(b.get(name), int) for name in (BIN_VERSION, BIN_AT, BIN_K)
        ):
            errors[i] = "neighbour record lacks bins of format 1 (see schemas/neighbour_record.md)"
        else:
            continue
        found_bins[i] = None
    n = len(found_bins)
    found = np.array([b is not None for b in found_bins], dtype=bool)
    present = [b for b in found_bins if b is not None]
    width = max((len(b[BIN_IDS]) // IDS_DTYPE.itemsize for b in present), default=0)

    def column(name: str) -> list[bytes | None]:
        return [None if b is None else b.get(name) for b in found_bins]

    def scalar(name: str) -> Int64Array:
        return np.array([0 if b is None else int(b[name]) for b in found_bins], dtype=np.int64)

    has_camp = any(b.get(BIN_CAMPAIGNS) is not None for b in present)
    has_adv = any(b.get(BIN_ADVERTISERS) is not None for b in present)
    return LookupResult(
        query_ids=np.asarray(query_ids, dtype=np.int64),
        found=found,
        ids=_stack(column(BIN_IDS), n, width, IDS_DTYPE, -1),
        scores=_stack(column(BIN_SCORES), n, width, SCORES_DTYPE, -np.inf),
        versions=scalar(BIN_VERSION),
        computed_at_ms=scalar(BIN_AT),
        k=scalar(BIN_K),
        campaign_ids=_stack(column(BIN_CAMPAIGNS), n, width, IDS_DTYPE, -1) if has_camp else None,
        advertiser_ids=_stack(column(BIN_ADVERTISERS), n, width, IDS_DTYPE, -1)
        if has_adv
        else None,
        errors=errors,
    )
