"""Batch encode/decode of ad and engagement events between Kafka payloads and numpy columns.

Decoding never raises for one bad message: it returns the good events as a batch and a
`Rejection` (index, reason) for each bad one, so the consumer can dead-letter it and go on.
Avro decoding is per message (fastavro's C reader); everything after it is vectorised.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
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
    SchemaRegistry,
    frame,
    unframe,
)

__all__ = ["AdCodec", "EngagementCodec", "check_vectors"]

logger = logging.getLogger(__name__)

METRICS = ("cosine", "ip", "l2")


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


_VECTOR_REASONS = {
    1: "embedding has NaN or inf values",
    2: "zero embedding: cannot be normalised under the cosine metric",
}


class _Codec:
    subject: str
    record_name: str

    def __init__(self, registry: SchemaRegistry, dim: int, metric: str = "cosine") -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        self.registry = registry
        self.dim = dim
        self.metric = metric
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

    def _check_record(self, record: dict[str, Any]) -> None:
        if record["op"] not in OPS:
            raise InvalidEventError(
                f"unknown operation {record['op']!r}: expected one of {', '.join(OPS)}"
            )

    def encode(self, batch: AdBatch) -> list[bytes]:
        self._check_dim(batch.vectors)
        le = batch.vectors.astype("<f4", copy=False)
        versions = batch.model_versions or ("",) * len(batch)
        records = [
            {
                "ad_id": int(batch.ad_ids[i]),
                "op": OPS[batch.ops[i]],
                "embedding": le[i].tobytes() if batch.ops[i] == OP_UPSERT else None,
                "dim": self.dim if batch.ops[i] == OP_UPSERT else 0,
                "model_version": versions[i],
                "event_time": int(batch.event_time_ms[i]),
                "advertiser_id": None
                if batch.advertiser_ids[i] == NO_ID
                else int(batch.advertiser_ids[i]),
                "campaign_id": None
                if batch.campaign_ids[i] == NO_ID
                else int(batch.campaign_ids[i]),
            }
            for i in range(len(batch))
        ]
        return self._encode(records)

    def decode(self, messages: Sequence[bytes | None]) -> tuple[AdBatch, list[Rejection]]:
        """The valid ad events (in order) and a Rejection for every invalid message."""
        records, rows, rejected = self._read_all(messages)
        n = len(records)
        ops = np.fromiter((OPS.index(r["op"]) for r in records), "uint8", n)
        dims = np.fromiter((r["dim"] for r in records), "int64", n)
        vectors, present, reasons = self._vectors([r["embedding"] for r in records], dims)
        upsert = ops == OP_UPSERT
        for i in np.flatnonzero(upsert & ~present):
            reasons[i] = "UPSERT without an embedding"
        deletes = ops == OP_DELETE
        for i in np.flatnonzero(deletes):
            reasons[i] = None
        vectors[deletes] = 0.0
        keep = np.fromiter((r is None for r in reasons), bool, n)
        rejected.extend(
            Rejection(rows[i], reason) for i, reason in enumerate(reasons) if reason is not None
        )
        rejected.sort(key=lambda r: r.index)
        idx = np.flatnonzero(keep)
        batch = AdBatch(
            ad_ids=np.fromiter((r["ad_id"] for r in records), "int64", n)[idx],
            ops=ops[idx],
            vectors=np.ascontiguousarray(vectors[idx]),
            event_time_ms=np.fromiter((r["event_time"] for r in records), "int64", n)[idx],
            advertiser_ids=_opt_ids(records, "advertiser_id")[idx],
            campaign_ids=_opt_ids(records, "campaign_id")[idx],
            model_versions=tuple(records[i]["model_version"] for i in idx),
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
        le = batch.vectors.astype("<f4", copy=False)
        records = [
            {
                "query_id": int(batch.query_ids[i]),
                "item_id": None if batch.item_ids[i] == NO_ID else int(batch.item_ids[i]),
                "event_type": ENGAGEMENT_TYPES[batch.event_types[i]],
                "weight": float(batch.weights[i]),
                "event_time": int(batch.event_time_ms[i]),
                "query_embedding": le[i].tobytes() if batch.has_vector[i] else None,
            }
            for i in range(len(batch))
        ]
        return self._encode(records)

    def decode(self, messages: Sequence[bytes | None]) -> tuple[EngagementBatch, list[Rejection]]:
        records, rows, rejected = self._read_all(messages)
        n = len(records)
        weights = np.fromiter((r["weight"] for r in records), "float32", n)
        vectors, present, reasons = self._vectors([r["query_embedding"] for r in records], None)
        for i in np.flatnonzero(~np.isfinite(weights) | (weights < 0)):
            reasons[i] = f"weight {weights[i]} is not a finite non-negative number"
        keep = np.fromiter((r is None for r in reasons), bool, n)
        rejected.extend(
            Rejection(rows[i], reason) for i, reason in enumerate(reasons) if reason is not None
        )
        rejected.sort(key=lambda r: r.index)
        idx = np.flatnonzero(keep)
        batch = EngagementBatch(
            query_ids=np.fromiter((r["query_id"] for r in records), "int64", n)[idx],
            item_ids=_opt_ids(records, "item_id")[idx],
            event_types=np.fromiter(
                (ENGAGEMENT_TYPES.index(r["event_type"]) for r in records), "uint8", n
            )[idx],
            weights=weights[idx],
            event_time_ms=np.fromiter((r["event_time"] for r in records), "int64", n)[idx],
            vectors=np.ascontiguousarray(vectors[idx]),
            has_vector=present[idx],
        )
        return batch, rejected


def _opt_ids(records: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.fromiter(
        (NO_ID if r[key] is None else r[key] for r in records), "int64", len(records)
    )
