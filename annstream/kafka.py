"""Kafka clients with annstream's defaults, and the dead-letter path.

Settings are layered: annstream's defaults, then `KafkaConfig.client` (SASL/SSL, ...), then the
caller's overrides, all spelled as librdkafka / confluent-kafka spell them (`enable.partition.eof`,
`error_cb`). A key or value the client does not know is refused at creation with a
`ConfigError` naming it. Defaults are chosen for at-least-once delivery (offsets stored or
committed only after the results they cover are stored), for the embedded Tansu broker's timing
(short session timeout, short fetch wait), and for interoperability: producers hash keys with
murmur2 like Java, Kafka Streams and Connect producers, they compress with
`kafka.compression_type` (lz4: a client that is not librdkafka needs an LZ4 codec to read the
topics), and their message limit is `kafka.max_message_bytes`. librdkafka's own log lines and errors go through `logging`, so
`--log-json` output stays JSON.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from annstream.config import KafkaConfig
from annstream.errors import ConfigError
from annstream.events import Rejection
from annstream.logs import redact_text

__all__ = [
    "DEAD_LETTER_REASONS",
    "DeadLetterMarks",
    "DeadLetterPublisher",
    "client_logging",
    "consumer_config",
    "dead_letter_reason",
    "headers_dict",
    "make_consumer",
    "make_producer",
    "message_error",
    "producer_config",
]

logger = logging.getLogger(__name__)
client_logger = logging.getLogger("annstream.kafka.client")
"""Where librdkafka's log lines and client errors go (fields: `client`, `facility`, `code`)."""

_CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 1000,
    "fetch.wait.max.ms": 50,
    "max.poll.interval.ms": 300_000,
    "partition.assignment.strategy": "cooperative-sticky",
    "log_level": 4,
}
_PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "partitioner": "murmur2_random",
    "log_level": 4,
}
_REPEAT_S = 10.0
_THREAD = re.compile(r"^\[thrd:([^\]]*)\]:\s*")


class _ClientLog:
    """The `logger` and `error_cb` of one client: librdkafka's lines and errors as records of
    `client_logger`, with the client, facility or error code as fields. A text repeated within
    10 s (librdkafka reports a failed connection both as a log line and as an error, every
    reconnect) is logged once; the next one after that says how many were left out (`repeated`).
    Both are called from inside poll/consume, so neither may raise."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[float, int]] = {}

    def _first(self, key: str) -> int | None:
        """None to leave the line out, else how many were left out since it was last logged."""
        now = time.monotonic()
        last, skipped = self._seen.get(key, (-_REPEAT_S, 0))
        if now - last < _REPEAT_S:
            self._seen[key] = (last, skipped + 1)
            return None
        if len(self._seen) > 1000:
            self._seen.clear()
        self._seen[key] = (now, 0)
        return skipped

    def log(self, level: int, fmt: str, *args: Any) -> None:
        # confluent-kafka calls log(level, "%s [%s] %s", facility, client name, text)
        facility, client, text = (str(a) for a in args) if len(args) == 3 else ("", "", fmt % args)
        thread = _THREAD.match(text)
        if thread:
            text = text[thread.end() :]
        skipped = self._first(text)
        if skipped is None:
            return
        fields: dict[str, Any] = {"client": client, "facility": facility}
        if thread:
            fields["rdkafka_thread"] = thread.group(1)
        if skipped:
            fields["repeated"] = skipped
        client_logger.log(level, "%s", text, extra=fields)

    def error(self, err: KafkaError) -> None:
        """Errors librdkafka reports outside a request (brokers down, authentication, ...);
        a fatal one is always logged."""
        skipped = 0 if err.fatal() else self._first(err.str())
        if skipped is None:
            return
        fields: dict[str, Any] = {"code": err.name(), "fatal": err.fatal()}
        if skipped:
            fields["repeated"] = skipped
        level = logging.ERROR if err.fatal() else logging.WARNING
        client_logger.log(level, "kafka client error: %s", err.str(), extra=fields)


def client_logging() -> dict[str, Any]:
    """Settings routing one client's librdkafka logs and errors through `logging` (served by
    poll/consume/flush, so they come out on the thread that polls the client)."""
    sink = _ClientLog()
    return {"logger": sink, "error_cb": sink.error}


def consumer_config(
    cfg: KafkaConfig, group_id: str | None = None, **overrides: Any
) -> dict[str, Any]:
    """The consumer settings: defaults, then cfg.client, then `overrides` (keys as librdkafka
    spells them; pass dotted ones as `**{"enable.partition.eof": True}`)."""
    return {
        **_CONSUMER_DEFAULTS,
        **client_logging(),
        "bootstrap.servers": cfg.bootstrap_servers,
        "group.id": group_id or cfg.group_id,
        **cfg.client,
        **overrides,
    }


def producer_config(cfg: KafkaConfig, **overrides: Any) -> dict[str, Any]:
    """The producer settings: defaults (murmur2 partitioner, `message.max.bytes` =
    kafka.max_message_bytes, `compression.type` = kafka.compression_type), then cfg.client,
    then `overrides`."""
    return {
        **_PRODUCER_DEFAULTS,
        **client_logging(),
        "bootstrap.servers": cfg.bootstrap_servers,
        "message.max.bytes": cfg.max_message_bytes,
        "compression.type": cfg.compression_type,
        **cfg.client,
        **overrides,
    }


def _refused(kind: str, exc: Exception) -> ConfigError:
    text = exc.args[0].str() if isinstance(exc, KafkaException) else str(exc)
    return ConfigError(
        f"the Kafka {kind} refused its settings: {redact_text(text)}; fix the key or value in "
        "[kafka.client] (librdkafka's names, e.g. 'sasl.mechanisms')"
    )


def make_consumer(cfg: KafkaConfig, group_id: str | None = None, **overrides: Any) -> Consumer:
    try:
        return Consumer(consumer_config(cfg, group_id, **overrides))
    except (KafkaException, TypeError, ValueError) as exc:
        raise _refused("consumer", exc) from None


def make_producer(cfg: KafkaConfig, **overrides: Any) -> Producer:
    try:
        return Producer(producer_config(cfg, **overrides))
    except (KafkaException, TypeError, ValueError) as exc:
        raise _refused("producer", exc) from None


Source = tuple[str, int]
"""A source topic and partition."""

_REASON_LABELS = (
    ("empty message", "null_value"),
    ("over kafka.max_message_bytes", "too_large"),
    ("unknown schema id", "unknown_schema"),
    ("cannot resolve schema id", "unknown_schema"),
    ("schema, expected", "unknown_schema"),
    ("truncated message", "not_avro"),
    ("bad magic byte", "not_avro"),
    ("corrupt avro payload", "not_avro"),
    ("trailing bytes", "not_avro"),
    ("wrong dimension", "dimension"),
    ("whole number of float32", "dimension"),
    ("nan or inf", "non_finite"),
    ("zero embedding", "zero_vector"),
    ("event time", "event_time"),
    (" id -", "negative_id"),
    ("operation", "operation"),
    ("without an embedding", "operation"),
    ("weight", "weight"),
)


DEAD_LETTER_REASONS = (*dict.fromkeys(label for _, label in _REASON_LABELS), "other")
"""Every label `dead_letter_reason` returns."""


def dead_letter_reason(reason: str) -> str:
    """The bounded label of a refusal reason (the metric's `reason`): the reasons themselves
    carry ids, sizes and times."""
    text = reason.lower()
    return next((label for needle, label in _REASON_LABELS if needle in text), "other")


_TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
_MAX_REASON = 2000
_MAX_REFERENCE_KEY = 1024


@dataclass(frozen=True)
class _Letter:
    """One dead letter: the original record, where it came from and why it was refused."""

    topic: str
    partition: int
    offset: int
    reason: str
    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, str | bytes | None]]
    timestamp_ms: int
    original_size: int
    reference: bool = False

    def as_reference(self) -> _Letter:
        """The same letter without the value or the original headers (and without the key
        when it is large): what still fits when the whole record does not."""
        key = self.key if self.key is None or len(self.key) <= _MAX_REFERENCE_KEY else None
        return replace(self, value=None, key=key, headers=[], reference=True)

    def record_headers(self) -> list[tuple[str, str | bytes | None]]:
        return [
            *self.headers,
            ("annstream.reason", self.reason[:_MAX_REASON].encode()),
            ("annstream.source", f"{self.topic}/{self.partition}/{self.offset}".encode()),
            ("annstream.original-size", str(self.original_size).encode()),
            *([("annstream.value-omitted", b"true")] if self.reference else []),
        ]

    @property
    def fields(self) -> dict[str, Any]:
        """The log record fields naming this letter."""
        return {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "reason": self.reason,
        }


class DeadLetterPublisher:
    """Sends refused messages to the dead-letter topic, and never raises.

    A dead letter keeps the original key, value, timestamp and headers and adds the headers
    `annstream.reason`, `annstream.source` (topic/partition/offset) and
    `annstream.original-size` (bytes of the original value), so an operator can find, fix and
    replay it. One the producer or the broker refuses as too large is sent again as a
    reference: no value and no original headers, `annstream.value-omitted: true`. A full
    producer queue is waited for (up to `queue_wait_s`); any other refusal or failed delivery
    is logged and counted in `failed`, and the stream goes on.

    `delivered` holds, per source (topic, partition), the offset after the last record whose
    dead letter was delivered: what `DeadLetterMarks` commits. `reasons` counts the letters
    per `dead_letter_reason` label (sent or not), `failed` those lost, `references` those sent
    without their value: the service's metrics follow these totals.
    """

    def __init__(self, producer: Producer, topic: str, queue_wait_s: float = 10.0) -> None:
        self.producer = producer
        self.topic = topic
        self.queue_wait_s = queue_wait_s
        self.count = 0
        self.references = 0
        self.failed = 0
        self.reasons: dict[str, int] = {}
        self.delivered: dict[Source, int] = {}
        self._resend: list[_Letter] = []

    def publish(self, messages: Sequence[Message], rejected: Sequence[Rejection]) -> None:
        deadline = time.monotonic() + self.queue_wait_s
        for r in rejected:
            m = messages[r.index]
            ts_type, ts = m.timestamp()
            self._send(
                _Letter(
                    topic=str(m.topic()),
                    partition=int(m.partition() or 0),
                    offset=int(m.offset() or 0),
                    reason=r.reason,
                    value=m.value(),
                    key=_as_bytes(m.key()),
                    headers=list(m.headers() or []),  # type: ignore[arg-type]
                    timestamp_ms=ts if ts_type != 0 and ts > 0 else 0,
                    original_size=len(m.value() or b""),
                ),
                deadline,
            )
        self.poll()

    def send(
        self,
        value: bytes | None,
        reason: str,
        topic: str | None,
        partition: int | None,
        offset: int | None,
        key: bytes | str | None = None,
    ) -> None:
        """Dead-letter one record known only by its parts (no original headers or time)."""
        letter = _Letter(
            topic=str(topic),
            partition=int(partition or 0),
            offset=int(offset or 0),
            reason=reason,
            value=value,
            key=_as_bytes(key),
            headers=[],
            timestamp_ms=0,
            original_size=len(value or b""),
        )
        self._send(letter, time.monotonic() + self.queue_wait_s)
        self.poll()

    def _send(self, letter: _Letter, deadline: float) -> None:
        """Queue one letter; waits for room in the producer's queue until `deadline` (shared
        by the letters of one call, so a full queue costs one wait, not one per letter)."""
        if not letter.reference:
            label = dead_letter_reason(letter.reason)
            self.reasons[label] = self.reasons.get(label, 0) + 1
        while True:
            try:
                self.producer.produce(
                    self.topic,
                    value=letter.value,
                    key=letter.key,
                    headers=letter.record_headers(),
                    timestamp=letter.timestamp_ms,
                    on_delivery=functools.partial(self._delivered, letter),
                )
            except BufferError:
                if time.monotonic() >= deadline:
                    self._fail(letter, "the producer's queue stayed full")
                    return
                self.producer.poll(0.1)
                continue
            except (TypeError, ValueError) as exc:
                self._fail(letter, str(exc))
                return
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if err.code() in _TOO_LARGE and not letter.reference:
                    letter = letter.as_reference()
                    continue
                self._fail(letter, err.str())
                return
            break
        self.count += 1
        if letter.reference:
            self.references += 1
            logger.warning(
                "dead-lettered %s/%s/%s as a reference (the %d-byte record is over the "
                "producer's message.max.bytes): %s",
                letter.topic,
                letter.partition,
                letter.offset,
                letter.original_size,
                letter.reason,
                extra={**letter.fields, "original_size": letter.original_size},
            )
        else:
            logger.warning(
                "dead-lettered %s/%s/%s: %s",
                letter.topic,
                letter.partition,
                letter.offset,
                letter.reason,
                extra=letter.fields,
            )

    def _delivered(self, letter: _Letter, err: KafkaError | None, _message: Message) -> None:
        if err is None:
            source = (letter.topic, letter.partition)
            self.delivered[source] = max(self.delivered.get(source, 0), letter.offset + 1)
        elif err.code() in _TOO_LARGE and not letter.reference:
            self._resend.append(letter.as_reference())
        else:
            self._fail(letter, f"delivery failed: {err.str()}")

    def _fail(self, letter: _Letter, why: str) -> None:
        self.failed += 1
        logger.error(
            "dead letter of %s/%s/%s lost (%s); the record was refused: %s",
            letter.topic,
            letter.partition,
            letter.offset,
            why,
            letter.reason,
            extra={**letter.fields, "error": why},
        )

    def poll(self, timeout_s: float = 0.0) -> None:
        """Serve delivery reports; send again, as references, letters the broker found too large."""
        self.producer.poll(timeout_s)
        deadline = time.monotonic() + self.queue_wait_s
        while self._resend:
            letters, self._resend = self._resend, []
            for letter in letters:
                self._send(letter, deadline)
            self.producer.poll(0)

    def flush(self, timeout_s: float = 10.0) -> int:
        """Wait for delivery (of the whole producer's queue); returns how many are still queued."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = int(self.producer.flush(max(0.0, deadline - time.monotonic())))
            if not self._resend or time.monotonic() >= deadline:
                return left + len(self._resend)
            self.poll()

    def delivered_for(self, topic: str) -> dict[int, int]:
        """Per partition of source `topic`, the offset after the last delivered dead letter."""
        return {p: o for (t, p), o in self.delivered.items() if t == topic}


class DeadLetterMarks:
    """How far the dead-lettering of a source topic got, per partition, kept as the committed
    offsets of a consumer group that never joins (`consumer`'s group, e.g.
    `<group_id>.ads.dead-letters`): a replay from an older snapshot recognises records below
    the mark as dead-lettered already and does not send them again.

    Replicas reading the same topic share the group; a commit never moves a mark backwards
    from what this process loaded or committed. Broker errors are logged, never raised: at
    worst a record is dead-lettered twice.
    """

    def __init__(self, consumer: Consumer, topic: str, retry_s: float = 5.0) -> None:
        self.consumer = consumer
        self.topic = topic
        self.retry_s = retry_s
        self.marks: dict[int, int] = {}
        self._retry_at = 0.0

    def load(self, partitions: Sequence[int], timeout_s: float = 10.0) -> dict[int, int]:
        try:
            tps = self.consumer.committed(
                [TopicPartition(self.topic, p) for p in partitions], timeout_s
            )
        except KafkaException as exc:
            logger.warning(
                "dead-letter marks of %s not read (records replayed may be dead-lettered "
                "again): %s",
                self.topic,
                exc,
                extra={"topic": self.topic},
            )
            return {}
        for tp in tps:
            if tp.error is None and tp.offset >= 0:
                self.marks[tp.partition] = max(self.marks.get(tp.partition, 0), tp.offset)
        return dict(self.marks)

    def seen(self, partition: int, offset: int) -> bool:
        """True if the record at `offset` of `partition` was dead-lettered before."""
        return offset < self.marks.get(partition, 0)

    def advance(self, delivered: Mapping[int, int], force: bool = False) -> bool:
        """Commit the partitions whose delivered dead letters passed the mark; False on error
        (retried by the next call after `retry_s`, or at once with `force`)."""
        ahead = {p: o for p, o in delivered.items() if o > self.marks.get(p, 0)}
        if not ahead or (time.monotonic() < self._retry_at and not force):
            return not ahead
        try:
            self.consumer.commit(
                offsets=[TopicPartition(self.topic, p, o) for p, o in sorted(ahead.items())],
                asynchronous=False,
            )
        except KafkaException as exc:
            self._retry_at = time.monotonic() + self.retry_s
            logger.warning(
                "dead-letter marks of %s not committed, retried in %.0fs: %s",
                self.topic,
                self.retry_s,
                exc,
                extra={"topic": self.topic},
            )
            return False
        self.marks.update(ahead)
        return True

    def close(self) -> None:
        self.consumer.close()


def _as_bytes(key: bytes | str | None) -> bytes | None:
    return key.encode() if isinstance(key, str) else key


def message_error(message: Message) -> str | None:
    """The error text of a consumed message, or None; partition EOF is not an error."""
    err = message.error()
    if err is None or err.code() == KafkaError._PARTITION_EOF:
        return None
    return str(err)


def headers_dict(message: Message) -> Mapping[str, bytes]:
    raw: list[tuple[str, bytes]] = list(message.headers() or [])  # type: ignore[arg-type]
    return {k: v or b"" for k, v in raw}
