"""Encode and send event batches: keys, timestamps, rate limit, delivery accounting, progress.

Keys: ads are keyed by ad id and engagements by query id, as the id's 8-byte big-endian
two's-complement bytes (`struct.pack(">q", id)`), so every event of one ad or query lands in
one partition and stays in order there (the producer is idempotent). The Kafka message
timestamp is the event time.

Event times: kept as the batches carry them (files with a time column, replays), or, with
`stamp=True`, stamped when each event is sent: a rate-limited send takes the events a few at
a time as the rate allows and stamps and encodes just those, so the event time is the send
time (a batch stamped when it was read would age by its length / rate before its last event
leaves, and freshness measured from it would count that wait).

Delivery accounting: each `send()` call is one ticket; a ticket's `on_confirmed` runs only once
the broker confirmed every message of it and of every earlier ticket, which is what a
checkpoint may record without leaving gaps.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
from confluent_kafka import KafkaError, Message, Producer

from annstream.codec import AdCodec, EngagementCodec
from annstream.events import AdBatch, EngagementBatch

__all__ = [
    "Progress",
    "PublishStats",
    "Publisher",
    "TokenBucket",
    "batch_keys",
    "id_keys",
    "publish_batches",
    "send_batch",
]

logger = logging.getLogger(__name__)

_STAMP_WINDOW_S = 0.005


def id_keys(ids: np.ndarray) -> list[bytes]:
    """Each int64 id as its 8-byte big-endian key."""
    raw = np.ascontiguousarray(ids, dtype=">i8").tobytes()
    return [raw[i : i + 8] for i in range(0, len(raw), 8)]


def batch_keys(batch: AdBatch | EngagementBatch) -> list[bytes]:
    """Ads by ad id, engagements by query id."""
    return id_keys(batch.ad_ids if isinstance(batch, AdBatch) else batch.query_ids)


class TokenBucket:
    """At most `rate` events per second on average, bursts up to `burst`; rate 0 = unlimited."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate < 0:
            raise ValueError(f"rate must be >= 0 events/s, got {rate}")
        self.rate = rate
        self.burst = max(1.0, burst if burst is not None else rate / 10)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._last = clock()

    def grant(self, wanted: int, minimum: int = 1) -> int:
        """Wait until at least `minimum` tokens (1 by default; never more than `wanted` or the
        burst) are there and take up to `wanted` of them."""
        if self.rate == 0 or wanted <= 0:
            return wanted
        least = float(max(1, min(minimum, wanted, int(self.burst))))
        self._refill()
        if self._tokens < least:
            self._sleep((least - self._tokens) / self.rate)
            self._refill()
            self._tokens = max(self._tokens, least)
        take = min(wanted, int(self._tokens))
        self._tokens -= take
        return take

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now


class Progress:
    """A one-line progress bar on a TTY (or when forced), else a log line every `log_every_s`."""

    def __init__(
        self,
        total: int | None,
        label: str,
        enabled: bool | None = None,
        stream: IO[str] | None = None,
        log_every_s: float = 10.0,
    ) -> None:
        self.stream = stream or sys.stderr
        self.bar = self.stream.isatty() if enabled is None else enabled
        self.total = total
        self.label = label
        self.log_every_s = log_every_s
        self.done = 0
        self._start = time.monotonic()
        self._shown = 0.0 if self.bar else self._start

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._shown >= (0.2 if self.bar else self.log_every_s):
            self._shown = now
            self._show(now)

    def _line(self, now: float) -> str:
        rate = self.done / max(now - self._start, 1e-9)
        if self.total:
            frac = min(1.0, self.done / self.total)
            filled = int(30 * frac)
            return (
                f"{self.label} [{'#' * filled}{'.' * (30 - filled)}] "
                f"{self.done}/{self.total} {frac:4.0%} {rate:,.0f} ev/s"
            )
        return f"{self.label} {self.done} events {rate:,.0f} ev/s"

    def _show(self, now: float) -> None:
        if self.bar:
            self.stream.write("\r" + self._line(now))
            self.stream.flush()
        else:
            logger.info("%s", self._line(now))

    def close(self) -> None:
        self._show(time.monotonic())
        if self.bar:
            self.stream.write("\n")
            self.stream.flush()


@dataclass
class PublishStats:
    """What a producer run did; `failed` deliveries make the command exit non-zero."""

    sent: int = 0
    delivered: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    first_error: str = ""

    @property
    def rate(self) -> float:
        return self.delivered / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self, topic: str) -> dict[str, Any]:
        """The `--json` summary of `annstream produce` and `replay`."""
        return {
            "topic": topic,
            "sent": self.sent,
            "delivered": self.delivered,
            "failed": self.failed,
            "unconfirmed": self.sent - self.delivered - self.failed,
            "events_per_s": round(self.rate, 1),
            "elapsed_s": round(self.elapsed_s, 3),
            "first_error": self.first_error or None,
        }

    def summary(self, topic: str) -> str:
        text = (
            f"{self.delivered} of {self.sent} events delivered to {topic} in "
            f"{self.elapsed_s:.1f}s ({self.rate:,.0f} events/s), {self.failed} failed"
        )
        return text + (f"; first error: {self.first_error}" if self.failed else "")


class _Ticket:
    __slots__ = ("failed", "on_confirmed", "outstanding")

    def __init__(self, outstanding: int, on_confirmed: Callable[[], None] | None) -> None:
        self.outstanding = outstanding
        self.failed = 0
        self.on_confirmed = on_confirmed


class Publisher:
    """Produces keyed, timestamped messages to one topic with a rate cap and delivery accounting."""

    def __init__(
        self,
        producer: Producer,
        topic: str,
        *,
        rate: float = 0.0,
        progress: Progress | None = None,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.bucket = TokenBucket(rate)
        self.progress = progress
        self.stats = PublishStats()
        self._tickets: deque[_Ticket] = deque()
        self._start = time.monotonic()

    def _on_delivery(self, ticket: _Ticket) -> Callable[[KafkaError | None, Message], None]:
        def done(err: KafkaError | None, msg: Message) -> None:
            ticket.outstanding -= 1
            if err is not None:
                ticket.failed += 1
                self.stats.failed += 1
                if not self.stats.first_error:
                    self.stats.first_error = str(err)
                    logger.error("delivery to %s failed: %s", self.topic, err)
            else:
                self.stats.delivered += 1
                if self.progress:
                    self.progress.update(1)

        return done

    def _settle(self) -> None:
        """Run `on_confirmed` of leading tickets fully delivered; stop at the first failure."""
        while self._tickets and self._tickets[0].outstanding == 0:
            if self._tickets[0].failed:
                return
            ticket = self._tickets.popleft()
            if ticket.on_confirmed is not None:
                ticket.on_confirmed()

    def poll(self, timeout_s: float = 0.0) -> None:
        self.producer.poll(timeout_s)
        self._settle()

    def reserve(self, wanted: int, minimum: int = 1) -> int:
        """Wait for the rate limit and take up to `wanted` sends (at least `minimum` of them,
        when `wanted` and the burst allow); pass them to `send(..., paced=False)`."""
        return self.bucket.grant(wanted, minimum)

    def send(
        self,
        keys: Sequence[bytes | None],
        values: Sequence[bytes | None],
        timestamps_ms: np.ndarray,
        on_confirmed: Callable[[], None] | None = None,
        *,
        paced: bool = True,
    ) -> None:
        """Queue messages in order; `on_confirmed` runs once they and all earlier ones landed.
        `paced=False`: the caller already took these sends with `reserve`."""
        n = len(values)
        if len(keys) != n or len(timestamps_ms) != n:
            raise ValueError(
                f"keys ({len(keys)}), values ({n}) and timestamps ({len(timestamps_ms)}) "
                "must have the same length"
            )
        ticket = _Ticket(n, on_confirmed)
        self._tickets.append(ticket)
        callback = self._on_delivery(ticket)
        stamps = np.asarray(timestamps_ms, dtype="int64").tolist()
        i = 0
        while i < n:
            first, end = i, i + (self.bucket.grant(n - i) if paced else n - i)
            while i < end:
                try:
                    self.producer.produce(
                        self.topic,
                        value=values[i],
                        key=keys[i],
                        timestamp=stamps[i],
                        on_delivery=callback,
                    )
                except BufferError:
                    self.poll(0.05)
                    continue
                i += 1
            self.stats.sent += end - first
            self.poll(0)
        self._settle()

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait for outstanding deliveries; returns how many are still unconfirmed."""
        left = int(self.producer.flush(timeout_s))
        self._settle()
        self.stats.elapsed_s = time.monotonic() - self._start
        return left

    @property
    def unconfirmed(self) -> int:
        return sum(t.outstanding for t in self._tickets)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def send_batch(
    publisher: Publisher,
    codec: AdCodec | EngagementCodec,
    batch: AdBatch | EngagementBatch,
    *,
    stamp: bool = False,
    clock: Callable[[], int] = _now_ms,
) -> None:
    """Encode and send one batch in order; `stamp`: each event's time is its send time."""
    if not stamp:
        values: list[Any] = codec.encode(batch)  # type: ignore[arg-type]
        publisher.send(batch_keys(batch), values, batch.event_time_ms)
        return
    i, n = 0, len(batch)
    # each chunk is stamped after its wait and sent at once; waiting for _STAMP_WINDOW_S worth
    # of sends delays one by at most that and keeps encoding batched (one event a call: 3x)
    minimum = max(1, int(publisher.bucket.rate * _STAMP_WINDOW_S))
    while i < n:
        m = publisher.reserve(n - i, minimum)
        part = dataclasses.replace(
            batch.take(np.arange(i, i + m)), event_time_ms=np.full(m, clock(), "int64")
        )
        values = codec.encode(part)  # type: ignore[arg-type]
        publisher.send(batch_keys(part), values, part.event_time_ms, paced=False)
        i += m


def publish_batches(
    publisher: Publisher,
    codec: AdCodec | EngagementCodec,
    batches: Iterable[AdBatch] | Iterable[EngagementBatch],
    *,
    limit: int | None = None,
    stamp: bool = False,
) -> PublishStats:
    """Encode and send every batch in order (keyed, event time as timestamp), then flush.
    `stamp`: event times are the send times, not the batches' own (see the module doc)."""
    sent = 0
    try:
        for batch in batches:
            if limit is not None and sent + len(batch) > limit:
                batch = batch.take(np.arange(max(0, limit - sent)))
            if not len(batch):
                break
            send_batch(publisher, codec, batch, stamp=stamp)
            sent += len(batch)
    finally:
        publisher.flush()
        if publisher.progress:
            publisher.progress.close()
    return publisher.stats
