"""The Kafka client settings annstream builds (annstream/kafka.py), without a broker: layering of
defaults, `[kafka.client]` and overrides, refusal of unknown keys with the key named (and no
secret echoed), and librdkafka's logs and errors going through `logging`."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from confluent_kafka import KafkaError, Message, TopicPartition

from annstream.config import COMPRESSION_TYPES, KafkaConfig
from annstream.errors import ConfigError
from annstream.events import Rejection
from annstream.kafka import (
    DeadLetterPublisher,
    client_logging,
    consumer_config,
    dead_letter_reason,
    make_consumer,
    make_producer,
    producer_config,
)

NOWHERE = "127.0.0.1:1"
"""A port nothing listens on: clients keep failing to connect."""


def test_consumer_settings_layer_defaults_then_client_table_then_overrides() -> None:
    cfg = KafkaConfig(
        bootstrap_servers="b:9092",
        group_id="g",
        client={"session.timeout.ms": "30000", "security.protocol": "SASL_SSL"},
    )
    conf = consumer_config(cfg)
    assert conf["bootstrap.servers"] == "b:9092" and conf["group.id"] == "g"
    assert conf["enable.auto.commit"] is False and conf["enable.auto.offset.store"] is False
    assert conf["session.timeout.ms"] == "30000" and conf["security.protocol"] == "SASL_SSL"
    assert conf["partition.assignment.strategy"] == "cooperative-sticky"
    over = consumer_config(
        cfg, "other", **{"session.timeout.ms": 7000, "enable.partition.eof": True}
    )
    assert over["group.id"] == "other"
    assert over["session.timeout.ms"] == 7000 and over["enable.partition.eof"] is True


def test_producer_settings_hash_keys_like_java_and_use_the_configured_message_limit() -> None:
    conf = producer_config(KafkaConfig())
    assert conf["partitioner"] == "murmur2_random"
    assert conf["message.max.bytes"] == 1_000_000
    assert conf["enable.idempotence"] is True and conf["acks"] == "all"
    assert (
        producer_config(KafkaConfig(max_message_bytes=2_000_000))["message.max.bytes"] == 2_000_000
    )
    mine = producer_config(KafkaConfig(client={"partitioner": "consistent_random"}))
    assert mine["partitioner"] == "consistent_random"
    assert conf["compression.type"] == "lz4"
    assert producer_config(KafkaConfig(compression_type="zstd"))["compression.type"] == "zstd"
    for codec in COMPRESSION_TYPES:  # librdkafka takes every value the config allows
        make_producer(KafkaConfig(compression_type=codec))


def test_override_keys_are_passed_as_spelled_so_client_callbacks_work() -> None:
    """`error_cb`, `log_level`, `on_commit` are confluent-kafka / librdkafka names with an
    underscore: rewriting `_` to `.` (as before) made them unknown properties."""
    seen: list[KafkaError] = []
    conf = consumer_config(KafkaConfig(), error_cb=seen.append, log_level=3)
    assert conf["error_cb"] == seen.append and conf["log_level"] == 3
    assert "error.cb" not in conf and "log.level" not in conf
    consumer = make_consumer(
        KafkaConfig(bootstrap_servers=NOWHERE), error_cb=seen.append, log_level=3
    )
    try:
        consumer.assign([TopicPartition("t", 0, 0)])
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            consumer.consume(1, 0.2)
    finally:
        consumer.close()
    assert seen and seen[0].code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN)


@pytest.mark.parametrize("make", [make_consumer, make_producer])
@pytest.mark.parametrize(
    ("client", "overrides", "named"),
    [
        ({"sasl.passwrd": "hunter2"}, {}, "sasl.passwrd"),
        ({}, {"enable_partition_eof": True}, "enable_partition_eof"),
        ({"acks": "hunter2"}, {}, "acks"),
    ],
)
def test_unknown_keys_and_bad_values_are_refused_naming_the_key_not_the_value(
    make: Any, client: dict[str, str], overrides: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError) as info:
        make(KafkaConfig(client=client), **overrides)
    text = str(info.value)
    assert named in text and "[kafka.client]" in text
    assert "hunter2" not in text


def test_a_callback_setting_that_is_not_callable_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="error_cb"):
        make_producer(KafkaConfig(), error_cb="not a function")


def test_librdkafka_logs_and_errors_go_through_logging_not_stderr(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    cfg = KafkaConfig(bootstrap_servers=NOWHERE)
    with caplog.at_level(logging.INFO, logger="annstream.kafka.client"):
        consumer = make_consumer(cfg)
        consumer.assign([TopicPartition("t", 0, 0)])
        producer = make_producer(cfg, **{"message.timeout.ms": 1000})
        producer.produce("t", b"x")
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            consumer.consume(1, 0.2)
            producer.poll(0.1)
        consumer.close()
        producer.flush(2)
    assert "%3|" not in capfd.readouterr().err
    records = [r for r in caplog.records if r.name == "annstream.kafka.client"]
    refused = [r for r in records if "Connection refused" in r.getMessage()]
    assert refused and all(hasattr(r, "client") or hasattr(r, "code") for r in refused)
    assert all(r.levelno >= logging.WARNING for r in records)
    # Each client reports the same refused connection as a log line and as an error, again on
    # every reconnect (~100 ms): each text is logged once per 10 s and client.
    texts = [r.getMessage().removeprefix("kafka client error: ") for r in records]
    assert len(texts) <= 2 * len(set(texts)), texts


def test_client_log_lines_carry_client_facility_and_thread_as_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = client_logging()["logger"]
    with caplog.at_level(logging.DEBUG, logger="annstream.kafka.client"):
        for _ in range(3):
            sink.log(
                logging.ERROR,
                "%s [%s] %s",
                "FAIL",
                "rdkafka#consumer-7",
                "[thrd:b:9092/bootstrap]: b:9092/bootstrap: Connect failed",
            )
    (record,) = caplog.records
    assert record.getMessage() == "b:9092/bootstrap: Connect failed"
    assert (record.client, record.facility, record.rdkafka_thread) == (  # type: ignore[attr-defined]
        "rdkafka#consumer-7",
        "FAIL",
        "b:9092/bootstrap",
    )


def test_a_dead_letter_that_cannot_be_queued_is_counted_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The queue holds one message and the broker is unreachable: the second dead letter waits
    `queue_wait_s` for room, then is logged and counted; nothing is raised."""
    producer = make_producer(
        KafkaConfig(bootstrap_servers=NOWHERE),
        **{"queue.buffering.max.messages": 1, "message.timeout.ms": 1500},
    )
    letters = DeadLetterPublisher(producer, "dlq", queue_wait_s=0.3)
    with caplog.at_level(logging.WARNING, logger="annstream.kafka"):
        letters.send(b"a", "bad", "ads", 0, 1)
        letters.send(b"b", "bad", "ads", 0, 2)
        assert (letters.count, letters.failed) == (1, 1)
        assert letters.flush(5) == 0
    assert (letters.count, letters.failed) == (1, 2)
    assert letters.delivered == {}
    lost = [r for r in caplog.records if r.getMessage().startswith("dead letter of ads/0/")]
    assert len(lost) == 2
    assert {(r.topic, r.partition, r.offset) for r in lost} == {("ads", 0, 1), ("ads", 0, 2)}  # type: ignore[attr-defined]


def test_a_full_queue_costs_one_wait_per_poll_not_one_per_dead_letter() -> None:
    producer = make_producer(
        KafkaConfig(bootstrap_servers=NOWHERE),
        **{"queue.buffering.max.messages": 1, "message.timeout.ms": 1000},
    )
    letters = DeadLetterPublisher(producer, "dlq", queue_wait_s=0.5)
    messages = [Message(topic="ads", partition=1, offset=i, value=b"x") for i in range(20)]
    started = time.monotonic()
    letters.publish(messages, [Rejection(i, "bad") for i in range(20)])
    assert time.monotonic() - started < 3.0
    assert (letters.count, letters.failed) == (1, 19)
    letters.flush(5)
    assert letters.failed == 20 and letters.delivered == {}


def test_every_refusal_of_the_codecs_has_a_bounded_reason_label() -> None:
    """The dead-letter metric's `reason` label: each codec refusal maps to a named label
    (never `other`), and the label carries no id, size or time."""
    import numpy as np

    from annstream.codec import AdCodec, EngagementCodec
    from annstream.events import AdBatch, EngagementBatch
    from annstream.schemas import frame, open_registry

    dim, now = 384, 1_764_000_000_000
    registry = open_registry()
    ads, wide = AdCodec(registry, dim, max_message_bytes=4_000), AdCodec(registry, dim + 1)
    engagements = EngagementCodec(registry, dim)
    vec = np.ones((1, dim), "float32")
    nan = vec.copy()
    nan[0, 5] = np.nan
    one = np.array([7])
    valid = ads.encode(AdBatch.upserts(one, vec, now))[0]
    cases = {
        "null_value": None,
        "not_avro": b"\x05" + valid[1:],
        "unknown_schema": frame(987_654, valid[5:]),
        "too_large": valid[:5] + bytes(4_100),
        "dimension": wide.encode(AdBatch.upserts(one, np.ones((1, dim + 1), "float32"), now))[0],
        "non_finite": ads.encode(AdBatch.upserts(one, nan, now))[0],
        "zero_vector": ads.encode(AdBatch.upserts(one, 0 * vec, now))[0],
        "negative_id": ads.encode(AdBatch.upserts(np.array([-4]), vec, now))[0],
        "event_time": ads.encode(AdBatch.upserts(one, vec, now + 10**9))[0],
    }
    for label, value in cases.items():
        _, rejected = ads.decode([value], now_ms=now, max_skew_s=600)
        assert len(rejected) == 1, label
        assert dead_letter_reason(rejected[0].reason) == label, rejected[0].reason
    truncated = valid[: len(valid) // 2]
    assert dead_letter_reason(ads.decode([truncated])[1][0].reason) == "not_avro"
    eng = EngagementBatch(
        one,
        one,
        np.zeros(1, "uint8"),
        np.full(1, -2.0, "float32"),
        np.full(1, now),
        vec,
        np.ones(1, bool),
    )
    _, rejected = engagements.decode(engagements.encode(eng), now_ms=now)
    assert dead_letter_reason(rejected[0].reason) == "weight"
    assert dead_letter_reason("something new") == "other"
