"""`annstream bench ingest`: ads from Kafka into the live index vs a plain consume of the topic.

One run: start an embedded broker (or use `--bootstrap`), produce `--ads` ad upserts (GloVe 6B
50-d at `--dim 50`, clustered Gaussian-mixture vectors at any other dimension), then read the
whole topic in each of these passes, each with its own consumer group id and all partitions
assigned from the beginning:
- raw: confluent-kafka `consume(batch)` with every value touched, nothing else (the baseline),
  once before and once after the ingest pass, averaged (other load on the machine drifts);
- ingest: `AdStream.poll` (Avro decode, validation) + `AdBatch.net()` + one `LiveIvfIndex.apply`
  (vectors prepared and assigned once) per micro-batch, the service's ad path, on an index
  trained beforehand on a sample; `us_per_event` splits it into consume, decode and index.
Each pass's clock starts when its first messages arrive (that batch is not counted), so the
ratio compares steady states rather than connection set-up. Also measured: one bulk upsert of
every vector, and the memory per indexed ad after `compact()`, both as the index estimates it
(`memory_bytes()`) and as the process gets it back when the index is dropped.
`index_bound_ratio` = bulk add rate / raw consume rate: the best `ratio` an ingest could reach
if consuming and decoding were free, since every event still costs one IVF add.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import time
import uuid
from typing import Any

import faiss
import numpy as np

from annstream.broker import create_topics, running_broker
from annstream.codec import AdCodec
from annstream.config import IndexConfig, KafkaConfig
from annstream.errors import BrokerError
from annstream.heap import rss_bytes, trim_heap
from annstream.index import LiveIvfIndex
from annstream.kafka import DeadLetterPublisher, make_consumer, make_producer
from annstream.schemas import LocalSchemaRegistry
from consumers.ads import AdStream
from producers.publish import Publisher, publish_batches
from producers.sources import MIXTURE_VERSION, synthetic_ads

__all__ = ["HELP", "add_arguments", "run"]

logger = logging.getLogger(__name__)

HELP = "ad ingest (decode + validate + index upsert) vs plain Kafka consume of the same topic"

RATIO_GOAL = 0.5
BYTES_GOAL_FACTOR = 1.3
_HANG_GUARD_S = 300.0
_POLL_TIMEOUT_S = 0.05


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ads", type=int, default=100_000, help="ad events (default 100000)")
    parser.add_argument(
        "--dim",
        type=int,
        default=64,
        help="embedding dimension: 50 = GloVe, any other = clustered synthetic (default 64)",
    )
    parser.add_argument("--partitions", type=int, default=3, help="ad topic partitions")
    parser.add_argument(
        "--batch", type=int, default=5_000, help="messages per poll = micro-batch (default 5000)"
    )
    parser.add_argument("--nlist", type=int, default=1024, help="IVF lists (default 1024)")
    parser.add_argument(
        "--train", type=int, default=40_000, help="training sample size (default 40000)"
    )
    parser.add_argument("--metric", default="cosine", choices=("cosine", "ip", "l2"))
    parser.add_argument(
        "--faiss-threads",
        type=int,
        default=0,
        help="OpenMP threads for Faiss (default 0: leave Faiss's own setting)",
    )
    parser.add_argument(
        "--assign-nlists",
        default="",
        help="also time the coarse assignment per ad (one thread) at these nlists, comma-"
        "separated: flat (exact, what the index uses), HNSW and two-level quantizers, with "
        "their agreement with the exact list (e.g. 1024,16384; default: skip)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bootstrap", default="", help="use this broker instead of starting an embedded one"
    )


def _check(args: argparse.Namespace) -> None:
    for name in ("ads", "dim", "partitions", "batch", "nlist", "train"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name} must be positive, got {getattr(args, name)}")
    if args.ads <= args.batch:
        raise SystemExit(f"--ads ({args.ads}) must exceed --batch ({args.batch}) to time a pass")
    if min(args.train, args.ads) < args.nlist:
        raise SystemExit(f"need at least --nlist ({args.nlist}) ads and training vectors")


class _Clock:
    """Counts events from the first non-empty batch on; that batch only starts the clock."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.seen = 0
        self.counted = 0
        self.start: float | None = None
        self.deadline = time.monotonic() + _HANG_GUARD_S

    def done(self) -> bool:
        if time.monotonic() > self.deadline:
            raise BrokerError(f"only {self.seen} of {self.total} ad events arrived")
        return self.seen >= self.total

    def add(self, n: int) -> None:
        self.seen += n
        if self.start is None:
            if n:
                self.start = time.perf_counter()
        else:
            self.counted += n

    def rate(self) -> float:
        elapsed = time.perf_counter() - (self.start or time.perf_counter())
        return self.counted / elapsed if elapsed > 0 else 0.0


def _raw_pass(cfg: KafkaConfig, total: int, batch: int, name: str) -> tuple[float, int]:
    """Plain consume of every partition; (events/s, value bytes read)."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    consumer = make_consumer(
        cfg, group_id=f"{cfg.group_id}.{name}", **{"enable.partition.eof": False}
    )
    try:
        parts = sorted(
            consumer.list_topics(cfg.ad_topic, timeout=10).topics[cfg.ad_topic].partitions
        )
        consumer.assign([TopicPartition(cfg.ad_topic, p, OFFSET_BEGINNING) for p in parts])
        clock = _Clock(total)
        nbytes = 0
        while not clock.done():
            messages = consumer.consume(batch, _POLL_TIMEOUT_S)
            for m in messages:
                nbytes += len(m.value() or b"")
            clock.add(len(messages))
        return clock.rate(), nbytes
    finally:
        consumer.close()


def _ingest_pass(
    cfg: KafkaConfig, codec: AdCodec, index: LiveIvfIndex, total: int, batch: int
) -> dict[str, Any]:
    """AdStream.poll + AdBatch.net + prepare/assign/apply per micro-batch, into `index`."""
    dead_letters = DeadLetterPublisher(make_producer(cfg), cfg.dead_letter_topic)
    stream = AdStream(
        dataclasses.replace(cfg, group_id=f"{cfg.group_id}.ingest"), codec, dead_letters
    )
    poll_s = apply_s = 0.0
    decode = _Timed(stream.codec.decode)
    stream.codec.decode = decode  # type: ignore[method-assign]
    rejected = 0
    try:
        clock = _Clock(total)
        while not clock.done():
            t0 = time.perf_counter()
            decode_before = decode.seconds
            poll = stream.poll(batch, _POLL_TIMEOUT_S)
            t1 = time.perf_counter()
            # the service's ad path: net changes once, prepared and assigned once, one apply
            net = poll.batch.net()
            x = index.prepare(net.upsert_vectors, checked=True)
            lists = index.assign_lists(x, prepared=True)
            index.apply(net.upsert_ids, x, lists, net.delete_ids)
            t2 = time.perf_counter()
            if clock.start is not None:
                poll_s, apply_s = poll_s + t1 - t0, apply_s + t2 - t1
            else:
                decode.seconds = decode_before
            rejected += poll.rejected
            clock.add(poll.messages)
        dead_letters.flush()
    finally:
        stream.close()
    busy = poll_s + apply_s
    n = max(clock.counted, 1)
    return {
        "events_per_s": clock.rate(),
        "poll_share": poll_s / busy if busy > 0 else 0.0,
        "us_per_event": {
            "consume": round(1e6 * (poll_s - decode.seconds) / n, 2),
            "decode": round(1e6 * decode.seconds / n, 2),
            "index": round(1e6 * apply_s / n, 2),
        },
        "dead_lettered": rejected,
    }


class _Timed:
    """A callable's accumulated wall time (the codec's decode inside `AdStream.poll`)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.seconds = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t


def _assignment(vectors: np.ndarray, nlists: list[int], metric: str) -> list[dict[str, Any]]:
    """Coarse assignment cost per ad (one thread) and agreement with the exact list."""
    x = np.ascontiguousarray(vectors, dtype="float32")
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    d, fm = x.shape[1], faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    q = x[:5000]
    was = faiss.omp_get_max_threads()
    out = []
    try:
        for nlist in nlists:
            km = faiss.Kmeans(d, nlist, niter=4, seed=1, max_points_per_centroid=8)
            km.train(x[: 8 * nlist])
            cent = km.centroids
            faiss.omp_set_num_threads(1)
            t = time.perf_counter()
            _, exact = faiss.knn(q, cent, 1, fm)
            row: dict[str, Any] = {
                "nlist": nlist,
                "flat_us_per_ad": round(1e6 * (time.perf_counter() - t) / len(q), 2),
            }
            hnsw = faiss.IndexHNSWFlat(d, 32, fm)
            hnsw.add(cent)
            for ef in (16, 64):
                hnsw.hnsw.efSearch = ef
                t = time.perf_counter()
                _, got = hnsw.search(q, 1)
                row[f"hnsw_ef{ef}"] = {
                    "us_per_ad": round(1e6 * (time.perf_counter() - t) / len(q), 2),
                    "agreement": round(float((got[:, 0] == exact[:, 0]).mean()), 4),
                }
            n2 = int(np.sqrt(nlist))
            coarse = faiss.IndexFlat(d, fm)
            two = faiss.IndexIVFFlat(coarse, d, n2, fm)
            two.train(cent)
            two.add(cent)
            for p in (4, 16):
                two.nprobe = p
                t = time.perf_counter()
                _, got = two.search(q, 1)
                row[f"two_level_{n2}x{p}"] = {
                    "us_per_ad": round(1e6 * (time.perf_counter() - t) / len(q), 2),
                    "agreement": round(float((got[:, 0] == exact[:, 0]).mean()), 4),
                }
            faiss.omp_set_num_threads(was)
            out.append(row)
    finally:
        faiss.omp_set_num_threads(was)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    _check(args)
    if args.faiss_threads > 0:
        faiss.omp_set_num_threads(args.faiss_threads)
    rng = np.random.default_rng(args.seed)
    batches = list(
        synthetic_ads(
            args.ads, seed=args.seed, dim=None if args.dim == 50 else args.dim, batch_size=10_000
        )
    )
    ids = np.concatenate([b.ad_ids for b in batches])
    vectors = np.ascontiguousarray(np.vstack([b.vectors for b in batches]))
    icfg = IndexConfig(dim=args.dim, metric=args.metric, nlist=args.nlist)

    t = time.perf_counter()
    sample = vectors[rng.choice(args.ads, min(args.ads, args.train), replace=False)]
    trained, _ = LiveIvfIndex.train(icfg, sample).serialize()
    train_s = time.perf_counter() - t

    bulk = LiveIvfIndex.deserialize(icfg, trained)
    t = time.perf_counter()
    bulk.upsert(ids, vectors)
    bulk_rate = args.ads / (time.perf_counter() - t)
    del bulk

    codec = AdCodec(LocalSchemaRegistry(), args.dim, args.metric)
    run_id = uuid.uuid4().hex[:8]
    with running_broker(args.bootstrap or None) as bootstrap:
        cfg = KafkaConfig(
            bootstrap_servers=bootstrap,
            ad_topic=f"bench-ingest-ads-{run_id}",
            dead_letter_topic=f"bench-ingest-dead-letter-{run_id}",
            group_id=f"bench-ingest-{run_id}",
        )
        create_topics(bootstrap, [cfg.ad_topic], partitions=args.partitions)
        create_topics(bootstrap, [cfg.dead_letter_topic])
        t = time.perf_counter()
        stats = publish_batches(Publisher(make_producer(cfg), cfg.ad_topic), codec, batches)
        produce_s = time.perf_counter() - t
        if stats.failed or stats.delivered != args.ads:
            raise BrokerError(f"producing the ads failed: {stats.summary(cfg.ad_topic)}")

        raw_before, value_bytes = _raw_pass(cfg, args.ads, args.batch, "raw-1")
        index = LiveIvfIndex.deserialize(icfg, trained)
        ingest = _ingest_pass(cfg, codec, index, args.ads, args.batch)
        raw_after, _ = _raw_pass(cfg, args.ads, args.batch, "raw-2")
    raw_rate = (raw_before + raw_after) / 2

    if index.ntotal != args.ads:
        raise BrokerError(f"the ingest pass indexed {index.ntotal} of {args.ads} ads")
    index.compact()
    estimated = index.memory_bytes() / index.ntotal
    gc.collect()
    trim_heap()
    before = rss_bytes()
    del index
    gc.collect()
    trim_heap()
    after = rss_bytes()
    released = None if before is None or after is None else (before - after) / args.ads

    floor = 4 * args.dim + 8
    nlists = [int(v) for v in args.assign_nlists.split(",") if v.strip()]
    assignment = _assignment(vectors, nlists, args.metric) if nlists else None
    return {
        "benchmark": "ingest",
        "ads": args.ads,
        "dim": args.dim,
        "vectors": "glove-6B-50d" if args.dim == 50 else MIXTURE_VERSION,
        "partitions": args.partitions,
        "batch": args.batch,
        "nlist": args.nlist,
        "metric": args.metric,
        "value_bytes_per_event": round(value_bytes / args.ads, 1),
        "produce_events_per_s": round(args.ads / produce_s),
        "raw_consume_events_per_s": round(raw_rate),
        "raw_consume_passes_events_per_s": [round(raw_before), round(raw_after)],
        "ingest_events_per_s": round(ingest["events_per_s"]),
        "ratio": round(ingest["events_per_s"] / raw_rate, 3) if raw_rate > 0 else 0.0,
        "ratio_goal": RATIO_GOAL,
        "ingest_poll_share": round(ingest["poll_share"], 3),
        "ingest_us_per_event": ingest["us_per_event"],
        "dead_lettered": ingest["dead_lettered"],
        "bulk_add_vectors_per_s": round(bulk_rate),
        "index_bound_ratio": round(bulk_rate / raw_rate, 3) if raw_rate > 0 else 0.0,
        "faiss_threads": faiss.omp_get_max_threads(),
        "bytes_per_indexed_ad": round(estimated, 1),
        "released_bytes_per_indexed_ad": None if released is None else round(released, 1),
        "bytes_goal": round(BYTES_GOAL_FACTOR * floor, 1),
        "train_s": round(train_s, 2),
        "assignment": assignment,
    }
