"""The ad consumer: reads every partition of the ad topic and turns it into index changes.

Every replica holds the whole ad index, so this consumer is not in a group: it assigns all
partitions itself, starting from the offsets of the snapshot it restored (or the beginning).
Its offsets live in the snapshot, never in Kafka commits. Invalid events go to the dead-letter
topic with the reason; the stream never stops on bad input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from annstream.codec import AdCodec
from annstream.config import KafkaConfig
from annstream.events import AdBatch
from annstream.kafka import DeadLetterPublisher, make_consumer, message_error

__all__ = ["AdPoll", "AdStream", "net_changes", "net_rows", "next_offsets"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdPoll:
    """What one poll brought: the valid events in order, how many were dead-lettered."""

    batch: AdBatch
    rejected: int
    messages: int


def net_rows(batch: AdBatch) -> tuple[np.ndarray, np.ndarray]:
    """(upsert rows, delete rows) of `batch`, in event order: the last event of each ad wins."""
    return batch.net_rows()


def net_changes(batch: AdBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(upsert ids, their vectors, delete ids): `batch.net()` as arrays (sorted by id)."""
    net = batch.net()
    return net.upsert_ids, net.upsert_vectors, net.delete_ids


def next_offsets(messages: list[Message]) -> dict[int, int]:
    """Per partition, the offset after the last of `messages` (what a restart resumes from)."""
    return {m.partition() or 0: (m.offset() or 0) + 1 for m in messages}


class AdStream:
    """All partitions of the ad topic, decoded and validated a whole batch at a time."""

    def __init__(
        self,
        cfg: KafkaConfig,
        codec: AdCodec,
        dead_letters: DeadLetterPublisher,
        offsets: dict[int, int] | None = None,
        consumer: Consumer | None = None,
    ) -> None:
        self.topic = cfg.ad_topic
        self.codec = codec
        self.dead_letters = dead_letters
        self.consumer = consumer or make_consumer(
            cfg, group_id=f"{cfg.group_id}.ads", **{"enable.partition.eof": False}
        )
        self.offsets: dict[int, int] = dict(offsets or {})
        self._assign()

    def _assign(self) -> None:
        meta = self.consumer.list_topics(self.topic, timeout=10)
        topic = meta.topics.get(self.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise RuntimeError(
                f"ad topic {self.topic!r} does not exist on the broker; create it "
                "(annstream broker creates it) or fix kafka.ad_topic"
            )
        parts = sorted(topic.partitions)
        self.consumer.assign(
            [TopicPartition(self.topic, p, self.offsets.get(p, OFFSET_BEGINNING)) for p in parts]
        )
        logger.info("ad stream assigned %s partitions %s at %s", self.topic, parts, self.offsets)

    def poll(self, max_messages: int = 5000, timeout_s: float = 0.05) -> AdPoll:
        """Fetch up to `max_messages`, decode them as one batch, dead-letter the bad ones."""
        messages = self.consumer.consume(max_messages, timeout_s)
        good = [m for m in messages if m.error() is None]
        if len(good) != len(messages):
            for m in messages:
                err = message_error(m)
                if err is not None:
                    logger.warning("ad consumer error: %s", err)
        batch, rejected = self.codec.decode([m.value() for m in good])
        if rejected:
            self.dead_letters.publish(good, rejected)
        self.offsets.update(next_offsets(good))
        return AdPoll(batch, len(rejected), len(good))

    def close(self) -> None:
        self.consumer.close()
