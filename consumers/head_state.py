"""The head-query state changelog: how a replica that gains an engagement partition rebuilds
the head queries of that shard before it writes for them.

One changelog partition per engagement partition (same number). Each micro-batch appends, per
partition it touched, the tracker rows of the queries it touched (npz bytes, chunked) with the
engagement offset they include in a header. Restoring replays the partition from the start up
to a barrier record this replica writes first, so the read end is known without trusting the
broker's end offsets.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from annstream.config import KafkaConfig
from annstream.errors import BrokerError
from annstream.kafka import headers_dict, make_consumer, message_error

__all__ = ["HeadStateLog", "decode_state", "encode_state"]

logger = logging.getLogger(__name__)

State = dict[str, npt.NDArray[Any]]
_OFFSET_HEADER = "annstream.engagement-offset"
_BARRIER_KEY = b"\x00barrier"
_CHUNK_ROWS = 2000


def encode_state(state: State) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **state)  # type: ignore[arg-type]
    return buf.getvalue()


def decode_state(blob: bytes) -> State:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _chunks(state: State) -> Iterator[State]:
    n = len(state["query_ids"])
    for start in range(0, max(n, 1), _CHUNK_ROWS):
        yield {k: v[start : start + _CHUNK_ROWS] for k, v in state.items()}


class HeadStateLog:
    """Append and replay head-query state per engagement partition."""

    def __init__(self, cfg: KafkaConfig, producer: Producer) -> None:
        self.cfg = cfg
        self.topic = cfg.head_state_topic
        self.producer = producer
        self._failed: list[tuple[bytes, int, Any]] = []

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._failed.append((msg.value(), msg.partition(), msg.headers()))

    def append(self, partition: int, state: State, engagement_offset: int) -> None:
        """Queue the rows of `state` for `partition`; `flush()` makes them durable."""
        headers: dict[str, str | bytes | None] = {_OFFSET_HEADER: str(engagement_offset)}
        for chunk in _chunks(state):
            self.producer.produce(
                self.topic,
                value=encode_state(chunk),
                partition=partition,
                headers=headers,
                on_delivery=self._on_delivery,
            )

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until everything appended is in the log; records whose delivery failed are
        sent again first. Raises BrokerError when not all made it: call again later."""
        failed, self._failed = self._failed, []
        for value, partition, headers in failed:
            self.producer.produce(
                self.topic,
                value=value,
                partition=partition,
                headers=headers,
                on_delivery=self._on_delivery,
            )
        left = self.producer.flush(timeout_s)
        if left or self._failed:
            raise BrokerError(
                f"{left + len(self._failed)} head-state records not yet in {self.topic} "
                f"after {timeout_s}s; the broker is unreachable or slow"
            )

    def _barrier(self, partition: int, timeout_s: float) -> int:
        """Write a barrier record and return its offset: the end of what must be replayed."""
        delivered: list[int] = []

        def on_delivery(err: Any, msg: Any) -> None:
            if err is None:
                delivered.append(int(msg.offset()))

        self.producer.produce(
            self.topic,
            key=_BARRIER_KEY,
            value=uuid.uuid4().bytes,
            partition=partition,
            on_delivery=on_delivery,
        )
        self.producer.flush(timeout_s)
        if not delivered:
            raise RuntimeError(f"could not write a barrier to {self.topic}[{partition}]")
        return delivered[0]

    def restore(self, partition: int, timeout_s: float = 60.0) -> tuple[list[State], int]:
        """Every state chunk of `partition` in order, and the highest engagement offset they
        include (-1 when the changelog has nothing for this partition)."""
        end = self._barrier(partition, timeout_s)
        consumer: Consumer = make_consumer(
            self.cfg, group_id=f"{self.cfg.group_id}.head-state-restore"
        )
        states: list[State] = []
        applied = -1
        deadline = time.monotonic() + timeout_s
        try:
            consumer.assign([TopicPartition(self.topic, partition, OFFSET_BEGINNING)])
            position = -1
            while position < end:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"restoring {self.topic}[{partition}] did not reach offset {end} "
                        f"within {timeout_s}s (at {position})"
                    )
                for m in consumer.consume(1000, 0.2):
                    if message_error(m) is not None or m.error() is not None:
                        continue
                    position = int(m.offset() or 0)
                    if m.key() == _BARRIER_KEY or position > end:
                        continue
                    states.append(decode_state(m.value() or b""))
                    offset = headers_dict(m).get(_OFFSET_HEADER)
                    if offset is not None:
                        applied = max(applied, int(offset))
        finally:
            consumer.close()
        logger.info(
            "restored %d head-state chunks of partition %d (engagement offset %d)",
            len(states),
            partition,
            applied,
        )
        return states, applied
