"""Kafka clients with annstream's defaults: user settings win, unknown annstream keys are refused.

Defaults are chosen for at-least-once delivery (offsets stored or committed only after the
results they cover are stored) and for the embedded Tansu broker's timing (short session
timeout, short fetch wait); production settings (SASL/SSL, ...) come from `KafkaConfig.client`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer

from annstream.config import KafkaConfig
from annstream.events import Rejection

__all__ = [
    "DeadLetterPublisher",
    "headers_dict",
    "message_error",
    "consumer_config",
    "make_consumer",
    "make_producer",
    "producer_config",
]

logger = logging.getLogger(__name__)

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
    "compression.type": "lz4",
    "log_level": 4,
}


def consumer_config(
    cfg: KafkaConfig, group_id: str | None = None, **overrides: Any
) -> dict[str, Any]:
    """The consumer settings: defaults, then cfg.client, then `overrides` (dots as `_`)."""
    conf = {
        **_CONSUMER_DEFAULTS,
        "bootstrap.servers": cfg.bootstrap_servers,
        "group.id": group_id or cfg.group_id,
        **cfg.client,
    }
    conf.update({k.replace("_", "."): v for k, v in overrides.items()})
    return conf


def producer_config(cfg: KafkaConfig, **overrides: Any) -> dict[str, Any]:
    conf = {**_PRODUCER_DEFAULTS, "bootstrap.servers": cfg.bootstrap_servers, **cfg.client}
    conf.update({k.replace("_", "."): v for k, v in overrides.items()})
    return conf


def make_consumer(cfg: KafkaConfig, group_id: str | None = None, **overrides: Any) -> Consumer:
    return Consumer(consumer_config(cfg, group_id, **overrides))


def make_producer(cfg: KafkaConfig, **overrides: Any) -> Producer:
    return Producer(producer_config(cfg, **overrides))


class DeadLetterPublisher:
    """Sends refused messages to the dead-letter topic with the original bytes and the reason.

    Headers: `annstream.reason`, `annstream.source` (topic/partition/offset), so an operator can
    find, fix and replay them.
    """

    def __init__(self, producer: Producer, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        self.count = 0

    def publish(self, messages: Sequence[Message], rejected: Sequence[Rejection]) -> None:
        for r in rejected:
            m = messages[r.index]
            self.send(m.value(), r.reason, m.topic(), m.partition(), m.offset(), m.key())

    def send(
        self,
        value: bytes | None,
        reason: str,
        topic: str | None,
        partition: int | None,
        offset: int | None,
        key: bytes | str | None = None,
    ) -> None:
        headers: dict[str, str | bytes | None] = {
            "annstream.reason": reason.encode(),
            "annstream.source": f"{topic}/{partition}/{offset}".encode(),
        }
        self.producer.produce(self.topic, value=value, key=key, headers=headers)
        self.count += 1
        logger.warning("dead-lettered %s/%s/%s: %s", topic, partition, offset, reason)

    def flush(self, timeout_s: float = 10.0) -> int:
        """Wait for delivery; returns the number of messages still queued."""
        return int(self.producer.flush(timeout_s))


def message_error(message: Message) -> str | None:
    """The error text of a consumed message, or None; partition EOF is not an error."""
    err = message.error()
    if err is None or err.code() == KafkaError._PARTITION_EOF:
        return None
    return str(err)


def headers_dict(message: Message) -> Mapping[str, bytes]:
    raw: list[tuple[str, bytes]] = list(message.headers() or [])  # type: ignore[arg-type]
    return {k: v or b"" for k, v in raw}
