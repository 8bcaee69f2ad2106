"""The ad consumer: reads every partition of the ad topic and turns it into index changes.

Every replica holds the whole ad index, so this consumer is not in a group: it assigns all
partitions itself, starting from the offsets of the snapshot it restored (or the beginning).
Its offsets live in the snapshot, never in Kafka commits. Invalid events (including events
more than `kafka.max_event_skew_s` ahead of this consumer's clock) go to the dead-letter topic
with the reason; the stream never stops on bad input. How far dead-lettering got is committed
per partition in the group `<group_id>.ads.dead-letters`, so a restart that replays the topic
from an older snapshot does not dead-letter the same records again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition

from annstream.codec import AdCodec
from annstream.config import KafkaConfig
from annstream.events import AdBatch, Rejection
from annstream.kafka import DeadLetterMarks, DeadLetterPublisher, make_consumer, message_error

__all__ = ["AdPoll", "AdStream", "net_changes", "net_rows", "next_offsets"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdPoll:
    """What one poll brought: the valid events in order, how many were dead-lettered, and how
    many were refused again after a replay but not sent (dead-lettered before)."""

    batch: AdBatch
    rejected: int
    messages: int
    already_dead_lettered: int = 0


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
        marks: DeadLetterMarks | None = None,
    ) -> None:
        self.topic = cfg.ad_topic
        self.codec = codec
        self.dead_letters = dead_letters
        self.max_event_skew_s = cfg.max_event_skew_s
        self.consumer = consumer or make_consumer(
            cfg, group_id=f"{cfg.group_id}.ads", **{"enable.partition.eof": False}
        )
        self.marks = marks or DeadLetterMarks(
            make_consumer(cfg, group_id=f"{cfg.group_id}.ads.dead-letters"), self.topic
        )
        self.offsets: dict[int, int] = dict(offsets or {})
        self.offsets_at_start = dict(self.offsets)
        self.start_ends: dict[int, tuple[int, int]] | None = None
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
        self.start_ends = self._watermarks(parts)
        marks = self.marks.load(parts)
        logger.info(
            "ad stream assigned %s partitions %s at %s (dead-lettered up to %s)",
            self.topic,
            parts,
            self.offsets,
            marks,
        )

    def _watermarks(self, parts: list[int]) -> dict[int, tuple[int, int]] | None:
        """(low, high) offsets of every partition, asked of the broker once (None if it did
        not answer: `caught_up()` then stays False)."""
        out: dict[int, tuple[int, int]] = {}
        try:
            for p in parts:
                low, high = self.consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p), timeout=5.0, cached=False
                )
                out[p] = (int(low), int(high))
        except KafkaException as exc:
            logger.warning("end offsets of %s not read (%s): training waits", self.topic, exc)
            return None
        return out

    @property
    def backlog_at_start(self) -> int | None:
        """Messages the topic held past this stream's start positions when it started (None:
        the broker did not say)."""
        if self.start_ends is None:
            return None
        return sum(
            max(0, high - self.offsets_at_start.get(p, low))
            for p, (low, high) in self.start_ends.items()
        )

    def caught_up(self) -> bool:
        """Every partition is read up to its end offset at start and to the high watermark
        of its last fetch (local, no broker call): the backlog this stream started with is in."""
        if self.start_ends is None:
            return False
        for p, (low, high) in self.start_ends.items():
            pos = self.offsets.get(p, low)
            _, fetched = self.consumer.get_watermark_offsets(
                TopicPartition(self.topic, p), cached=True
            )
            if pos < max(high, fetched):
                return False
        return True

    def poll(self, max_messages: int = 5000, timeout_s: float = 0.05) -> AdPoll:
        """Fetch up to `max_messages`, decode them as one batch, dead-letter the bad ones.

        Never raises on bad input or a failed dead letter: the offsets always move on.
        """
        messages = self.consumer.consume(max_messages, timeout_s)
        good = [m for m in messages if m.error() is None]
        if len(good) != len(messages):
            for m in messages:
                err = message_error(m)
                if err is not None:
                    logger.warning(
                        "ad consumer error: %s",
                        err,
                        extra={
                            "topic": m.topic(),
                            "partition": m.partition(),
                            "offset": m.offset(),
                            "reason": err,
                        },
                    )
        batch, rejected = self.codec.decode(
            [m.value() for m in good],
            now_ms=int(time.time() * 1000),
            max_skew_s=self.max_event_skew_s,
        )
        fresh: list[Rejection] = []
        again: list[Rejection] = []
        for r in rejected:
            m = good[r.index]
            (again if self.marks.seen(m.partition() or 0, m.offset() or 0) else fresh).append(r)
        if again:
            logger.info(
                "not dead-lettering %d replayed records of %s again (sent before)",
                len(again),
                self.topic,
                extra={
                    "topic": self.topic,
                    "records": [
                        f"{good[r.index].partition()}/{good[r.index].offset()}" for r in again
                    ],
                },
            )
        if fresh:
            self.dead_letters.publish(good, fresh)
        self.marks.advance(self.dead_letters.delivered_for(self.topic))
        self.offsets.update(next_offsets(good))
        return AdPoll(batch, len(fresh), len(good), len(again))

    def close(self) -> None:
        """Commit the dead-letter marks delivered so far, then close both clients."""
        try:
            self.marks.advance(self.dead_letters.delivered_for(self.topic), force=True)
        finally:
            self.marks.close()
            self.consumer.close()
