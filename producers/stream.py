"""A mixed ad + engagement stream published from one background thread, each lane at its rate.

Lanes are interleaved by their `share` (events per unit of stream time): the next batch comes
from the lane furthest behind its share, so ads spread evenly among engagements whether or not
the publishers are rate-limited. Batches are drawn lazily, just before they are sent; a lane
with `stamp` set stamps each event when it is sent (see producers.publish), so freshness
measured from event times does not count a rate-limited batch's wait.

Also the workloads of the demo and the load benchmarks: ad churn over a fixed catalogue (the
index keeps its size however long the stream runs) and a warm-up that makes every query of a
synthetic population a head query.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from annstream.codec import AdCodec, EngagementCodec
from annstream.events import ENGAGEMENT_TYPES, NO_ID, AdBatch, EngagementBatch
from producers.publish import Publisher, send_batch
from producers.sources import synthetic_ads, synthetic_engagements

__all__ = ["Lane", "MixedStream", "ad_churn", "head_warmup"]

logger = logging.getLogger(__name__)

_CLICK = ENGAGEMENT_TYPES.index("CLICK")


@dataclass
class Lane:
    """One topic's batches, its publisher (which holds the rate limit) and its codec;
    `stamp`: event times are the send times."""

    publisher: Publisher
    codec: AdCodec | EngagementCodec
    batches: Iterator[AdBatch | EngagementBatch]
    share: float = 1.0
    sent: int = 0
    stamp: bool = False

    def __post_init__(self) -> None:
        if self.share <= 0:
            raise ValueError(f"a lane's share must be positive, got {self.share}")

    def send_next(self) -> bool:
        """Send one batch; False once the lane is exhausted."""
        batch = next(self.batches, None)
        if batch is None:
            return False
        send_batch(self.publisher, self.codec, batch, stamp=self.stamp)
        self.sent += len(batch)
        return True


class MixedStream(threading.Thread):
    """Publishes its lanes until they are exhausted or `stop` is set, then flushes.

    An exception in the thread is kept in `error` for the caller to raise.
    """

    def __init__(
        self,
        lanes: Mapping[str, Lane],
        stop: threading.Event | None = None,
        name: str = "mixed-stream",
    ) -> None:
        super().__init__(name=name, daemon=True)
        if not lanes:
            raise ValueError("a mixed stream needs at least one lane")
        self.lanes = dict(lanes)
        self.stop = stop or threading.Event()
        self.error: BaseException | None = None
        self.started_at = 0.0
        self.finished_at = 0.0

    def sent(self, lane: str) -> int:
        return self.lanes[lane].sent

    def delivered(self, lane: str) -> int:
        return self.lanes[lane].publisher.stats.delivered

    def run(self) -> None:
        self.started_at = time.monotonic()
        try:
            live = list(self.lanes.values())
            while live and not self.stop.is_set():
                lane = min(live, key=lambda ln: ln.sent / ln.share)
                if not lane.send_next():
                    live.remove(lane)
            for lane in self.lanes.values():
                left = lane.publisher.flush()
                if left:
                    logger.warning("%d messages to %s unconfirmed", left, lane.publisher.topic)
        except BaseException as exc:  # surfaced by the caller
            self.error = exc
        finally:
            self.finished_at = time.monotonic()


def ad_churn(
    catalogue: int,
    n: int | None = None,
    *,
    seed: int = 0,
    pool: np.ndarray | None = None,
    dim: int | None = None,
    queries: int = 10_000,
    batch_size: int = 100,
    delete_every: int = 10,
) -> Iterator[AdBatch]:
    """`n` ad events (endless when None) over the ids 1..`catalogue` of a catalogue published
    by `synthetic_ads(catalogue, seed=seed, ...)`: re-embeddings with vectors the catalogue
    does not use, and one delete in `delete_every` (0 = none) of a random catalogue id, which
    a later re-embedding brings back. The index size stays bounded by the catalogue."""
    if catalogue <= 0:
        raise ValueError(f"catalogue must be positive, got {catalogue}")
    if delete_every < 0 or delete_every == 1:
        raise ValueError(f"delete_every must be 0 (no deletes) or >= 2, got {delete_every}")
    total = n if n is not None else 1 << 62
    upserts = total - (total // delete_every if delete_every else 0)
    rng = np.random.default_rng([seed, 3])
    # the first `catalogue` vectors of this sequence are the catalogue's own: skip them
    fresh = synthetic_ads(
        upserts,
        seed=seed,
        pool=pool,
        dim=dim,
        queries=queries,
        batch_size=batch_size,
        id_start=catalogue + 1,
        row_start=catalogue,
    )
    sent = 0
    for batch in fresh:
        ids = 1 + (batch.ad_ids - 1) % catalogue
        yield dataclasses.replace(batch, ad_ids=ids.astype("int64"))
        sent += len(batch)
        if delete_every and sent < total:
            m = min(max(1, len(batch) // (delete_every - 1)), total - sent)
            dead = rng.integers(1, catalogue + 1, m)
            yield AdBatch.deletes(dead, batch.vectors.shape[1], batch.event_time_ms[:m])
            sent += m


def head_warmup(
    queries: int,
    weight: float,
    *,
    seed: int = 0,
    pool: np.ndarray | None = None,
    dim: int | None = None,
    batch_size: int = 10_000,
    cover: int = 12,
) -> Iterator[EngagementBatch]:
    """One click of `weight` for each query of the population `synthetic_engagements(...,
    queries=queries, seed=seed)` draws from (same ids and vectors), so with `weight` at the
    entry score every query becomes a head query. The population is found by drawing
    `cover` uniform events per query (about `queries * exp(-cover)` are missed)."""
    if queries <= 0 or weight <= 0:
        raise ValueError(f"need queries > 0 and weight > 0, got {queries} and {weight}")
    draws = synthetic_engagements(
        queries * cover,
        queries=queries,
        zipf_s=1e-9,
        seed=seed,
        pool=pool,
        dim=dim,
        batch_size=max(batch_size, queries),
        ads=0,
    )
    ids: list[np.ndarray] = []
    vectors: list[np.ndarray] = []
    seen = np.empty(0, "int64")
    for batch in draws:
        qids, first = np.unique(batch.query_ids, return_index=True)
        new = ~np.isin(qids, seen)
        ids.append(qids[new])
        vectors.append(batch.vectors[first[new]])
        seen = np.union1d(seen, qids[new])
        if len(seen) == queries:
            break
    all_ids = np.concatenate(ids)
    all_vectors = np.concatenate(vectors)
    for start in range(0, len(all_ids), batch_size):
        rows = slice(start, start + batch_size)
        m = len(all_ids[rows])
        yield EngagementBatch(
            query_ids=np.ascontiguousarray(all_ids[rows]),
            item_ids=np.full(m, NO_ID, "int64"),
            event_types=np.full(m, _CLICK, "uint8"),
            weights=np.full(m, weight, "float32"),
            event_time_ms=np.full(m, time.time_ns() // 1_000_000, "int64"),
            vectors=np.ascontiguousarray(all_vectors[rows]),
            has_vector=np.ones(m, bool),
        )
