"""Batch encode/decode of ad and engagement events between Kafka payloads and numpy columns.

Decoding never raises for one bad message: it returns the good events as a batch and a
`Rejection` (index, reason) for each bad one, so the consumer can dead-letter it and go on.
Ad events written with the codec's own schema are parsed column by column over the whole batch
in numpy (`_parse_ads`), about 8x faster than fastavro's per-message reader; any message that
parser cannot vouch for (another schema id, truncated, unknown enum or union branch, trailing
bytes, bad UTF-8, a varint over 9 bytes) goes through fastavro, so reasons never change.
Everything after the Avro decoding is vectorised.

Ids below 0 are refused (-1 pads the stored neighbour lists, so a negative ad id would be
indexed but never served), and so are negative event times; given the consumer's clock
(`now_ms`), so are event times more than `max_skew_s` ahead of it.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import fastavro
import numpy as np

from annstream.errors import InvalidEventError
from annstream.events import (
    ENGAGEMENT_TYPES,
    NO_ID,
    OP_DELETE,
    OP_UPSERT,
    OPS,
    AdBatch,
    EngagementBatch,
    Rejection,
)
from annstream.schemas import (
    AD_SUBJECT,
    ENGAGEMENT_SUBJECT,
    HEADER_SIZE,
    SchemaRegistry,
    frame,
    unframe,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "AdCodec",
    "EngagementCodec",
    "ad_records",
    "check_event_times",
    "check_vectors",
    "engagement_records",
]

logger = logging.getLogger(__name__)

METRICS = ("cosine", "ip", "l2")
DEFAULT_MAX_MESSAGE_BYTES = 1_000_000
"""librdkafka's default `message.max.bytes` (10^6, not 1 MiB); a d=4096 ad event is ~16 KiB."""


def _raw(schema: Any) -> Any:
    """A copy of a parsed schema without logical types: timestamps stay int milliseconds."""
    if isinstance(schema, dict):
        return {
            k: _raw(v) for k, v in schema.items() if k != "logicalType" and not k.startswith("__")
        }
    if isinstance(schema, list):
        return [_raw(v) for v in schema]
    return schema


def check_vectors(vectors: np.ndarray, metric: str) -> np.ndarray:
    """Reason code per row: 0 ok, 1 NaN/inf, 2 zero vector under cosine (vectorised)."""
    bad = np.zeros(len(vectors), dtype="uint8")
    finite = np.isfinite(vectors).all(axis=1)
    bad[~finite] = 1
    if metric == "cosine":
        zero = ~np.any(vectors != 0, axis=1)
        bad[finite & zero] = 2
    return bad


def check_event_times(
    event_time_ms: np.ndarray, now_ms: int | None = None, max_skew_s: float = math.inf
) -> dict[int, str]:
    """Row -> reason for event times below 0 or more than `max_skew_s` ahead of `now_ms`.

    A clock gone wrong, or microseconds or nanoseconds written as milliseconds, would move the
    decay clock of every head query; such events are refused instead (vectorised).
    """
    times = np.asarray(event_time_ms, dtype="int64")
    out = {
        int(i): f"negative event time {int(times[i])} ms: event times are milliseconds since "
        "1970-01-01 UTC"
        for i in np.flatnonzero(times < 0)
    }
    if now_ms is None or not math.isfinite(max_skew_s):
        return out
    ahead_s = (times.astype("float64") - float(now_ms)) / 1000.0
    for i in np.flatnonzero(ahead_s > max_skew_s).tolist():
        out[i] = (
            f"event time {int(times[i])} ms is {ahead_s[i]:.0f} s ahead of the consumer's clock, "
            f"more than kafka.max_event_skew_s ({max_skew_s:g} s): a clock gone wrong, or "
            "microseconds or nanoseconds instead of milliseconds?"
        )
    return out


def _check_ids(ids: np.ndarray, what: str) -> dict[int, str]:
    """Row -> reason for ids below 0 (-1 pads the stored neighbour lists)."""
    return {
        int(i): f"negative {what} id {int(ids[i])}: {what} ids must be 0 or more "
        "(-1 pads the stored neighbour lists)"
        for i in np.flatnonzero(ids < 0)
    }


_VECTOR_REASONS = {
    1: "embedding has NaN or inf values",
    2: "zero embedding: cannot be normalised under the cosine metric",
}


class _Codec:
    subject: str
    record_name: str

    def __init__(
        self,
        registry: SchemaRegistry,
        dim: int,
        metric: str = "cosine",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if max_message_bytes < HEADER_SIZE + 4 * dim:
            raise ValueError(
                f"max_message_bytes {max_message_bytes} cannot hold one {dim}-d embedding: "
                f"raise kafka.max_message_bytes to at least {HEADER_SIZE + 4 * dim + 64}"
            )
        self.registry = registry
        self.dim = dim
        self.metric = metric
        self.max_message_bytes = max_message_bytes
        self.schema_id = registry.id_for(self.subject)
        self._own = fastavro.parse_schema(_raw(registry.schema(self.schema_id)))
        self._writers: dict[int, tuple[Any, Any]] = {self.schema_id: (self._own, None)}

    def _resolution(self, schema_id: int) -> tuple[Any, Any]:
        pair = self._writers.get(schema_id)
        if pair is None:
            writer = registry_schema = self.registry.schema(schema_id)
            name = registry_schema.get("name", "")
            if name != self.record_name:
                raise InvalidEventError(
                    f"schema id {schema_id} is a {name or 'non-record'} schema, "
                    f"expected {self.record_name}"
                )
            pair = (fastavro.parse_schema(_raw(writer)), self._own)
            self._writers[schema_id] = pair
        return pair

    def _read(self, message: bytes) -> dict[str, Any]:
        if message is not None and len(message) > self.max_message_bytes:
            raise InvalidEventError(
                f"message of {len(message)} bytes is over kafka.max_message_bytes "
                f"({self.max_message_bytes})"
            )
        schema_id, payload = unframe(message)
        writer, reader = self._resolution(schema_id)
        buf = io.BytesIO(payload)
        try:
            record = cast(dict[str, Any], fastavro.schemaless_reader(buf, writer, reader))
        except fastavro.read.SchemaResolutionError as exc:
            raise InvalidEventError(f"cannot resolve schema id {schema_id}: {exc}") from None
        except IndexError:
            raise InvalidEventError(
                "truncated or corrupt Avro payload: an enum or union index is out of range "
                "(unknown operation?)"
            ) from None
        except (EOFError, StopIteration, ValueError, UnicodeDecodeError) as exc:
            raise InvalidEventError(
                f"truncated or corrupt Avro payload ({type(exc).__name__}: {exc})"
            ) from None
        left = len(payload) - buf.tell()
        if left:
            raise InvalidEventError(f"{left} trailing bytes after the Avro record")
        self._check_record(record)
        return record

    def _check_record(self, record: dict[str, Any]) -> None:
        """Per-record checks Avro resolution does not make (overridden per event kind)."""

    def _read_all(
        self, messages: Sequence[bytes | None]
    ) -> tuple[list[dict[str, Any]], list[int], list[Rejection]]:
        records: list[dict[str, Any]] = []
        rows: list[int] = []
        rejected: list[Rejection] = []
        for i, message in enumerate(messages):
            try:
                records.append(self._read(message))  # type: ignore[arg-type]
                rows.append(i)
            except InvalidEventError as exc:
                rejected.append(Rejection(i, exc.reason))
        return records, rows, rejected

    def _vectors(
        self, blobs: list[bytes | None], declared_dims: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """(vectors, present mask, reason per row or None), vectorised over the batch."""
        n = len(blobs)
        present = np.fromiter((b is not None for b in blobs), dtype=bool, count=n)
        nbytes = np.fromiter((len(b) if b is not None else 0 for b in blobs), "int64", n)
        reasons: list[str | None] = [None] * n
        want = self.dim * 4
        ok = present & (nbytes == want)
        if declared_dims is not None:
            ok &= declared_dims == self.dim
        for i in np.flatnonzero(present & ~ok):
            floats = nbytes[i] / 4
            declared = "" if declared_dims is None else f" (dim field {declared_dims[i]})"
            reasons[i] = (
                f"embedding is {nbytes[i]} bytes, not a whole number of float32"
                if nbytes[i] % 4
                else f"wrong dimension: embedding has {int(floats)} floats{declared}, "
                f"the index expects {self.dim}"
            )
        vectors = np.zeros((n, self.dim), dtype="float32")
        if ok.any():
            joined = b"".join(b for b, good in zip(blobs, ok, strict=True) if good)  # type: ignore[misc]
            vectors[ok] = np.frombuffer(joined, dtype="<f4").reshape(-1, self.dim)
        codes = check_vectors(vectors, self.metric)
        for i in np.flatnonzero(ok & (codes > 0)):
            reasons[i] = _VECTOR_REASONS[int(codes[i])]
        return vectors, present, reasons

    def _encode(self, records: list[dict[str, Any]]) -> list[bytes]:
        out = []
        for record in records:
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, self._own, record)
            out.append(frame(self.schema_id, buf.getvalue()))
        return out

    def _check_dim(self, vectors: np.ndarray) -> None:
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors of shape {vectors.shape}: expected (n, {self.dim})")


class AdCodec(_Codec):
    """Ad events <-> framed Avro; validation of dimension, NaN/inf, zero vector, operation."""

    subject = AD_SUBJECT
    record_name = "annstream.AdEvent"

    def __init__(
        self,
        registry: SchemaRegistry,
        dim: int,
        metric: str = "cosine",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        super().__init__(registry, dim, metric, max_message_bytes)
        fields = [(f["name"], _shape(f["type"])) for f in cast(dict[str, Any], self._own)["fields"]]
        self._parse_fast = fields == _AD_LAYOUT
        if not self._parse_fast:
            logger.info("ad schema %d differs from the fast parser's layout", self.schema_id)

    def _check_record(self, record: dict[str, Any]) -> None:
        if record["op"] not in OPS:
            raise InvalidEventError(
                f"unknown operation {record['op']!r}: expected one of {', '.join(OPS)}"
            )

    def encode(self, batch: AdBatch) -> list[bytes]:
        self._check_dim(batch.vectors)
        return self._encode(list(ad_records(batch)))

    def _columns(self, messages: Sequence[bytes | None]) -> tuple[_AdColumns, list[Rejection]]:
        """Columns of the readable messages in order (`rows`), a Rejection for each other one."""
        if self._parse_fast:
            fast_rows, fast = _parse_ads(messages, self.schema_id, self.max_message_bytes)
        else:
            fast_rows, fast = np.zeros(0, dtype="int64"), _AdColumns.of_records([], [])
        slow = np.setdiff1d(np.arange(len(messages)), fast_rows)
        if not slow.size:
            return fast, []
        records, rows, rejected = self._read_all([messages[i] for i in slow.tolist()])
        slow_cols = _AdColumns.of_records(records, slow[rows].tolist())
        rejected = [Rejection(int(slow[r.index]), r.reason) for r in rejected]
        return _AdColumns.merge(fast, slow_cols), rejected

    def decode(
        self,
        messages: Sequence[bytes | None],
        *,
        now_ms: int | None = None,
        max_skew_s: float = math.inf,
    ) -> tuple[AdBatch, list[Rejection]]:
        """The valid ad events (in order) and a Rejection for every invalid message; with the
        consumer's clock `now_ms`, events over `max_skew_s` in the future are invalid."""
        cols, rejected = self._columns(messages)
        rows = cols.rows
        n = len(rows)
        ops = cols.ops
        vectors, present, reasons = self._vectors(cols.embeddings, cols.dims)
        upsert = ops == OP_UPSERT
        for i in np.flatnonzero(upsert & ~present):
            reasons[i] = "UPSERT without an embedding"
        deletes = ops == OP_DELETE
        for i in np.flatnonzero(deletes):
            reasons[i] = None
        vectors[deletes] = 0.0
        for checks in (
            check_event_times(cols.event_times, now_ms, max_skew_s),
            _check_ids(cols.ad_ids, "ad"),
        ):
            for row, reason in checks.items():
                reasons[row] = reason
        keep = np.fromiter((r is None for r in reasons), bool, n)
        rejected.extend(
            Rejection(rows[i], reason) for i, reason in enumerate(reasons) if reason is not None
        )
        rejected.sort(key=lambda r: r.index)
        idx = np.flatnonzero(keep)
        batch = AdBatch(
            ad_ids=cols.ad_ids[idx],
            ops=ops[idx],
            vectors=np.ascontiguousarray(vectors[idx]),
            event_time_ms=cols.event_times[idx],
            advertiser_ids=cols.advertiser_ids[idx],
            campaign_ids=cols.campaign_ids[idx],
            model_versions=tuple(cols.model_versions[i] for i in idx.tolist()),
        )
        return batch, rejected


class EngagementCodec(_Codec):
    """Engagement events <-> framed Avro; the optional query vector is validated like an ad's."""

    subject = ENGAGEMENT_SUBJECT
    record_name = "annstream.EngagementEvent"

    def _check_record(self, record: dict[str, Any]) -> None:
        if record["event_type"] not in ENGAGEMENT_TYPES:
            record["event_type"] = "OTHER"

    def encode(self, batch: EngagementBatch) -> list[bytes]:
        self._check_dim(batch.vectors)
        return self._encode(list(engagement_records(batch)))

    def decode(
        self,
        messages: Sequence[bytes | None],
        *,
        now_ms: int | None = None,
        max_skew_s: float = math.inf,
    ) -> tuple[EngagementBatch, list[Rejection]]:
        """The valid engagement events (in order) and a Rejection for every invalid message;
        with the consumer's clock `now_ms`, events over `max_skew_s` in the future are invalid."""
        records, rows, rejected = self._read_all(messages)
        n = len(records)
        weights = np.fromiter((r["weight"] for r in records), "float32", n)
        query_ids = np.fromiter((r["query_id"] for r in records), "int64", n)
        event_times = np.fromiter((r["event_time"] for r in records), "int64", n)
        vectors, present, reasons = self._vectors([r["query_embedding"] for r in records], None)
        for i in np.flatnonzero(~np.isfinite(weights) | (weights < 0)):
            reasons[i] = f"weight {weights[i]} is not a finite non-negative number"
        for checks in (
            check_event_times(event_times, now_ms, max_skew_s),
            _check_ids(query_ids, "query"),
        ):
            for row, reason in checks.items():
                reasons[row] = reason
        keep = np.fromiter((r is None for r in reasons), bool, n)
        rejected.extend(
            Rejection(rows[i], reason) for i, reason in enumerate(reasons) if reason is not None
        )
        rejected.sort(key=lambda r: r.index)
        idx = np.flatnonzero(keep)
        batch = EngagementBatch(
            query_ids=query_ids[idx],
            item_ids=_opt_ids(records, "item_id")[idx],
            event_types=np.fromiter(
                (ENGAGEMENT_TYPES.index(r["event_type"]) for r in records), "uint8", n
            )[idx],
            weights=weights[idx],
            event_time_ms=event_times[idx],
            vectors=np.ascontiguousarray(vectors[idx]),
            has_vector=present[idx],
        )
        return batch, rejected


def _opt_id(value: int) -> int | None:
    return None if value == NO_ID else value


def ad_records(batch: AdBatch) -> Iterator[dict[str, Any]]:
    """The Avro records (AdEvent dicts) of a batch, for the codec and Avro container files."""
    le = batch.vectors.astype("<f4", copy=False)
    versions = batch.model_versions or ("",) * len(batch)
    columns = zip(
        batch.ad_ids.tolist(),
        batch.ops.tolist(),
        batch.event_time_ms.tolist(),
        batch.advertiser_ids.tolist(),
        batch.campaign_ids.tolist(),
        versions,
        strict=True,
    )
    for i, (ad_id, op, event_time, advertiser, campaign, version) in enumerate(columns):
        upsert = op == OP_UPSERT
        yield {
            "ad_id": ad_id,
            "op": OPS[op],
            "embedding": le[i].tobytes() if upsert else None,
            "dim": batch.dim if upsert else 0,
            "model_version": version,
            "event_time": event_time,
            "advertiser_id": _opt_id(advertiser),
            "campaign_id": _opt_id(campaign),
        }


def engagement_records(batch: EngagementBatch) -> Iterator[dict[str, Any]]:
    """The Avro records (EngagementEvent dicts) of a batch."""
    le = batch.vectors.astype("<f4", copy=False)
    columns = zip(
        batch.query_ids.tolist(),
        batch.item_ids.tolist(),
        batch.event_types.tolist(),
        batch.weights.tolist(),
        batch.event_time_ms.tolist(),
        batch.has_vector.tolist(),
        strict=True,
    )
    for i, (query_id, item_id, event_type, weight, event_time, has_vector) in enumerate(columns):
        yield {
            "query_id": query_id,
            "item_id": _opt_id(item_id),
            "event_type": ENGAGEMENT_TYPES[event_type],
            "weight": weight,
            "event_time": event_time,
            "query_embedding": le[i].tobytes() if has_vector else None,
        }


def _opt_ids(records: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.fromiter(
        (NO_ID if r[key] is None else r[key] for r in records), "int64", len(records)
    )


@dataclass
class _AdColumns:
    """Decoded ad events as columns; `rows` are their indices in the polled batch."""

    rows: list[int]
    ad_ids: np.ndarray
    ops: np.ndarray
    dims: np.ndarray
    embeddings: list[bytes | None]
    model_versions: list[str]
    event_times: np.ndarray
    advertiser_ids: np.ndarray
    campaign_ids: np.ndarray

    @classmethod
    def of_records(cls, records: list[dict[str, Any]], rows: list[int]) -> _AdColumns:
        n = len(records)
        return cls(
            rows=rows,
            ad_ids=np.fromiter((r["ad_id"] for r in records), "int64", n),
            ops=np.fromiter((OPS.index(r["op"]) for r in records), "uint8", n),
            dims=np.fromiter((r["dim"] for r in records), "int64", n),
            embeddings=[r["embedding"] for r in records],
            model_versions=[r["model_version"] for r in records],
            event_times=np.fromiter((r["event_time"] for r in records), "int64", n),
            advertiser_ids=_opt_ids(records, "advertiser_id"),
            campaign_ids=_opt_ids(records, "campaign_id"),
        )

    @staticmethod
    def merge(a: _AdColumns, b: _AdColumns) -> _AdColumns:
        """Both sets of rows, in row order."""
        order = np.argsort(np.array(a.rows + b.rows, dtype="int64"), kind="stable").tolist()

        def arr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            return np.asarray(np.concatenate([x, y])[order])

        def lst(x: list[Any], y: list[Any]) -> list[Any]:
            both = x + y
            return [both[i] for i in order]

        return _AdColumns(
            rows=lst(a.rows, b.rows),
            ad_ids=arr(a.ad_ids, b.ad_ids),
            ops=arr(a.ops, b.ops),
            dims=arr(a.dims, b.dims),
            embeddings=lst(a.embeddings, b.embeddings),
            model_versions=lst(a.model_versions, b.model_versions),
            event_times=arr(a.event_times, b.event_times),
            advertiser_ids=arr(a.advertiser_ids, b.advertiser_ids),
            campaign_ids=arr(a.campaign_ids, b.campaign_ids),
        )


def _shape(avro_type: Any) -> Any:
    """A parsed Avro type reduced to what the fast ad parser depends on."""
    if isinstance(avro_type, list):
        return tuple(_shape(t) for t in avro_type)
    if isinstance(avro_type, dict):
        if avro_type.get("type") == "enum":
            return ("enum", tuple(avro_type.get("symbols", ())))
        if set(avro_type) == {"type"}:
            return _shape(avro_type["type"])
    return avro_type


# The AdEvent layout `_parse_ads` reads, field by field.
_AD_LAYOUT = [
    ("ad_id", "long"),
    ("op", ("enum", OPS)),
    ("embedding", ("null", "bytes")),
    ("dim", "int"),
    ("model_version", "string"),
    ("event_time", "long"),
    ("advertiser_id", ("null", "long")),
    ("campaign_id", ("null", "long")),
]
_U64 = np.uint64
_MAX_VARINT_BYTES = 9  # 63 bits; longer varints (huge or negative extremes) take the slow path


def _varints(
    buf: np.ndarray, pos: np.ndarray, end: np.ndarray, ok: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """The zigzag varint at `pos` of each of `rows`; advances `pos`, clears `ok` where malformed."""
    pending = rows & ok
    val = np.zeros(pos.size, dtype=_U64)
    last = buf.size - 1
    for k in range(_MAX_VARINT_BYTES):
        if not pending.any():
            break
        idx = pos + k
        over = pending & (idx >= end)
        ok &= ~over
        pending &= ~over
        b = buf[np.minimum(idx, last)]
        val[pending] |= (b[pending] & 0x7F).astype(_U64) << _U64(7 * k)
        stop = pending & (b < 0x80)
        pos[stop] += k + 1
        pending &= ~stop
    ok &= ~pending
    return np.asarray((val >> _U64(1)).astype("int64") ^ -(val & _U64(1)).astype("int64"))


def _skip(
    pos: np.ndarray, end: np.ndarray, ok: np.ndarray, rows: np.ndarray, n: np.ndarray
) -> None:
    """Advance `pos` of `rows` past `n` bytes; clears `ok` where they run past the message."""
    ok &= ~rows | ((n >= 0) & (pos + n <= end))
    pos += np.where(rows & ok, n, 0)


def _strings(buf: np.ndarray, start: np.ndarray, length: np.ndarray, ok: np.ndarray) -> list[str]:
    """UTF-8 strings of the `ok` rows, decoded once per distinct value; bad UTF-8 clears `ok`."""
    out = [""] * start.size
    for size in np.unique(length[ok]).tolist():
        sel = np.flatnonzero(ok & (length == size))
        if size == 0:
            continue
        mat = buf[start[sel, None] + np.arange(size)]
        todo = np.ones(sel.size, dtype=bool)
        while todo.any():
            first = int(np.argmax(todo))
            same = todo & (mat == mat[first]).all(axis=1)
            todo &= ~same
            try:
                text = mat[first].tobytes().decode("utf-8")
            except UnicodeDecodeError:
                ok[sel[same]] = False
                continue
            for i in sel[same].tolist():
                out[i] = text
    return out


def _parse_ads(
    messages: Sequence[bytes | None], schema_id: int, max_bytes: int
) -> tuple[np.ndarray, _AdColumns]:
    """(rows parsed, their columns): the messages of at most `max_bytes` that are well-formed
    AdEvents of `schema_id`.

    Avro binary is read one field at a time for the whole batch; a row any step cannot vouch
    for is left out (and goes through fastavro).
    """
    n = len(messages)
    lens = np.fromiter((len(m) if m is not None else 0 for m in messages), "int64", n)
    joined = b"".join(m for m in messages if m is not None)
    buf = np.frombuffer(joined, dtype="uint8")
    if buf.size == 0:
        return np.zeros(0, dtype="int64"), _AdColumns.of_records([], [])
    end = np.cumsum(lens)
    start = end - lens
    head = buf[np.minimum(start[:, None] + np.arange(HEADER_SIZE), buf.size - 1)].astype("int64")
    ids = (head[:, 1] << 24) | (head[:, 2] << 16) | (head[:, 3] << 8) | head[:, 4]
    ok = (lens > HEADER_SIZE) & (lens <= max_bytes) & (head[:, 0] == 0) & (ids == schema_id)
    pos = start + HEADER_SIZE
    every = np.ones(n, dtype=bool)

    ad_ids = _varints(buf, pos, end, ok, every)
    ops = _varints(buf, pos, end, ok, every)
    ok &= (ops == OP_UPSERT) | (ops == OP_DELETE)
    branch = _varints(buf, pos, end, ok, every)
    ok &= (branch == 0) | (branch == 1)
    has = branch == 1
    emb_len = _varints(buf, pos, end, ok, has)
    emb_start = pos.copy()
    _skip(pos, end, ok, has, emb_len)
    dims = _varints(buf, pos, end, ok, every)
    str_len = _varints(buf, pos, end, ok, every)
    str_start = pos.copy()
    _skip(pos, end, ok, every, str_len)
    event_times = _varints(buf, pos, end, ok, every)
    optional = []
    for _ in ("advertiser_id", "campaign_id"):
        present = _varints(buf, pos, end, ok, every)
        ok &= (present == 0) | (present == 1)
        value = _varints(buf, pos, end, ok, present == 1)
        optional.append(np.where(present == 1, value, NO_ID))
    ok &= pos == end
    versions = _strings(buf, str_start, str_len, ok)

    rows = np.flatnonzero(ok)
    embeddings: list[bytes | None] = [
        joined[s : s + size] if h else None
        for s, size, h in zip(
            emb_start[rows].tolist(), emb_len[rows].tolist(), has[rows].tolist(), strict=True
        )
    ]
    return rows, _AdColumns(
        rows=rows.tolist(),
        ad_ids=ad_ids[rows],
        ops=ops[rows].astype("uint8"),
        dims=dims[rows],
        embeddings=embeddings,
        model_versions=[versions[i] for i in rows.tolist()],
        event_times=event_times[rows],
        advertiser_ids=optional[0][rows],
        campaign_ids=optional[1][rows],
    )
