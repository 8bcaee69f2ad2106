"""`annstream demo`: the whole pipeline on embedded defaults, ending with a measured summary.

Starts the embedded broker, loads real GloVe 6B 50-d vectors (or, at another `--dim` or with
`--synthetic`, clustered Gaussian-mixture vectors with queries near the same centres), publishes
an initial ad catalogue, then streams Zipf-distributed engagements plus new, changed and deleted ads while the
refresher service runs; finally checks the stored neighbour lists against exact brute force.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from annstream.errors import ConfigError
from annstream.events import AdBatch
from producers.stream import MixedStream

__all__ = ["HELP", "add_arguments", "run"]

HELP = "run the main job end to end on embedded defaults and print a summary"

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--ads", type=int, default=50_000, help="initial ad catalogue (50000)")
    parser.add_argument(
        "--stream-ads", type=int, default=5_000, help="ads streamed while running (5000)"
    )
    parser.add_argument(
        "--engagements", type=int, default=100_000, help="engagement events (100000)"
    )
    parser.add_argument("--queries", type=int, default=10_000, help="query population (10000)")
    parser.add_argument(
        "--rate", type=float, default=20_000, help="streamed events per second (20000; 0 = max)"
    )
    parser.add_argument("--k", type=int, default=20, help="neighbours per head query (20)")
    parser.add_argument("--nlist", type=int, default=256, help="IVF lists (256)")
    parser.add_argument("--nprobe", type=int, default=48, help="IVF lists probed (48)")
    parser.add_argument("--recall-sample", type=int, default=500, help="head queries checked")
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="clustered synthetic vectors (a seeded Gaussian mixture) instead of GloVe",
    )
    parser.add_argument(
        "--dim",
        type=int,
        help="dimension (50: GloVe 6B 50-d; any other: synthetic clustered vectors)",
    )
    parser.add_argument(
        "--store", help="store URL (default: a SQLite file in a temporary directory)"
    )
    parser.add_argument("--partitions", type=int, default=3, help="partitions per topic (3)")
    parser.add_argument("--seed", type=int, default=0)


def _feeder(args: argparse.Namespace, cfg: Any, pool: np.ndarray | None) -> MixedStream:
    """Engagements with new and deleted ads spread among them, each topic at half the rate."""
    from annstream.codec import AdCodec, EngagementCodec
    from annstream.kafka import make_producer
    from annstream.schemas import open_registry
    from producers.publish import Publisher
    from producers.sources import synthetic_ads, synthetic_engagements
    from producers.stream import Lane, MixedStream

    a = args
    dim = cfg.index.dim
    registry = open_registry()
    producer = make_producer(cfg.kafka)
    rate = a.rate / 2 if a.rate > 0 else 0.0
    batch = 250
    engagements = synthetic_engagements(
        a.engagements,
        queries=a.queries,
        seed=a.seed,
        dim=dim if pool is None else None,
        pool=pool,
        batch_size=batch,
        ads=a.ads,
    )
    new_ads = synthetic_ads(
        a.stream_ads,
        seed=a.seed + 1,
        dim=dim if pool is None else None,
        pool=pool,
        batch_size=batch,
        id_start=a.ads + 1,
        queries=a.queries,
    )

    def ads_and_deletes() -> Iterator[AdBatch]:
        rng = np.random.default_rng(a.seed + 2)
        for ab in new_ads:
            yield ab
            dead = rng.integers(1, a.ads + 1, max(1, len(ab) // 10))
            yield AdBatch.deletes(dead, dim, int(time.time() * 1000))

    lanes = {
        "engagements": Lane(
            Publisher(producer, cfg.kafka.engagement_topic, rate=rate),
            EngagementCodec(registry, dim),
            engagements,
            share=max(1, a.engagements),
            stamp=True,
        ),
        "ads": Lane(
            Publisher(producer, cfg.kafka.ad_topic, rate=rate),
            AdCodec(registry, dim),
            ads_and_deletes(),
            share=max(1, a.stream_ads + a.stream_ads // 10),
            stamp=True,
        ),
    }
    return MixedStream(lanes, name="demo-feeder")


def _progress(service: Any, feeder: MixedStream, initial: int, quiet: bool) -> Iterator[None]:
    last = 0.0
    while True:
        now = time.monotonic()
        if not quiet and now - last >= 2.0:
            last = now
            s = service.stats
            print(
                f"[demo] ads {s.ad_events}/{initial + feeder.sent('ads')}  engagements "
                f"{s.engagement_events}/{feeder.sent('engagements')}  head queries "
                f"{s.head_queries}  records written {s.records_written}  "
                f"micro-batches {s.micro_batches}",
                file=sys.stderr,
                flush=True,
            )
        yield


def run(args: argparse.Namespace) -> int:
    from annstream.broker import EmbeddedBroker, create_topics
    from annstream.codec import AdCodec
    from annstream.config import load_config
    from annstream.kafka import make_producer
    from annstream.recall import stored_recall
    from annstream.schemas import open_registry
    from annstream.store import open_store
    from consumers.service import RefresherService
    from producers.publish import Publisher, publish_batches
    from producers.sources import MIXTURE_VERSION, glove_vectors, synthetic_ads

    if not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)
    started = time.monotonic()
    dim = 50 if args.dim is None else args.dim
    if dim <= 0:
        raise ConfigError(f"--dim must be positive, got {dim}")
    synthetic = args.synthetic or dim != 50
    pool = None if synthetic else np.ascontiguousarray(glove_vectors(), dtype="float32")
    vectors = MIXTURE_VERSION if pool is None else "glove-6B-50d"
    work = Path(tempfile.mkdtemp(prefix="annstream-demo-"))
    with EmbeddedBroker() as broker:
        cfg = load_config(
            env={},
            overrides={
                "kafka": {"bootstrap_servers": broker.bootstrap_servers, "create_topics": True},
                "index": {
                    "dim": dim,
                    "nlist": args.nlist,
                    "nprobe": args.nprobe,
                    "train_size": min(args.ads, 50 * args.nlist),
                },
                "refresh": {"k": args.k, "margin": max(5, args.k // 2), "nprobe": args.nprobe},
                "heads": {"enter_score": 4.0, "exit_score": 2.0},
                "store": {"url": args.store or f"sqlite:///{work / 'neighbours.db'}"},
                "snapshot": {"dir": str(work / "snapshots")},
            },
        )
        k = cfg.kafka
        create_topics(
            broker.bootstrap_servers,
            [k.ad_topic, k.engagement_topic, k.dead_letter_topic],
            partitions=args.partitions,
        )
        if not args.json:
            print(
                f"[demo] broker {broker.bootstrap_servers}; publishing {args.ads} ads "
                f"({vectors} vectors, d={dim})",
                file=sys.stderr,
            )
        publish_batches(
            Publisher(make_producer(k), k.ad_topic),
            AdCodec(open_registry(), dim),
            synthetic_ads(
                args.ads,
                seed=args.seed,
                dim=dim if pool is None else None,
                pool=pool,
                queries=args.queries,
            ),
        )
        service = RefresherService.from_config(cfg)
        feeder = _feeder(args, cfg, pool)
        progress = _progress(service, feeder, args.ads, args.json)
        stream_start = [0.0]
        fresh_mark = [0]

        def done(s: RefresherService) -> bool:
            next(progress)
            if feeder.error is not None:
                raise feeder.error
            if s.engagements is not None and s.engagements.assigned and feeder.ident is None:
                fresh_mark[0] = s.metrics.freshness_mark()
                stream_start[0] = time.monotonic()
                feeder.start()
            finished = (
                feeder.ident is not None
                and not feeder.is_alive()
                and s.stats.ad_events >= args.ads + feeder.sent("ads")
                and s.stats.engagement_events >= feeder.sent("engagements")
                and s.idle
            )
            if finished and s.refresher is not None:
                # the head queries' vectors, before shutdown hands their partitions back
                heads.append(s.refresher.head_ids())
                sample = rng.choice(
                    heads[0], size=min(args.recall_sample, len(heads[0])), replace=False
                )
                queries.append((sample, s.tracker.vectors(sample)))
            return finished

        heads: list[np.ndarray] = []
        queries: list[tuple[np.ndarray, np.ndarray]] = []
        rng = np.random.default_rng(args.seed)
        stats = service.run(until=done)
        elapsed = time.monotonic() - stream_start[0]
        index = service.index
        assert index is not None and queries
        sample, query_vectors = queries[0]
        store = open_store(cfg.store.url, cfg.store)
        try:
            recall = stored_recall(store, index, sample, query_vectors, args.k)
        finally:
            store.close()
    summary = {
        "ads_indexed": int(index.ntotal),
        "head_queries": len(heads[0]),
        "records_written": stats.records_written,
        "recall_at_k": round(recall, 4),
        "k": args.k,
        "recall_sample": len(sample),
        "freshness_ms": {
            key: None if v is None else round(1000 * v, 1)
            for key, v in service.metrics.freshness(since=fresh_mark[0]).items()
            if key != "window"
        },
        "events_per_s": round(
            (feeder.sent("ads") + feeder.sent("engagements")) / max(elapsed, 1e-9), 1
        ),
        "ad_events": stats.ad_events,
        "engagement_events": stats.engagement_events,
        "dead_letters": stats.dead_letters,
        "micro_batches": stats.micro_batches,
        "vectors": vectors,
        "dim": dim,
        "nlist": args.nlist,
        "nprobe": args.nprobe,
        "store": cfg.store.url,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print("\nannstream demo summary", file=sys.stderr)
        for key, value in summary.items():
            shown = value if isinstance(value, str) else json.dumps(value)
            print(f"  {key:18} {shown}")
    return 0
