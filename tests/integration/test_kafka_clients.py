"""annstream's Kafka clients against the real broker: where keys land (murmur2, like Java
producers) and what the dead-letter publisher writes at librdkafka's real default limit
(1,000,000 bytes) for records of 1.02 MB and 5 MB that the broker accepted."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from confluent_kafka import OFFSET_BEGINNING, Message, TopicPartition

from annstream.config import KafkaConfig
from annstream.events import Rejection
from annstream.kafka import DeadLetterPublisher, headers_dict, make_consumer, make_producer
from producers.publish import id_keys

GUARD_S = 60.0
BIG = 6_000_000
"""`message.max.bytes` of the test producer writing the large source records."""


def java_murmur2(data: bytes) -> int:
    """org.apache.kafka.common.utils.Utils.murmur2, transcribed (32-bit signed result)."""
    m, r, mask = 0x5BD1E995, 24, 0xFFFFFFFF
    length = len(data)
    h = (0x9747B28C ^ length) & mask
    for i in range(length // 4):
        k = int.from_bytes(data[4 * i : 4 * i + 4], "little")
        k = (k * m) & mask
        k ^= k >> r
        k = (k * m) & mask
        h = (h * m) & mask
        h ^= k
    tail = length % 4
    base = length & ~3
    if tail == 3:
        h ^= data[base + 2] << 16
    if tail >= 2:
        h ^= data[base + 1] << 8
    if tail >= 1:
        h ^= data[base]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h - (1 << 32) if h >= 1 << 31 else h


def java_partition(key: bytes, partitions: int) -> int:
    """Java's default partitioner for a keyed record: toPositive(murmur2(key)) % partitions."""
    return (java_murmur2(key) & 0x7FFFFFFF) % partitions


def test_the_transcribed_murmur2_matches_kafkas_own_test_vectors() -> None:
    # From Kafka's UtilsTest.testMurmur2.
    vectors = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    assert {k: java_murmur2(k) for k in vectors} == vectors


def test_keys_land_on_the_partition_a_java_producer_would_choose(
    bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    partitions = 7
    topic = topic_factory("keys", partitions)
    keys = [*id_keys(np.arange(-5, 300, dtype="int64")), b"a", b"ab", b"abc", b"query-42"]
    landed: dict[bytes, int] = {}

    def delivered(err: Any, msg: Message) -> None:
        assert err is None, err
        landed[bytes(msg.key() or b"")] = int(msg.partition() or 0)

    producer = make_producer(KafkaConfig(bootstrap_servers=bootstrap))
    for key in keys:
        producer.produce(topic, value=b"v", key=key, on_delivery=delivered)
    assert producer.flush(GUARD_S) == 0
    want = {k: java_partition(k, partitions) for k in keys}
    assert landed == want
    assert len(set(want.values())) == partitions


def _source_records(
    bootstrap: str, topic: str, values: list[bytes], headers: list[tuple[str, bytes]]
) -> list[Message]:
    """`values` written by a producer allowed large records, then read back as consumed."""
    producer = make_producer(
        KafkaConfig(bootstrap_servers=bootstrap, max_message_bytes=BIG),
    )
    for i, v in enumerate(values):
        producer.produce(
            topic, value=v, key=f"k{i}".encode(), headers=headers, timestamp=1_600_000_000_000 + i
        )
    assert producer.flush(GUARD_S) == 0
    return _read(bootstrap, topic, len(values))


def _read(bootstrap: str, topic: str, n: int) -> list[Message]:
    consumer = make_consumer(KafkaConfig(bootstrap_servers=bootstrap), group_id=f"read-{topic}")
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    out: list[Message] = []
    deadline = time.monotonic() + GUARD_S
    try:
        while len(out) < n and time.monotonic() < deadline:
            out += [m for m in consumer.consume(n, 0.2) if m.error() is None]
    finally:
        consumer.close()
    assert len(out) == n
    return out


def test_dead_letters_keep_the_record_and_large_ones_become_references(
    bootstrap: str, topic_factory: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    """At the default limit: a 1.02 MB and a 5 MB source record cannot be copied to the
    dead-letter topic; before, `produce` raised MSG_SIZE_TOO_LARGE out of the consumer's poll."""
    source, dlq = topic_factory("src"), topic_factory("dlq")
    sizes = [100, 1_020_000, 5_000_000, 999_950, 990_000, 200]
    values = [bytes([i]) * size for i, size in enumerate(sizes)]
    original_headers = [("trace-id", b"abc"), ("tenant", b"t1")]
    messages = _source_records(bootstrap, source, values, original_headers)
    assert [len(m.value() or b"") for m in messages] == sizes

    cfg = KafkaConfig(bootstrap_servers=bootstrap)
    assert cfg.max_message_bytes == 1_000_000
    letters = DeadLetterPublisher(make_producer(cfg), dlq)
    with caplog.at_level(logging.WARNING, logger="annstream.kafka"):
        letters.publish(messages, [Rejection(i, f"reason {i}") for i in range(len(messages))])
    assert letters.flush(GUARD_S) == 0
    logged = [r.__dict__ for r in caplog.records if r.getMessage().startswith("dead-lettered")]
    assert [(d["topic"], d["partition"], d["offset"], d["reason"]) for d in logged] == [
        (source, 0, i, f"reason {i}") for i in range(len(sizes))
    ]
    assert [d.get("original_size") for d in logged] == [None, *sizes[1:4], None, None]
    # 999,950 bytes of value plus the key and headers are over 1,000,000 too; 990,000 fit.
    assert (letters.count, letters.references, letters.failed) == (6, 3, 0)
    assert letters.delivered == {(source, 0): 6}

    out = _read(bootstrap, dlq, len(sizes))
    for i, (m, size) in enumerate(zip(out, sizes, strict=True)):
        h = headers_dict(m)
        assert h["annstream.reason"] == f"reason {i}".encode()
        assert h["annstream.source"] == f"{source}/0/{i}".encode()
        assert h["annstream.original-size"] == str(size).encode()
        assert m.key() == f"k{i}".encode()
        assert m.timestamp()[1] == 1_600_000_000_000 + i
        if i not in (1, 2, 3):
            assert m.value() == values[i]
            assert list(m.headers() or [])[:2] == original_headers
            assert "annstream.value-omitted" not in h
        else:
            assert m.value() is None
            assert h["annstream.value-omitted"] == b"true"


def test_a_tiny_producer_queue_is_waited_for_and_every_dead_letter_delivered(
    bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    dlq = topic_factory("dlq")
    producer = make_producer(
        KafkaConfig(bootstrap_servers=bootstrap), **{"queue.buffering.max.messages": 2}
    )
    letters = DeadLetterPublisher(producer, dlq)
    messages = [Message(topic="src", partition=3, offset=i, value=b"v%d" % i) for i in range(50)]
    letters.publish(messages, [Rejection(i, "bad") for i in range(50)])
    assert letters.flush(GUARD_S) == 0
    assert (letters.count, letters.failed) == (50, 0)
    assert letters.delivered == {("src", 3): 50}
    assert [m.value() for m in _read(bootstrap, dlq, 50)] == [b"v%d" % i for i in range(50)]
