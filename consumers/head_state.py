"""The head-query state changelog: how a replica that gains an engagement partition rebuilds
the head queries of that shard before it writes for them.

One changelog partition per engagement partition (same number). Each micro-batch appends, per
partition it touched, the tracker rows of the queries it touched (a delta) with the engagement
offset they include in a header, in records sized under the producer's message limit. When the
deltas since a partition's last snapshot outgrow that snapshot (at least `SNAPSHOT_MIN_BYTES`),
or the snapshot is older than `SNAPSHOT_MAX_AGE_S`, the append writes a snapshot instead: every
row of the partition, in chunks marked as one snapshot. Once a snapshot is in the log its first
offset is committed in the consumer group `<group_id>.head-state`. A restore writes a barrier
record (the read end, known without trusting the broker's end offsets), then replays from the
committed snapshot to the barrier: at most about twice the state, however long the service
has run. Before the first store write of queries entering the head set, their ids are noted in
a record of their own (`note_entrants`, re-noted after a snapshot until their rows follow):
a restore returns those without rows after them (`restored_entrants`), so a crash between the
store write and the rows cannot leave live lists that no restored head owns. Nothing relies on
retention or compaction; on Kafka the topic deletes records older
than a retention well above `SNAPSHOT_MAX_AGE_S` (`TOPIC_CONFIG`, docs/deploy.md).

Records are Avro (schemas/head_state.avsc: the row count and, per column, its numpy dtype, the
shape of one row and the raw bytes) in the Confluent wire format, with the schema id of the
topic's subject, so a Confluent deserializer reads the topic like the others; the snapshot
markers and the engagement offset are headers.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fastavro
import numpy as np
import numpy.typing as npt
from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from annstream.config import KafkaConfig
from annstream.errors import BrokerError
from annstream.kafka import headers_dict, make_consumer, message_error
from annstream.schemas import (
    HEAD_STATE_SUBJECT,
    LocalSchemaRegistry,
    SchemaRegistry,
    frame,
    load_schema,
    open_registry,
    unframe,
)
from annstream.topics import TOPIC_CONFIGS

__all__ = [
    "SNAPSHOT_MAX_AGE_S",
    "SNAPSHOT_MIN_BYTES",
    "TOPIC_CONFIG",
    "HeadStateLog",
    "RestoreStats",
    "barrier_value",
    "decode_state",
    "encode_state",
    "producer_message_limit",
]

logger = logging.getLogger(__name__)

State = dict[str, npt.NDArray[Any]]
PartitionState = Callable[[int], State]

SNAPSHOT_MIN_BYTES = 1 << 20
SNAPSHOT_MAX_AGE_S = 86_400.0
TOPIC_CONFIG = TOPIC_CONFIGS["head_state_topic"]
LIBRDKAFKA_MESSAGE_MAX_BYTES = 1_000_000

_OFFSET_HEADER = "annstream.engagement-offset"
_SNAPSHOT_HEADER = "annstream.head-snapshot"
_ENTRANTS_HEADER = "annstream.head-entrants"
_BARRIER_KEY = b"\x00barrier"
_MAGIC = b"ANNHS1\n"
_NPZ_MAGIC = b"PK\x03\x04"
_KINDS = frozenset("biuf")
# columns added later whose absence in older records means -1 ("none"), not 0
_MINUS_ONE = frozenset({"retired_until_ms"})
# room for the Kafka headers and librdkafka's per-message overhead (36 bytes)
_RECORD_MARGIN = 1024
_QUEUE_POLL_S = 0.05


# ---- record format ---------------------------------------------------------------------

Column = tuple[str, str, tuple[int, ...]]


@functools.lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    return load_schema("head_state.avsc")


@functools.lru_cache(maxsize=1)
def _local_id() -> int:
    return LocalSchemaRegistry().id_for(HEAD_STATE_SUBJECT)


def _framed(record: dict[str, Any], schema_id: int) -> bytes:
    buf = io.BytesIO()
    buf.write(frame(schema_id, b""))
    fastavro.schemaless_writer(buf, _schema(), record)
    return buf.getvalue()


def encode_state(state: State, schema_id: int | None = None) -> bytes:
    """Rows as one Avro record (schemas/head_state.avsc) in the Confluent wire format: the row
    count, then per column its name, dtype, the shape of one row and its raw bytes.
    `schema_id`: the id registered for the topic's subject (default: the shipped registry's)."""
    rows = len(state["query_ids"])
    columns = []
    for k, v in state.items():
        if v.ndim == 0 or len(v) != rows:
            raise ValueError(f"encode_state: column {k!r} needs one entry per query id")
        columns.append(
            {
                "name": k,
                "dtype": v.dtype.str,
                "shape": list(v.shape[1:]),
                "data": np.ascontiguousarray(v).tobytes(),
            }
        )
    return _framed(
        {"rows": rows, "columns": columns}, _local_id() if schema_id is None else schema_id
    )


def barrier_value(schema_id: int | None = None) -> bytes:
    """A record with no rows and no columns: the value of a restore barrier."""
    return _framed({"rows": 0, "columns": []}, _local_id() if schema_id is None else schema_id)


def _columns(record: dict[str, Any]) -> State:
    rows = int(record["rows"])
    out: State = {}
    for column in record["columns"]:
        name, dtype_str, data = column["name"], column["dtype"], column["data"]
        dtype = np.dtype(dtype_str)
        shape = (rows, *(int(s) for s in column["shape"]))
        if dtype.kind not in _KINDS or min(shape) < 0:
            raise ValueError(f"head-state column {name!r}: unsupported {dtype_str} {shape}")
        if len(data) != math.prod(shape) * dtype.itemsize:
            raise ValueError(
                f"head-state column {name!r} holds {len(data)} bytes, {shape} {dtype_str} "
                f"needs {math.prod(shape) * dtype.itemsize}"
            )
        out[str(name)] = np.frombuffer(data, dtype).reshape(shape)
    return out


def decode_state(blob: bytes, registry: SchemaRegistry | None = None) -> State:
    """The columns of one record; the writer schema of an id other than the shipped one is
    looked up in `registry`. Records of earlier versions (raw columns, npz) still decode;
    nothing is unpickled."""
    if blob.startswith(_NPZ_MAGIC):
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    if blob.startswith(_MAGIC):
        return _decode_raw(blob)
    schema_id, payload = unframe(blob)
    ours = _schema()
    writer = ours
    if schema_id != _local_id() and registry is not None:
        writer = registry.schema(schema_id)
    buf = io.BytesIO(payload)
    try:
        record = fastavro.schemaless_reader(buf, writer, ours if writer is not ours else None)
    except (EOFError, ValueError, TypeError, IndexError, StopIteration) as exc:
        raise ValueError(f"not a head-state record ({type(exc).__name__}: {exc})") from None
    if buf.tell() != len(payload):
        raise ValueError("head-state record has trailing bytes")
    if not isinstance(record, dict):
        raise ValueError("not a head-state record")
    return _columns(record)


def _decode_raw(blob: bytes) -> State:
    """The raw-column records written before the changelog was Avro."""
    at = len(_MAGIC) + 4
    (size,) = struct.unpack_from("<I", blob, len(_MAGIC))
    columns = json.loads(blob[at : at + size])
    (rows,) = struct.unpack_from("<Q", blob, at + size)
    at += size + 8
    out: State = {}
    for name, dtype_str, row_shape in columns:
        dtype = np.dtype(dtype_str)
        shape = (rows, *(int(s) for s in row_shape))
        if dtype.kind not in _KINDS or min(shape) < 0:
            raise ValueError(f"head-state column {name!r}: unsupported {dtype_str} {shape}")
        count = math.prod(shape)
        end = at + count * dtype.itemsize
        if end > len(blob):
            raise ValueError(f"head-state column {name!r} is truncated")
        out[str(name)] = np.frombuffer(blob, dtype, count, at).reshape(shape)
        at = end
    if at != len(blob):
        raise ValueError("head-state record has trailing bytes")
    return out


@functools.lru_cache(maxsize=64)
def _overhead(columns: tuple[Column, ...]) -> int:
    """Bytes of a record of these columns beyond their data: framing, names, dtypes, shapes
    and the (up to 10-byte) varints of the row count and each column's length."""
    empty = {name: np.empty((0, *shape), dtype=np.dtype(dtype)) for name, dtype, shape in columns}
    empty.setdefault("query_ids", np.empty(0, np.int64))
    return len(encode_state(empty)) + 10 * (len(columns) + 1)


def producer_message_limit(cfg: KafkaConfig) -> int:
    """The largest record the producer accepts: librdkafka's `message.max.bytes` (1,000,000
    unless set in `kafka.client`). Not `kafka.max_message_bytes`: that bounds the events the
    service accepts, and lowering it must not break the changelog."""
    return int(cfg.client.get("message.max.bytes", LIBRDKAFKA_MESSAGE_MAX_BYTES))


def _row_bytes(state: State) -> int:
    return sum(v.dtype.itemsize * math.prod(v.shape[1:]) for v in state.values())


def _chunks(state: State, max_bytes: int, row: int) -> Iterator[State]:
    """Row ranges of `state` (`row` bytes a row) whose records fit in `max_bytes` (at least
    one, maybe empty)."""
    n = len(state["query_ids"])
    columns = tuple((k, v.dtype.str, tuple(v.shape[1:])) for k, v in state.items())
    rows = (max_bytes - _overhead(columns) - _RECORD_MARGIN) // max(row, 1)
    if n <= rows:
        yield state
        return
    if rows < 1:
        raise ValueError(
            f"one head-state row is {row} bytes, over the producer's {max_bytes}-byte message "
            "limit: raise message.max.bytes in [kafka.client] (and the topic's "
            "max.message.bytes)"
        )
    for start in range(0, max(n, 1), rows):
        yield {k: v[start : start + rows] for k, v in state.items()}


def _column(part: State, name: str, like: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """`part`'s column `name`, or its default (-1 for `_MINUS_ONE`, else 0) where a record
    of an earlier version has none."""
    if name in part:
        return part[name]
    n = len(part["query_ids"])
    return np.full((n, *like.shape[1:]), -1 if name in _MINUS_ONE else 0, dtype=like.dtype)


def _merge(parts: list[State]) -> State:
    """One state from records in log order: the last row of each query wins; every row
    carries the latest clock seen (rows of earlier versions carry none)."""
    keys: dict[str, npt.NDArray[Any]] = {}
    clock = -1
    for part in parts:
        for k, v in part.items():
            keys.setdefault(k, v)
        if "clock_ms" in part and len(part["clock_ms"]):
            clock = max(clock, int(part["clock_ms"].max()))
    cols = {
        k: np.concatenate([_column(p, k, like) for p in parts])
        for k, like in keys.items()
        if k != "clock_ms"
    }
    qids = cols["query_ids"]
    _, first = np.unique(qids[::-1], return_index=True)
    rows = np.sort(len(qids) - 1 - first)
    out = {k: v[rows] for k, v in cols.items()}
    if clock >= 0:
        out["clock_ms"] = np.full(len(rows), clock, dtype=np.int64)
    return out


def _without_later_rows(
    noted: list[tuple[int, npt.NDArray[np.int64]]], parts: list[State]
) -> npt.NDArray[np.int64]:
    """The noted entrants with no row in a record after their note (`at`: how many records
    came before it); one pass over the rows, however many notes."""
    if not noted:
        return np.empty(0, np.int64)
    ids = np.concatenate([n for _, n in noted])
    at = np.repeat([a for a, _ in noted], [len(n) for _, n in noted])
    sizes = [len(p["query_ids"]) for p in parts]
    rows = np.concatenate([p["query_ids"] for p in parts]) if parts else np.empty(0, np.int64)
    where = np.repeat(np.arange(len(parts)), sizes)
    known, first = np.unique(rows[::-1], return_index=True)
    last_part = where[::-1][first]  # the last record holding each query's row
    pos = np.minimum(np.searchsorted(known, ids), max(len(known) - 1, 0))
    has_row = known[pos] == ids if len(known) else np.zeros(len(ids), bool)
    last = np.where(has_row, last_part[pos] if len(known) else -1, -1)
    return np.unique(ids[last < at])


def _written_at_s(message: Message) -> float:
    kind, ms = message.timestamp()
    return ms / 1000.0 if kind != TIMESTAMP_NOT_AVAILABLE and ms > 0 else time.time()


# ---- the log ---------------------------------------------------------------------------


@dataclass
class _PartitionLog:
    """What restoring one partition would read now."""

    snapshot_bytes: int = 0
    delta_bytes: int = 0
    snapshot_at_s: float = field(default_factory=time.time)


@dataclass
class _Snapshot:
    partition: int
    chunks: int
    offsets: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class RestoreStats:
    """What one restore read: from `start_offset` (the committed snapshot, or the beginning)
    to the barrier at `end_offset`."""

    partition: int
    start_offset: int
    end_offset: int
    records: int
    bytes: int
    rows: int
    seconds: float


_Record = tuple[bytes, int, dict[str, str | bytes | None], str | None]


class HeadStateLog:
    """Append and replay head-query state per engagement partition.

    `partition_state(p)` returns every tracked row of partition `p` (a snapshot's content).
    """

    def __init__(
        self,
        cfg: KafkaConfig,
        producer: Producer,
        partition_state: PartitionState,
        max_message_bytes: int | None = None,
        registry: SchemaRegistry | None = None,
    ) -> None:
        self.cfg = cfg
        self.registry = registry or open_registry(cfg)
        self.schema_id = self.registry.id_for(HEAD_STATE_SUBJECT)
        self.topic = cfg.head_state_topic
        self.producer = producer
        self.partition_state = partition_state
        self.max_message_bytes = (
            producer_message_limit(cfg) if max_message_bytes is None else int(max_message_bytes)
        )
        self.snapshot_group = f"{cfg.group_id}.head-state"
        self.restores: dict[int, RestoreStats] = {}
        self.snapshots_written = 0
        self._partitions: dict[int, _PartitionLog] = {}
        self._snapshots: dict[str, _Snapshot] = {}
        self._to_commit: dict[int, int] = {}
        self._backlog: list[_Record] = []
        self._failed: list[_Record] = []
        self._consumer: Consumer | None = None
        self._entrants: dict[int, npt.NDArray[np.int64]] = {}
        self._restored_entrants: dict[int, npt.NDArray[np.int64]] = {}

    # ---- writing -----------------------------------------------------------------------

    def append(self, partition: int, state: State, engagement_offset: int) -> None:
        """Queue the rows of `state` (a delta) for `partition`, or a snapshot of the whole
        partition when one is due; `flush()` makes them durable. Never blocks on a full
        producer queue: what does not fit waits for `flush()`."""
        log = self._partitions.setdefault(partition, _PartitionLog())
        row = _row_bytes(state)
        headers: dict[str, str | bytes | None] = {_OFFSET_HEADER: str(engagement_offset)}
        noted = self._entrants.pop(partition, None)
        if noted is not None and len(left := np.setdiff1d(noted, state["query_ids"])):
            self._entrants[partition] = left
        if self._snapshot_due(log, row * len(state["query_ids"])):
            self._append_snapshot(partition, self.partition_state(partition), headers, log)
            if partition in self._entrants:  # noted before the snapshot, rows not yet in
                self._send_entrants(partition, self._entrants[partition])
            return
        for chunk in _chunks(state, self.max_message_bytes, row):
            value = encode_state(chunk, self.schema_id)
            log.delta_bytes += len(value)
            self._send([(value, partition, headers, None)])

    def note_entrants(self, partition: int, query_ids: npt.NDArray[np.int64]) -> None:
        """Queue a record of queries entering the head set, before their lists are first
        stored; `flush()` makes it durable. Their rows in a later `append` supersede it."""
        ids = np.unique(np.asarray(query_ids, dtype=np.int64))
        if not len(ids):
            return
        self._entrants[partition] = np.union1d(self._entrants.get(partition, ids), ids)
        self._send_entrants(partition, ids)

    def _send_entrants(self, partition: int, ids: npt.NDArray[np.int64]) -> None:
        state = {"query_ids": ids}
        headers: dict[str, str | bytes | None] = {_ENTRANTS_HEADER: "1"}
        for chunk in _chunks(state, self.max_message_bytes, _row_bytes(state)):
            self._send([(encode_state(chunk, self.schema_id), partition, headers, None)])

    def restored_entrants(self, partition: int) -> npt.NDArray[np.int64]:
        """Queries the last `restore(partition)` found noted as entering the head set with no
        row of theirs after: their lists may be stored live (sorted ids)."""
        return self._restored_entrants.get(partition, np.empty(0, np.int64))

    def _snapshot_due(self, log: _PartitionLog, delta: int) -> bool:
        grown = log.delta_bytes + delta
        if grown > max(log.snapshot_bytes, SNAPSHOT_MIN_BYTES):
            return True
        return grown > 0 and time.time() - log.snapshot_at_s > SNAPSHOT_MAX_AGE_S

    def _append_snapshot(
        self,
        partition: int,
        state: State,
        headers: dict[str, str | bytes | None],
        log: _PartitionLog,
    ) -> None:
        row = _row_bytes(state)
        values = [
            encode_state(c, self.schema_id) for c in _chunks(state, self.max_message_bytes, row)
        ]
        sid = uuid.uuid4().hex[:16]
        self._snapshots[sid] = _Snapshot(partition, len(values))
        self._send(
            [
                (v, partition, {**headers, _SNAPSHOT_HEADER: f"{sid} {i} {len(values)}"}, sid)
                for i, v in enumerate(values)
            ]
        )
        log.snapshot_bytes = sum(len(v) for v in values)
        log.delta_bytes = 0
        log.snapshot_at_s = time.time()
        self.snapshots_written += 1
        logger.debug(
            "head-state snapshot %s of partition %d: %d rows in %d records (%d bytes)",
            sid,
            partition,
            len(state["query_ids"]),
            len(values),
            log.snapshot_bytes,
        )

    def _send(self, records: list[_Record], deadline: float | None = None) -> None:
        """Hand records to the producer in order; what the full queue refuses waits in the
        backlog (until `deadline` when given)."""
        self._backlog.extend(records)
        sent = 0
        try:
            for value, partition, headers, sid in self._backlog:
                while True:
                    try:
                        self.producer.produce(
                            self.topic,
                            value=value,
                            partition=partition,
                            headers=headers,
                            on_delivery=functools.partial(self._on_delivery, sid, headers),
                        )
                        break
                    except BufferError:
                        if deadline is None or time.monotonic() > deadline:
                            return
                        self.producer.poll(_QUEUE_POLL_S)
                sent += 1
        finally:
            del self._backlog[:sent]
            self.producer.poll(0)

    def _on_delivery(
        self, sid: str | None, headers: dict[str, str | bytes | None], err: Any, msg: Message
    ) -> None:
        if err is not None:
            self._failed.append((msg.value() or b"", int(msg.partition() or 0), headers, sid))
        elif sid is not None and sid in self._snapshots:
            self._snapshots[sid].offsets.append(int(msg.offset() or 0))

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until everything appended is in the log (records whose delivery failed are
        sent again first), then commit where the latest complete snapshots start. Raises
        BrokerError when not all made it: call again later."""
        deadline = time.monotonic() + timeout_s
        failed, self._failed = self._failed, []
        self._backlog[:0] = failed
        self._send([], deadline)
        left = self.producer.flush(max(0.0, deadline - time.monotonic()))
        if left or self._failed or self._backlog:
            raise BrokerError(
                f"{left + len(self._failed) + len(self._backlog)} head-state records not yet "
                f"in {self.topic} after {timeout_s}s; the broker is unreachable or slow"
            )
        for sid, snap in list(self._snapshots.items()):
            if len(snap.offsets) == snap.chunks:
                start = min(snap.offsets)
                self._to_commit[snap.partition] = max(
                    start, self._to_commit.get(snap.partition, start)
                )
                del self._snapshots[sid]
        self._commit_snapshots(max(0.1, deadline - time.monotonic()))

    def _commit_snapshots(self, timeout_s: float) -> None:
        """Commit snapshot offsets; a failure only makes the next restore read more."""
        if not self._to_commit:
            return
        offsets = [TopicPartition(self.topic, p, o) for p, o in self._to_commit.items()]
        try:
            self._offsets_consumer().commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            logger.warning(
                "could not commit head-state snapshot offsets %s in group %s (retried after "
                "the next micro-batch): %s",
                dict(self._to_commit),
                self.snapshot_group,
                exc,
            )
            return
        self._to_commit.clear()

    def _offsets_consumer(self) -> Consumer:
        """A consumer of the snapshot group that never joins it: assign() and commit() only."""
        if self._consumer is None:
            self._consumer = make_consumer(self.cfg, group_id=self.snapshot_group)
        return self._consumer

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    # ---- restoring ---------------------------------------------------------------------

    def _barrier(self, partition: int, timeout_s: float) -> int:
        """Write a barrier record and return its offset: the end of what must be replayed."""
        delivered: list[int] = []

        def on_delivery(err: Any, msg: Any) -> None:
            if err is None:
                delivered.append(int(msg.offset()))

        self.producer.produce(
            self.topic,
            key=_BARRIER_KEY,
            value=barrier_value(self.schema_id),
            partition=partition,
            on_delivery=on_delivery,
        )
        self.producer.flush(timeout_s)
        if not delivered:
            raise BrokerError(f"could not write a barrier to {self.topic}[{partition}]")
        return delivered[0]

    def _start_offset(self, partition: int, end: int, timeout_s: float) -> int:
        """Where the latest committed snapshot of `partition` starts (or the beginning)."""
        tp = TopicPartition(self.topic, partition)
        try:
            committed = self._offsets_consumer().committed([tp], timeout=timeout_s)[0].offset
        except KafkaException as exc:
            raise BrokerError(
                f"could not read the head-state snapshot offset of {self.topic}[{partition}] "
                f"from group {self.snapshot_group}: {exc}"
            ) from exc
        if committed < 0:
            return int(OFFSET_BEGINNING)
        if committed > end:
            logger.warning(
                "head-state snapshot offset %d of %s[%d] is past the log's end %d (topic "
                "re-created?): replaying from the beginning",
                committed,
                self.topic,
                partition,
                end,
            )
            return int(OFFSET_BEGINNING)
        return int(committed)

    def restore(self, partition: int, timeout_s: float | None = None) -> tuple[list[State], int]:
        """The head state of `partition` (one merged state, or none when the log has nothing
        for it) and the highest engagement offset it includes (-1 when none); bounded by
        `kafka.head_state_restore_timeout_s` unless `timeout_s` is given."""
        timeout_s = self.cfg.head_state_restore_timeout_s if timeout_s is None else timeout_s
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        end = self._barrier(partition, timeout_s)
        start = self._start_offset(partition, end, max(0.1, deadline - time.monotonic()))
        consumer = self._offsets_consumer()
        parts: list[State] = []
        sizes: list[int] = []
        noted: list[tuple[int, npt.NDArray[np.int64]]] = []  # (len(parts) then, ids)
        opened: dict[str, tuple[int, set[int], int]] = {}
        snap_bytes = records = total = 0
        first_at_s: float | None = None
        snap_at_s: float | None = None
        applied = -1
        position = first = -1
        consumer.assign([TopicPartition(self.topic, partition, start)])
        try:
            while position < end:
                if time.monotonic() > deadline:
                    raise BrokerError(
                        f"restoring {self.topic}[{partition}] did not reach offset {end} "
                        f"within {timeout_s}s (at {position}, started at {start}); raise "
                        "kafka.head_state_restore_timeout_s if the broker is slow"
                    )
                for m in consumer.consume(1000, 0.05):
                    if message_error(m) is not None or m.error() is not None:
                        continue
                    position = int(m.offset() or 0)
                    first = position if first < 0 else first
                    if m.key() == _BARRIER_KEY or position > end:
                        continue
                    value = m.value() or b""
                    try:
                        state = decode_state(value, self.registry)
                    except ValueError as exc:
                        logger.error(
                            "skipping head-state record %s[%d]@%d: %s",
                            self.topic,
                            partition,
                            position,
                            exc,
                        )
                        continue
                    records += 1
                    total += len(value)
                    at_s = _written_at_s(m)
                    first_at_s = at_s if first_at_s is None else first_at_s
                    hdr = headers_dict(m)
                    if _ENTRANTS_HEADER in hdr:
                        noted.append((len(parts), state["query_ids"]))
                        continue
                    offset = hdr.get(_OFFSET_HEADER)
                    if offset is not None:
                        applied = max(applied, int(offset))
                    parts.append(state)
                    sizes.append(len(value))
                    marker = hdr.get(_SNAPSHOT_HEADER)
                    if marker is None:
                        continue
                    sid, index, chunks = marker.decode().split()
                    pos, seen, size = opened.get(sid, (len(parts) - 1, set(), 0))
                    seen.add(int(index))
                    opened[sid] = (pos, seen, size + len(value))
                    if len(seen) == int(chunks):
                        # a complete snapshot: what came before it is superseded
                        del opened[sid]
                        parts, sizes = parts[pos:], sizes[pos:]
                        noted = [(at - pos, ids) for at, ids in noted if at > pos]
                        opened = {s: (p - pos, i, b) for s, (p, i, b) in opened.items() if p >= pos}
                        snap_bytes, snap_at_s = size + len(value), at_s
        finally:
            consumer.unassign()
        if 0 <= start < first:
            logger.warning(
                "the head-state snapshot at %s[%d]@%d is gone (retention shorter than the "
                "snapshot interval?): restored only the changes from offset %d",
                self.topic,
                partition,
                start,
                first,
            )
        merged = _merge(parts) if parts else None
        self._restored_entrants[partition] = _without_later_rows(noted, parts)
        self._entrants.pop(partition, None)  # noted by an earlier ownership: in the log now
        self._partitions[partition] = _PartitionLog(
            snapshot_bytes=snap_bytes,
            delta_bytes=sum(sizes) - snap_bytes,
            snapshot_at_s=snap_at_s or first_at_s or time.time(),
        )
        stats = RestoreStats(
            partition=partition,
            start_offset=max(start, 0),
            end_offset=end,
            records=records,
            bytes=total,
            rows=0 if merged is None else len(merged["query_ids"]),
            seconds=time.monotonic() - t0,
        )
        self.restores[partition] = stats
        logger.info(
            "restored %d head-state chunks of partition %d (%d head queries, %d bytes, offsets "
            "%d..%d) in %.2fs (engagement offset %d)",
            records,
            partition,
            stats.rows,
            total,
            stats.start_offset,
            end,
            stats.seconds,
            applied,
        )
        return ([] if merged is None else [merged]), applied
