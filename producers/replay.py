"""Replay historical events into a topic: event times kept, per-key order kept, resumable.

Sources: an Avro container file of ad or engagement events (re-encoded with the codec), or a
time range of a source topic (messages copied verbatim). Every message is keyed by its id
(see producers.publish) and stamped with its event time; a source topic's message timestamp is
taken as the event time. Messages are sent in source order: file order, or per source
partition in offset order, so events of one key keep their order when the source topic was
keyed by the same id.

Pacing: with `speed` > 0 an event is sent when `(event_time - first_event_time) / speed` has
passed since the replay started (2.0 = twice as fast); 0 sends as fast as possible. `rate`
caps events per second either way.

Resume: the checkpoint file records the source position (rows of a file, or the next offset
per source partition) up to which every message was confirmed by the broker; it is written
only after those deliveries were confirmed. A restart with the same checkpoint continues from
there: nothing is lost, and only messages in flight at a crash (sent, unconfirmed) can be sent
twice.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from annstream.codec import AdCodec, EngagementCodec
from annstream.errors import AnnstreamError, ConfigError
from annstream.events import AdBatch, EngagementBatch
from annstream.schemas import HEADER_SIZE, SchemaRegistry
from producers.publish import Publisher, PublishStats, batch_keys
from producers.sources import avro_file_kind, read_ads, read_engagements

__all__ = [
    "Checkpoint",
    "ReplayError",
    "ReplayResult",
    "load_checkpoint",
    "payload_id",
    "replay_file",
    "replay_topic",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

FILE_POSITION = "rows"


class ReplayError(AnnstreamError):
    """The replay source could not be read (unknown topic, consumer error)."""


@dataclass(frozen=True)
class Checkpoint:
    """Up to `position` every source event was confirmed delivered to `target`."""

    source: str
    target: str
    position: dict[str, int] = field(default_factory=dict)
    delivered: int = 0


def load_checkpoint(path: str | Path, source: str, target: str) -> Checkpoint:
    """The checkpoint at `path`, or an empty one; refuses one written for another replay."""
    p = Path(path)
    if not p.exists():
        return Checkpoint(source, target)
    try:
        doc = json.loads(p.read_text("utf-8"))
        cp = Checkpoint(
            str(doc["source"]),
            str(doc["target"]),
            {str(k): int(v) for k, v in doc["position"].items()},
            int(doc["delivered"]),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"checkpoint {p} is unreadable ({exc}); delete it to start over"
        ) from None
    if (cp.source, cp.target) != (source, target):
        raise ConfigError(
            f"checkpoint {p} belongs to a replay of {cp.source} -> {cp.target}, not "
            f"{source} -> {target}; delete it or pass another --checkpoint"
        )
    return cp


def save_checkpoint(path: str | Path, cp: Checkpoint) -> None:
    """Write atomically (temp file + rename), so a crash leaves the old or the new one."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    doc = {
        "source": cp.source,
        "target": cp.target,
        "position": cp.position,
        "delivered": cp.delivered,
    }
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(p)


@dataclass
class ReplayResult:
    """`stats` of this run; `resumed_from` events were delivered by earlier runs."""

    stats: PublishStats
    resumed_from: int
    checkpoint: Checkpoint


@dataclass(frozen=True)
class _Chunk:
    keys: list[bytes | None]
    values: list[bytes | None]
    timestamps_ms: np.ndarray
    position: dict[str, int]


def payload_id(value: bytes | None) -> int | None:
    """The id of a framed AdEvent/EngagementEvent: both schemas start with it as an Avro long."""
    if value is None or len(value) <= HEADER_SIZE:
        return None
    result = shift = 0
    for byte in value[HEADER_SIZE : HEADER_SIZE + 10]:
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1)
        shift += 7
    return None


def _key_of(key: bytes | str | None, value: bytes | None) -> bytes | None:
    if isinstance(key, bytes) and len(key) == 8:
        return key
    ident = payload_id(value)
    return None if ident is None else ident.to_bytes(8, "big", signed=True)


class _Pacer:
    """Holds each event back until its event-time offset, divided by `speed`, has passed."""

    def __init__(self, speed: float, clock: Callable[[], float] = time.monotonic) -> None:
        if speed < 0:
            raise ValueError(f"speed must be >= 0 (0 = as fast as possible), got {speed}")
        self.speed = speed
        self.clock = clock
        self._origin: tuple[float, int] | None = None

    def due(self, timestamps_ms: np.ndarray) -> np.ndarray | None:
        """Wall-clock send times (non-decreasing), or None when unpaced."""
        if self.speed == 0 or not len(timestamps_ms):
            return None
        if self._origin is None:
            self._origin = (self.clock(), int(timestamps_ms[0]))
        wall0, t0 = self._origin
        due = wall0 + (timestamps_ms.astype("float64") - t0) / 1000.0 / self.speed
        return np.maximum.accumulate(due)


def _run(
    chunks: Iterator[_Chunk],
    publisher: Publisher,
    checkpoint_path: str | Path | None,
    start: Checkpoint,
    speed: float,
    on_sent: Callable[[int], None] | None,
) -> ReplayResult:
    pacer = _Pacer(speed)
    state = {"cp": start}

    def confirmed(position: dict[str, int], n: int) -> Callable[[], None]:
        def done() -> None:
            cp = state["cp"]
            cp = Checkpoint(cp.source, cp.target, {**cp.position, **position}, cp.delivered + n)
            state["cp"] = cp
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, cp)

        return done

    try:
        for chunk in chunks:
            n = len(chunk.values)
            due = pacer.due(chunk.timestamps_ms)
            i = 0
            while i < n:
                j = n
                if due is not None:
                    now = pacer.clock()
                    j = max(int(np.searchsorted(due, now, side="right")), i)
                    if j == i:
                        publisher.poll(min(float(due[i] - now), 0.1))
                        continue
                last = j == n
                publisher.send(
                    chunk.keys[i:j],
                    chunk.values[i:j],
                    chunk.timestamps_ms[i:j],
                    confirmed(chunk.position, n) if last else None,
                )
                i = j
            if n == 0:
                publisher.send([], [], chunk.timestamps_ms, confirmed(chunk.position, 0))
            if on_sent is not None:
                on_sent(publisher.stats.sent)
    finally:
        left = publisher.flush()
        if left:
            logger.warning("%d messages unconfirmed at exit: they are sent again on resume", left)
        if publisher.progress:
            publisher.progress.close()
    return ReplayResult(publisher.stats, start.delivered, state["cp"])


def _file_chunks(
    path: Path,
    registry: SchemaRegistry,
    skip_rows: int,
    batch_size: int,
    limit: int | None,
) -> Iterator[_Chunk]:
    kind = avro_file_kind(path)
    reader = read_ads if kind == "ads" else read_engagements
    batches: Iterator[AdBatch] | Iterator[EngagementBatch] = reader(path, batch_size=batch_size)
    codec: AdCodec | EngagementCodec | None = None
    row = taken = 0
    for batch in batches:
        begin, row = row, row + len(batch)
        if row <= skip_rows:
            continue
        rows = np.arange(max(skip_rows - begin, 0), len(batch))
        if limit is not None:
            rows = rows[: max(limit - taken, 0)]
            if not len(rows):
                return
        part = batch.take(rows)
        taken += len(part)
        if codec is None:
            cls = AdCodec if kind == "ads" else EngagementCodec
            codec = cls(registry, part.dim)
        values: list[Any] = codec.encode(part)  # type: ignore[arg-type]
        yield _Chunk(
            list(batch_keys(part)),
            values,
            part.event_time_ms,
            {FILE_POSITION: begin + int(rows[-1]) + 1},
        )


def replay_file(
    path: str | Path,
    publisher: Publisher,
    registry: SchemaRegistry,
    *,
    speed: float = 0.0,
    checkpoint: str | Path | None = None,
    batch_size: int = 5_000,
    max_events: int | None = None,
    on_sent: Callable[[int], None] | None = None,
) -> ReplayResult:
    """Replay an Avro container file of ad or engagement events into `publisher.topic`."""
    p = Path(path)
    avro_file_kind(p)
    source = f"file:{p.resolve()}"
    start = Checkpoint(source, publisher.topic)
    if checkpoint is not None:
        start = load_checkpoint(checkpoint, source, publisher.topic)
    skip = start.position.get(FILE_POSITION, 0)
    if skip:
        logger.info("resuming %s after %d confirmed rows", p, skip)
    chunks = _file_chunks(p, registry, skip, batch_size, max_events)
    return _run(chunks, publisher, checkpoint, start, speed, on_sent)


def _assign(
    consumer: Consumer, topic: str, start_ms: int | None, position: dict[str, int]
) -> list[int]:
    meta = consumer.list_topics(topic, timeout=10)
    info = meta.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        reason = info.error if info is not None else "not found"
        raise ReplayError(f"source topic {topic!r} cannot be read ({reason}); check the name")
    partitions = sorted(info.partitions)
    offsets = {p: OFFSET_BEGINNING for p in partitions}
    if start_ms is not None:
        found = consumer.offsets_for_times(
            [TopicPartition(topic, p, start_ms) for p in partitions], timeout=10
        )
        offsets.update({tp.partition: tp.offset for tp in found if tp.offset >= 0})
    offsets.update({int(p): off for p, off in position.items() if int(p) in offsets})
    consumer.assign([TopicPartition(topic, p, off) for p, off in offsets.items()])
    return partitions


def _topic_chunks(
    consumer: Consumer,
    topic: str,
    start_ms: int | None,
    end_ms: int | None,
    position: dict[str, int],
    batch_size: int,
    limit: int | None,
    idle_s: float,
) -> Iterator[_Chunk]:
    partitions = _assign(consumer, topic, start_ms, position)
    finished: set[int] = set()
    at_end: set[int] = set()
    last_data = time.monotonic()
    taken = 0
    while True:
        messages = consumer.consume(batch_size, 0.1)
        keys: list[bytes | None] = []
        values: list[bytes | None] = []
        stamps: list[int] = []
        moved: dict[str, int] = {}
        for m in messages:
            p = cast(int, m.partition())
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    at_end.add(p)
                    continue
                raise ReplayError(f"reading {topic} partition {p}: {err}")
            at_end.discard(p)
            last_data = time.monotonic()
            if p in finished:
                continue
            ts = m.timestamp()[1]
            if end_ms is not None and ts >= end_ms:
                finished.add(p)
                consumer.pause([TopicPartition(topic, p)])
                continue
            moved[str(p)] = cast(int, m.offset()) + 1
            if start_ms is not None and ts < start_ms:
                continue
            keys.append(_key_of(m.key(), m.value()))
            values.append(m.value())
            stamps.append(ts)
            taken += 1
            if limit is not None and taken >= limit:
                break
        if moved:
            yield _Chunk(keys, values, np.asarray(stamps, dtype="int64"), moved)
        if limit is not None and taken >= limit:
            return
        idle = time.monotonic() - last_data >= idle_s
        if idle and all(p in finished or p in at_end for p in partitions):
            return


def replay_topic(
    consumer: Consumer,
    source_topic: str,
    publisher: Publisher,
    *,
    start_ms: int | None = None,
    end_ms: int | None = None,
    speed: float = 0.0,
    checkpoint: str | Path | None = None,
    batch_size: int = 5_000,
    max_events: int | None = None,
    idle_s: float = 1.0,
    on_sent: Callable[[int], None] | None = None,
) -> ReplayResult:
    """Copy messages with `start_ms <= timestamp < end_ms` of `source_topic` to the publisher's
    topic; stops when every partition is at its end (no new message for `idle_s`) or past
    `end_ms`. Uses `assign()` (no consumer group) and commits nothing: the checkpoint is the
    position."""
    if source_topic == publisher.topic:
        raise ConfigError(f"source and target are both {source_topic!r}; replay into another topic")
    if start_ms is not None and end_ms is not None and end_ms <= start_ms:
        raise ConfigError(f"empty time range: end {end_ms} is not after start {start_ms}")
    source = f"topic:{source_topic}[{start_ms or ''},{end_ms or ''})"
    start = Checkpoint(source, publisher.topic)
    if checkpoint is not None:
        start = load_checkpoint(checkpoint, source, publisher.topic)
    chunks = _topic_chunks(
        consumer, source_topic, start_ms, end_ms, start.position, batch_size, max_events, idle_s
    )
    return _run(chunks, publisher, checkpoint, start, speed, on_sent)
