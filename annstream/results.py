"""The results topic: every neighbour list the store accepted, for the sinks annstream does not
write itself (Kafka Connect, Feast's push source, another store, an audit log).

With `kafka.results_topic` set, each list a micro-batch stored (a changed list of a head query,
or a rewrite of one the store lost) is published as Avro (schemas/neighbour_list.avsc: the
stored record's ids, scores, k, version, computed-at and campaign/advertiser ids) in the
Confluent wire format, keyed by the query id as 8-byte big-endian (like the engagement topic,
so the same murmur2 partition). A query that leaves the head set gets a tombstone (a null
value): on the compacted topic the latest record per query is then the set of lists annstream
maintains. Lists of queries that already left (kept readable in the store until
`store.exit_ttl_s` under `store.on_head_exit = "expire"`) are not published: the tombstone
said they are no longer maintained.

Publishing is a step of the Checkpoint's sequence (annstream/checkpoint.py): after the store
holds a partition's lists and before its head-state changelog and offset commit, so a record
not delivered holds the partition's commit back and is sent again; a consumer may see a record
twice (at least once), never a list the store does not hold. A stale row (the store holds a
newer version) is not published. A record over the producer's message limit cannot be sent,
ever: it is logged and counted (`too_large`), like a list the store refuses, and does not block
the micro-batch.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import numpy as np
import numpy.typing as npt
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from annstream.errors import BrokerError
from annstream.schemas import NEIGHBOUR_SUBJECT, SchemaRegistry, frame
from annstream.store.record import NeighbourLists

__all__ = ["ResultsPublisher", "encode_lists", "query_key"]

logger = logging.getLogger(__name__)

_QUEUE_POLL_S = 0.05
_TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
_NULL, _PRESENT = b"\x00", b"\x02"  # union branch 0 (null) and 1 (bytes), zigzag-encoded

Record = tuple[bytes, bytes | None]


def _long(value: int) -> bytes:
    """An Avro long: zigzag, then base-128 varint."""
    v = (value << 1) ^ (value >> 63)
    out = bytearray()
    while v > 0x7F:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def query_key(query_id: int) -> bytes:
    """The record key of a query: its id as 8-byte big-endian (producers.publish.id_keys)."""
    return int(query_id).to_bytes(8, "big", signed=True)


def encode_lists(lists: NeighbourLists, schema_id: int) -> list[bytes]:
    """One framed NeighbourList record per row, in row order (written by hand: the fields
    are fixed, and this is 2-3x faster than a generic Avro writer)."""
    n, m = lists.ids.shape
    ids = np.ascontiguousarray(lists.ids, dtype="<i8").tobytes()
    scores = np.ascontiguousarray(lists.scores, dtype="<f4").tobytes()
    extra = [
        None if col is None else np.ascontiguousarray(col, dtype="<i8").tobytes()
        for col in (lists.campaign_ids, lists.advertiser_ids)
    ]
    header = frame(schema_id, b"")
    ids_len, scores_len, k = _long(8 * m), _long(4 * m), _long(int(lists.k))
    qids = lists.query_ids.tolist()
    versions = lists.versions.tolist()
    at = lists.computed_at_ms.tolist()
    out = []
    for i in range(n):
        a, b = 8 * m * i, 8 * m * (i + 1)
        parts = [
            header,
            _long(qids[i]),
            ids_len,
            ids[a:b],
            scores_len,
            scores[4 * m * i : 4 * m * (i + 1)],
            k,
            _long(versions[i]),
            _long(at[i]),
        ]
        for col in extra:
            parts += [_NULL] if col is None else [_PRESENT, ids_len, col[a:b]]
        out.append(b"".join(parts))
    return out


class ResultsPublisher:
    """Publishes stored neighbour lists and head exits to the results topic; `flush()` says
    whether all of them were delivered (the Checkpoint's `ResultsLog`).

    `publish()` never blocks on a full producer queue: what does not fit waits for `flush()`,
    which also sends again what the broker failed to take, and raises BrokerError while
    anything is not delivered. Counters: `records`, `tombstones` (delivered), `too_large`.
    """

    def __init__(self, producer: Producer, topic: str, registry: SchemaRegistry) -> None:
        self.producer = producer
        self.topic = topic
        self.schema_id = registry.id_for(NEIGHBOUR_SUBJECT)
        self.records = 0
        self.tombstones = 0
        self.too_large = 0
        self._backlog: list[Record] = []
        self._failed: list[Record] = []

    def publish(self, lists: NeighbourLists, exited: npt.ArrayLike = ()) -> None:
        """Queue one record per list, then a tombstone per query in `exited`."""
        values = encode_lists(lists, self.schema_id) if len(lists) else []
        records: list[Record] = [
            (query_key(q), v) for q, v in zip(lists.query_ids.tolist(), values, strict=True)
        ]
        gone = np.asarray(exited, dtype=np.int64).reshape(-1).tolist()
        records += [(query_key(q), None) for q in gone]
        self._send(records)

    def _send(self, records: list[Record], deadline: float | None = None) -> None:
        """Hand records to the producer in order; what the full queue refuses waits in the
        backlog (until `deadline` when given)."""
        self._backlog.extend(records)
        sent = 0
        try:
            for key, value in self._backlog:
                while True:
                    try:
                        self.producer.produce(
                            self.topic,
                            key=key,
                            value=value,
                            on_delivery=functools.partial(self._on_delivery, key, value),
                        )
                        break
                    except BufferError:
                        if deadline is None or time.monotonic() > deadline:
                            return
                        self.producer.poll(_QUEUE_POLL_S)
                    except KafkaException as exc:
                        if exc.args[0].code() not in _TOO_LARGE:
                            raise
                        self._refuse(key, value)
                        break
                sent += 1
        finally:
            del self._backlog[:sent]
            self.producer.poll(0)

    def _refuse(self, key: bytes, value: bytes | None) -> None:
        self.too_large += 1
        logger.error(
            "neighbour list of query %d (%d bytes) is over the producer's message.max.bytes: "
            "not published to %s (raise message.max.bytes in [kafka.client] and the topic's "
            "max.message.bytes, or lower refresh.k + margin)",
            int.from_bytes(key, "big", signed=True),
            len(value or b""),
            self.topic,
            extra={"topic": self.topic, "reason": "too large"},
        )

    def _on_delivery(self, key: bytes, value: bytes | None, err: Any, _msg: Message) -> None:
        if err is None:
            if value is None:
                self.tombstones += 1
            else:
                self.records += 1
        elif err.code() in _TOO_LARGE:
            self._refuse(key, value)
        else:
            self._failed.append((key, value))

    def flush(self, timeout_s: float) -> None:
        """Wait until everything published is delivered (failed records are sent again
        first); BrokerError naming how many are not, to be called again later."""
        deadline = time.monotonic() + timeout_s
        failed, self._failed = self._failed, []
        self._backlog[:0] = failed
        self._send([], deadline)
        left = self.producer.flush(max(0.0, deadline - time.monotonic()))
        if left or self._failed or self._backlog:
            raise BrokerError(
                f"{left + len(self._failed) + len(self._backlog)} records not yet delivered to "
                f"the results topic {self.topic} after {timeout_s}s; the broker is "
                "unreachable or slow"
            )
