"""The engagement consumer: a consumer-group member, so each replica owns a shard of queries.

The topic is keyed by query id, so a partition is a shard of head queries. Offsets are
committed only by `commit()`, which the service's Checkpoint calls once the store and the
head-state changelog hold what the events led to. Rebalances are forwarded to the owner
through `PartitionListener`; on a revoke the owner is told while the partitions are still
assigned, so it can flush and commit what is durable first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from confluent_kafka import OFFSET_INVALID, Consumer, KafkaException, Message, TopicPartition

from annstream.codec import EngagementCodec
from annstream.config import KafkaConfig
from annstream.errors import BrokerError
from annstream.events import EngagementBatch
from annstream.kafka import DeadLetterPublisher, make_consumer, message_error

__all__ = ["EngagementPoll", "EngagementStream", "PartitionListener"]

logger = logging.getLogger(__name__)


class PartitionListener(Protocol):
    def partitions_assigned(self, partitions: list[int]) -> dict[int, int]:
        """Prepare gained partitions; return the offset to resume from where it is not the
        committed one (e.g. the head-state changelog already includes later events)."""
        ...

    def partitions_revoked(self, partitions: list[int], lost: bool) -> None:
        """Called before the partitions are given up (`lost`: already taken, commit nothing)."""
        ...


@dataclass(frozen=True)
class EngagementPoll:
    """Valid events with the partition each came from, and the next offset per partition."""

    batch: EngagementBatch
    partitions: np.ndarray  # int32[n]
    offsets: dict[int, int]
    rejected: int
    messages: int


class EngagementStream:
    """Group consumer of the engagement topic with manual, store-gated commits."""

    def __init__(
        self,
        cfg: KafkaConfig,
        codec: EngagementCodec,
        dead_letters: DeadLetterPublisher,
        listener: PartitionListener,
        consumer: Consumer | None = None,
    ) -> None:
        self.topic = cfg.engagement_topic
        self.codec = codec
        self.dead_letters = dead_letters
        self.listener = listener
        self.max_event_skew_s = cfg.max_event_skew_s
        self.consumer = consumer or make_consumer(cfg, group_id=cfg.group_id)
        self.assigned: set[int] = set()
        self.paused = False
        self.consumer.subscribe(
            [self.topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        got = sorted(p.partition for p in partitions)
        logger.info("engagement partitions assigned: %s", got)
        start = self.listener.partitions_assigned(got)
        consumer.incremental_assign(
            [TopicPartition(self.topic, p, start.get(p, OFFSET_INVALID)) for p in got]
        )
        if self.paused:
            consumer.pause([TopicPartition(self.topic, p) for p in got])
        self.assigned.update(got)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = sorted(p.partition for p in partitions)
        logger.info("engagement partitions revoked: %s", gone)
        try:
            self.listener.partitions_revoked(gone, lost=False)
        finally:
            self.assigned.difference_update(gone)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = sorted(p.partition for p in partitions)
        self.assigned.difference_update(gone)
        logger.warning("engagement partitions lost: %s (nothing committed for them)", gone)
        self.listener.partitions_revoked(gone, lost=True)

    def poll(self, max_messages: int = 5000, timeout_s: float = 0.05) -> EngagementPoll:
        """Fetch up to `max_messages`, decode them as one batch, dead-letter the bad ones
        (including events more than kafka.max_event_skew_s ahead of this consumer's clock).

        Never raises on bad input or a failed dead letter: the offsets always move on.
        """
        messages = self.consumer.consume(max_messages, timeout_s)
        good: list[Message] = []
        for m in messages:
            err = message_error(m)
            if err is None and m.error() is None:
                good.append(m)
            elif err is not None:
                logger.warning(
                    "engagement consumer error: %s",
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
        if rejected:
            self.dead_letters.publish(good, rejected)
        bad = {r.index for r in rejected}
        partitions = np.fromiter(
            (m.partition() for i, m in enumerate(good) if i not in bad), "int32", len(batch)
        )
        offsets: dict[int, int] = {}
        for m in good:
            offsets[int(m.partition() or 0)] = int(m.offset() or 0) + 1
        return EngagementPoll(batch, partitions, offsets, len(rejected), len(good))

    def commit(self, offsets: dict[int, int]) -> None:
        """Synchronously commit `offsets` (partition -> next offset) of the partitions still
        assigned (others belong to another member now: skipped). BrokerError when the commit
        failed (broker unreachable, membership lost while the process was stopped)."""
        owned = [
            TopicPartition(self.topic, p, o)
            for p, o in sorted(offsets.items())
            if p in self.assigned
        ]
        if not owned:
            return
        try:
            done = self.consumer.commit(offsets=owned, asynchronous=False)
        except KafkaException as exc:
            raise BrokerError(f"engagement offset commit of {self.topic} failed: {exc}") from exc
        failed = [f"{tp.partition}: {tp.error}" for tp in done or [] if tp.error is not None]
        if failed:
            raise BrokerError(f"engagement offset commit of {self.topic} failed for {failed}")

    def committed(self, partitions: Sequence[int]) -> dict[int, int]:
        tps = self.consumer.committed([TopicPartition(self.topic, p) for p in partitions], 10)
        return {tp.partition: tp.offset for tp in tps}

    def pause(self) -> None:
        """Stop fetching from every owned partition, and from those gained until `resume()`."""
        self.paused = True
        self.consumer.pause([TopicPartition(self.topic, p) for p in sorted(self.assigned)])

    def keep_alive(self, timeout_s: float) -> None:
        """Serve heartbeats and rebalance callbacks while paused; a message that still comes
        (fetched before the pause) is not processed: its partition is rewound to it."""
        first: dict[int, int] = {}
        for m in self.consumer.consume(10, timeout_s):
            if m.error() is None and m.partition() is not None:
                first.setdefault(int(m.partition() or 0), int(m.offset() or 0))
        for p, offset in first.items():
            if p in self.assigned:
                logger.warning("engagement partition %d delivered while paused: rewound", p)
                self.consumer.seek(TopicPartition(self.topic, p, offset))

    def resume(self) -> None:
        self.paused = False
        self.consumer.resume([TopicPartition(self.topic, p) for p in sorted(self.assigned)])

    def close(self) -> None:
        self.consumer.close()
