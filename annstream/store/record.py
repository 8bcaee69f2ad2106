"""The neighbour-list record: columnar micro-batches in, one record of bins per query out.

The bin layout is documented in schemas/neighbour_record.md so that a Java or Go serving
system can read the records without annstream: ids and scores are little-endian arrays in
bytes bins, so a reader decodes them with one `frombuffer` and no per-element parsing.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

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
    "CORE_BINS",
    "LookupResult",
    "NeighbourLists",
    "StoredList",
    "UpsertResult",
    "absent_list",
    "lookup_result",
    "lookup_result_of",
    "pack_record",
    "pack_records",
    "stored_list",
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
# What serving needs without a predicate: everything but the campaign / advertiser ids.
CORE_BINS = (BIN_FORMAT, BIN_VERSION, BIN_AT, BIN_K, BIN_IDS, BIN_SCORES)

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


def _frozen(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    array.flags.writeable = False
    return array


_NO_IDS: Int64Array = _frozen(np.empty(0, dtype=np.int64))
_NO_SCORES: Float32Array = _frozen(np.empty(0, dtype=np.float32))
_CORE = operator.itemgetter(*CORE_BINS)
_NATIVE_IDS = IDS_DTYPE.newbyteorder("=")
_NATIVE_SCORES = SCORES_DTYPE.newbyteorder("=")


class StoredList(NamedTuple):
    """One query's record as read by the single-key path: no columnar assembly.

    `ids` / `scores` (and the metadata) are read-only views of the record's bytes, all `m`
    entries, padding (-1 / -inf) included. A key the store refused to read is not found and
    `error` says why.
    """

    query_id: int
    found: bool
    ids: Int64Array
    scores: Float32Array
    version: int = 0
    computed_at_ms: int = 0
    k: int = 0
    campaign_ids: Int64Array | None = None
    advertiser_ids: Int64Array | None = None
    error: str | None = None


def absent_list(query_id: int, error: str | None = None) -> StoredList:
    """The StoredList of a key with no readable record."""
    return StoredList(query_id, False, _NO_IDS, _NO_SCORES, error=error)


def _row_error(bins: dict[str, Any], metadata: bool = True) -> str | None:
    """Why a record cannot be decoded as format 1, or None when it can."""
    fmt = bins.get(BIN_FORMAT)
    if fmt != RECORD_FORMAT:
        return (
            f"neighbour record format {fmt!r} is not {RECORD_FORMAT}: "
            "upgrade the reader (or another writer uses this set)"
        )
    ids, scores = bins.get(BIN_IDS), bins.get(BIN_SCORES)
    if (
        not isinstance(ids, bytes)
        or not isinstance(scores, bytes)
        or not all(isinstance(bins.get(name), int) for name in (BIN_VERSION, BIN_AT, BIN_K))
    ):
        return "neighbour record lacks bins of format 1 (see schemas/neighbour_record.md)"
    m = len(ids) // IDS_DTYPE.itemsize
    if len(ids) % IDS_DTYPE.itemsize or len(scores) != m * SCORES_DTYPE.itemsize:
        return f"neighbour record has {len(ids)} bytes of ids but {len(scores)} of scores"
    for name in (BIN_CAMPAIGNS, BIN_ADVERTISERS) if metadata else ():
        value = bins.get(name)
        if value is not None and (not isinstance(value, bytes) or len(value) != len(ids)):
            return f"neighbour record bin {name!r} does not hold one int64 per neighbour"
    return None


def stored_list(query_id: int, bins: dict[str, Any], *, metadata: bool = True) -> StoredList:
    """Decode one record's bins, validated as lookup_result does; `metadata=False` skips the
    campaign / advertiser ids."""
    try:
        fmt, version, at, k, ids, scores = _CORE(bins)
    except KeyError:
        return absent_list(query_id, _row_error(bins, metadata))
    camp = adv = None
    if metadata:
        camp, adv = bins.get(BIN_CAMPAIGNS), bins.get(BIN_ADVERTISERS)
    if (
        fmt != RECORD_FORMAT
        or type(ids) is not bytes
        or type(scores) is not bytes
        or len(ids) != 2 * len(scores)
        or len(scores) & 3
        or type(version) is not int
        or type(at) is not int
        or type(k) is not int
        or (camp is not None and (type(camp) is not bytes or len(camp) != len(ids)))
        or (adv is not None and (type(adv) is not bytes or len(adv) != len(ids)))
    ) and (error := _row_error(bins, metadata)) is not None:
        return absent_list(query_id, error)
    return StoredList(
        query_id,
        True,
        np.frombuffer(ids, _NATIVE_IDS),
        np.frombuffer(scores, _NATIVE_SCORES),
        version,
        at,
        k,
        None if camp is None else np.frombuffer(camp, _NATIVE_IDS),
        None if adv is None else np.frombuffer(adv, _NATIVE_IDS),
    )


def lookup_result_of(one: StoredList) -> LookupResult:
    """The one-row LookupResult of a StoredList (a batch lookup of one key)."""
    errors = {} if one.error is None else {0: one.error}

    def row(values: npt.NDArray[Any] | None) -> npt.NDArray[Any] | None:
        return None if values is None else values.reshape(1, -1).copy()

    ids, scores = row(one.ids), row(one.scores)
    assert ids is not None and scores is not None
    return LookupResult(
        query_ids=np.array([one.query_id], dtype=np.int64),
        found=np.array([one.found]),
        ids=ids,
        scores=scores,
        versions=np.array([one.version], dtype=np.int64),
        computed_at_ms=np.array([one.computed_at_ms], dtype=np.int64),
        k=np.array([one.k], dtype=np.int64),
        campaign_ids=row(one.campaign_ids),
        advertiser_ids=row(one.advertiser_ids),
        errors=errors,
    )


_FORMAT, _VERSION, _AT, _K, _IDS, _SCORES = map(operator.itemgetter, CORE_BINS)


@dataclass(frozen=True)
class _Rows:
    """The decoded columns of the records found, in row order."""

    versions: Int64Array
    computed_at_ms: Int64Array
    k: Int64Array
    ids: Int64Array  # [found, width]
    scores: Float32Array
    campaign_ids: Int64Array | None
    advertiser_ids: Int64Array | None


def _joined(blobs: list[Any], size: int, dtype: np.dtype[Any]) -> npt.NDArray[Any] | None:
    """[len(blobs), size / itemsize] from blobs that are all bytes of `size`, else None."""
    try:
        if set(map(len, blobs)) != {size}:
            return None
        joined = bytearray().join(blobs)  # one copy, and the array is writable
    except TypeError:  # a value that is not bytes (None included)
        return None
    return np.frombuffer(joined, dtype=dtype).reshape(len(blobs), size // dtype.itemsize)


def _uniform_rows(present: list[dict[str, Any]], metadata: bool) -> _Rows | None:
    """The columns when every record is format 1 with well-typed bins of one width (the
    common case: a handful of C-level passes, no per-record Python), else None."""
    try:
        fmts = list(map(_FORMAT, present))
        scalars = [np.array(list(map(get, present))) for get in (_VERSION, _AT, _K)]
        ids, scores = list(map(_IDS, present)), list(map(_SCORES, present))
    except (KeyError, ValueError, OverflowError):
        return None
    if fmts.count(RECORD_FORMAT) != len(fmts) or any(a.dtype != np.int64 for a in scalars):
        return None
    size = len(ids[0]) if isinstance(ids[0], bytes) else -1
    if size < 0 or size % IDS_DTYPE.itemsize:
        return None
    ids_matrix = _joined(ids, size, _NATIVE_IDS)
    scores_matrix = _joined(scores, size // 2, _NATIVE_SCORES)
    if ids_matrix is None or scores_matrix is None:
        return None
    columns: list[Int64Array | None] = []
    for name in (BIN_CAMPAIGNS, BIN_ADVERTISERS) if metadata else ():
        blobs = [b.get(name) for b in present]
        if blobs.count(None) == len(blobs):
            columns.append(None)
        elif (column := _joined(blobs, size, _NATIVE_IDS)) is not None:
            columns.append(column)
        else:
            return None  # some rows lack it, or it is malformed: the row-by-row path
    camps, advs = columns if metadata else (None, None)
    versions, at, k = scalars
    return _Rows(versions, at, k, ids_matrix, scores_matrix, camps, advs)


def _checked_rows(present: list[dict[str, Any]], metadata: bool) -> _Rows:
    """The columns of records already validated one by one (widths may differ: padded)."""
    width = max((len(b[BIN_IDS]) // IDS_DTYPE.itemsize for b in present), default=0)

    def matrix(name: str, dtype: np.dtype[Any], pad: Any) -> npt.NDArray[Any]:
        out = np.full((len(present), width), pad, dtype=dtype)
        for row, b in enumerate(present):
            values = np.frombuffer(b.get(name) or b"", dtype=dtype)
            out[row, : values.size] = values
        return out

    def metadata_matrix(name: str) -> Int64Array | None:
        if not metadata or all(b.get(name) is None for b in present):
            return None
        return matrix(name, _NATIVE_IDS, -1)

    def scalar(name: str) -> Int64Array:
        return np.array([b[name] for b in present], dtype=np.int64)

    return _Rows(
        scalar(BIN_VERSION),
        scalar(BIN_AT),
        scalar(BIN_K),
        matrix(BIN_IDS, _NATIVE_IDS, -1),
        matrix(BIN_SCORES, _NATIVE_SCORES, -np.inf),
        metadata_matrix(BIN_CAMPAIGNS),
        metadata_matrix(BIN_ADVERTISERS),
    )


def lookup_result(
    query_ids: Int64Array,
    found_bins: list[dict[str, Any] | None],
    errors: dict[int, str] | None = None,
    *,
    metadata: bool = True,
) -> LookupResult:
    """Assemble a LookupResult from each query's bins (None = not found), in query order.

    A record this reader cannot decode (another format, missing bins) is not found and its
    row gets an error; it does not fail the other rows. `metadata=False` leaves the campaign
    and advertiser ids out (None) without decoding them.
    """
    errors = dict(errors or {})
    n = len(found_bins)
    if found_bins.count(None):
        rows: list[int] | slice = [i for i, b in enumerate(found_bins) if b is not None]
        present: list[dict[str, Any]] = [b for b in found_bins if b is not None]
    else:
        rows, present = slice(None), found_bins  # type: ignore[assignment]
    decoded = _uniform_rows(present, metadata) if present else None
    if decoded is None:
        indices = range(n) if isinstance(rows, slice) else rows
        checked = [(i, b, _row_error(b, metadata)) for i, b in zip(indices, present, strict=True)]
        errors.update({i: e for i, _, e in checked if e is not None})
        rows = [i for i, _, e in checked if e is None]
        present = [b for _, b, e in checked if e is None]
        decoded = _checked_rows(present, metadata)
    everything = isinstance(rows, slice) or len(rows) == n
    found = np.ones(n, dtype=bool) if everything else np.zeros(n, dtype=bool)
    found[rows] = True

    def column(values: npt.NDArray[Any], pad: Any) -> npt.NDArray[Any]:
        if everything:
            return values
        out = np.full((n, *values.shape[1:]), pad, dtype=values.dtype)
        out[rows] = values
        return out

    def metadata_column(values: Int64Array | None) -> Int64Array | None:
        return None if values is None else column(values, -1)

    return LookupResult(
        query_ids=np.asarray(query_ids, dtype=np.int64),
        found=found,
        ids=column(decoded.ids, -1),
        scores=column(decoded.scores, -np.inf),
        versions=column(decoded.versions, 0),
        computed_at_ms=column(decoded.computed_at_ms, 0),
        k=column(decoded.k, 0),
        campaign_ids=metadata_column(decoded.campaign_ids),
        advertiser_ids=metadata_column(decoded.advertiser_ids),
        errors=errors,
    )
