"""`annstream produce ads|engagements`: publish events from a file or a synthetic generator."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any, cast

import numpy as np

from annstream.config import Config, load_config
from annstream.errors import ConfigError
from annstream.events import AdBatch, EngagementBatch

__all__ = ["HELP", "add_arguments", "add_kafka_arguments", "kafka_overrides", "run"]

logger = logging.getLogger(__name__)

HELP = "publish ad or engagement events from a file or a seeded synthetic generator"

EPILOG = """\
keys and timestamps:
  ads are keyed by ad id, engagements by query id, as the id's 8-byte big-endian bytes;
  the Kafka message timestamp is the event time. The producer is idempotent (acks=all).
  Event times: a file's own are kept ('event_time_ms' in .npz, 'event_time' in .parquet and
  .avro); every other event (other files, --synthetic) is stamped when it is sent, so with
  --rate the event time is the send time, not the time the file was read.

input files (--from), by extension:
  .npy      a 2-d array of vectors, one event per row: ads (upserts) or engagements (the
            row is the query vector). Ids: --ids FILE.npy, else counting from --id-start (0).
  .npz      named arrays, one value per event ([..] = optional):
            ads          ad_ids (or ids), vectors [, ops, event_time_ms, advertiser_ids,
                         campaign_ids]; ops are 'upsert'/'delete' (any case) or 0/1. A file of
                         deletes only needs ad_ids and ops, no vectors (--dim gives the width).
            engagements  query_ids (or ids) and/or vectors [, item_ids, event_types, weights,
                         event_time_ms]; event_types are names (click, save, ...) or codes.
                         Without ids in the file: --ids FILE.npy, else from --id-start (0).
            event_time_ms: milliseconds since the epoch (int64) or datetime64.
  .parquet  the Avro field names (ad_id, embedding, op, event_time, ... / query_id,
            query_embedding, ...); needs `pip install pyarrow`
  .avro     an Avro container file of AdEvent / EngagementEvent records (schemas/*.avsc)

examples:
  annstream produce ads --from ads.npz --bootstrap-servers 127.0.0.1:9092
  annstream produce ads --from vectors.npy --ids ad_ids.npy --dim 384 --rate 2000
  annstream produce engagements --from queries.npy --ids query_ids.npy --dim 384
  annstream produce ads --synthetic 100000 --rate 5000 --progress
  annstream produce engagements --synthetic 1000000 --queries 50000 --zipf-s 1.1 --seed 7
  annstream produce ads --synthetic 20000 --random-vectors --dim 384 --to-file ads.avro
"""


def add_kafka_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML config file (kafka and index sections)")
    parser.add_argument("--bootstrap-servers", help="Kafka brokers (kafka.bootstrap_servers)")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="events per second cap (0 = as fast as possible)"
    )
    parser.add_argument(
        "--progress",
        action="store_true",
        help="draw a progress bar on stderr even when it is not a terminal",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: sent, delivered, failed, events_per_s, elapsed_s",
    )


def kafka_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    return (
        {"kafka": {"bootstrap_servers": args.bootstrap_servers}} if args.bootstrap_servers else {}
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("kind", choices=("ads", "engagements"), help="which events to publish")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="source", metavar="FILE", help="read events from FILE")
    src.add_argument("--synthetic", type=int, metavar="N", help="generate N events")
    parser.add_argument("--topic", help="target topic (default: kafka.ad_topic / engagement_topic)")
    parser.add_argument(
        "--to-file", metavar="OUT.avro", help="write an Avro container file instead of publishing"
    )
    parser.add_argument(
        "--dim", type=int, help="expected/generated dimension (default: index.dim of the config)"
    )
    parser.add_argument(
        "--random-vectors",
        action="store_true",
        help="synthetic: vectors of --dim from a seeded Gaussian mixture (clustered, like real "
        "embeddings; queries near the same centres) instead of GloVe 6B 50-d rows",
    )
    parser.add_argument("--seed", type=int, default=0, help="synthetic: random seed (0)")
    parser.add_argument(
        "--queries", type=int, default=10_000, help="synthetic: query population (10000)"
    )
    parser.add_argument(
        "--zipf-s", type=float, default=1.1, help="synthetic: Zipf exponent of query popularity"
    )
    parser.add_argument(
        "--ads", type=int, default=10_000, help="synthetic engagements: engaged ad ids 1..ADS"
    )
    ids = parser.add_mutually_exclusive_group()
    ids.add_argument(
        "--id-start",
        type=int,
        help="first id: --synthetic ads 1, --synthetic queries 1000000000; --from a file "
        "without ids (.npy, or .npz without an ids array) 0",
    )
    ids.add_argument(
        "--ids",
        metavar="FILE.npy",
        help="--from a file without ids: a 1-d .npy of integer ids, one per row "
        "(ad ids, or query ids for engagements)",
    )
    parser.add_argument("--batch-size", type=int, default=5_000, help="events per batch (5000)")
    add_kafka_arguments(parser)


def _batches(
    args: argparse.Namespace, cfg: Config
) -> tuple[Iterator[AdBatch] | Iterator[EngagementBatch], int | None]:
    from producers.sources import (
        read_ads,
        read_engagements,
        synthetic_ads,
        synthetic_engagements,
    )

    dim = args.dim or cfg.index.dim
    if args.source:
        reader = read_ads if args.kind == "ads" else read_engagements
        start = args.id_start if args.id_start is not None else 0
        ids = _load_ids(args.ids) if args.ids else None
        batches = reader(args.source, dim, batch_size=args.batch_size, id_start=start, ids=ids)
        return batches, None
    if args.ids:
        raise ConfigError("--ids gives the ids of a --from file's rows; --synthetic makes its own")
    n = int(args.synthetic)
    if n < 0:
        raise ConfigError(f"--synthetic must be >= 0, got {n}")
    if not args.random_vectors and args.dim not in (None, 50):
        raise ConfigError(
            f"GloVe vectors have 50 dimensions, not --dim {args.dim}; add --random-vectors"
        )
    gen_dim = dim if args.random_vectors else None
    if args.kind == "ads":
        ads = synthetic_ads(
            n,
            seed=args.seed,
            dim=gen_dim,
            batch_size=args.batch_size,
            id_start=1 if args.id_start is None else args.id_start,
            queries=args.queries,
        )
        return ads, n
    engagements = synthetic_engagements(
        n,
        queries=args.queries,
        zipf_s=args.zipf_s,
        seed=args.seed,
        dim=gen_dim,
        batch_size=args.batch_size,
        query_id_start=1_000_000_000 if args.id_start is None else args.id_start,
        ads=args.ads,
    )
    return engagements, n


def _load_ids(path: str) -> np.ndarray:
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--ids {path}: not a readable .npy file ({exc})") from None
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ConfigError(
            f"--ids {path}: expected a 1-d array of integer ids, got {ids.dtype} {ids.shape}"
        )
    return np.asarray(ids, dtype="int64")


def _report(args: argparse.Namespace, summary: dict[str, Any], text: str) -> None:
    print(json.dumps(summary) if args.json else text, flush=True)


def run(args: argparse.Namespace) -> int:
    from annstream.codec import AdCodec, EngagementCodec
    from annstream.kafka import make_producer
    from annstream.schemas import open_registry
    from producers.publish import Progress, Publisher, PublishStats, publish_batches
    from producers.sources import has_event_times, write_avro_file

    if args.batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    cfg = load_config(args.config, overrides=kafka_overrides(args))
    batches, total = _batches(args, cfg)
    if args.to_file:
        rows = write_avro_file(args.to_file, batches)
        summary = {"kind": args.kind, "file": args.to_file, "written": rows}
        _report(args, summary, f"wrote {rows} events ({args.kind}) to {args.to_file}")
        return 0
    k = cfg.kafka
    topic = args.topic or (k.ad_topic if args.kind == "ads" else k.engagement_topic)
    stamp = not (args.source and has_event_times(args.source))
    times = {"event_times": "send" if stamp else "file", "kind": args.kind}
    peek = cast(AdBatch | EngagementBatch | None, next(batches, None))
    if peek is None:
        _report(args, PublishStats().as_dict(topic) | times, f"no {args.kind} events to publish")
        return 0
    registry = open_registry(k)
    codec = (AdCodec if args.kind == "ads" else EngagementCodec)(
        registry, peek.dim, cfg.index.metric
    )
    progress = Progress(total, f"{args.kind} -> {topic}", enabled=True if args.progress else None)
    publisher = Publisher(make_producer(k), topic, rate=args.rate, progress=progress)
    stats = publish_batches(publisher, codec, _chain(peek, batches), stamp=stamp)
    _report(args, stats.as_dict(topic) | times, stats.summary(topic))
    unconfirmed = stats.sent - stats.delivered - stats.failed
    if stats.failed or unconfirmed:
        print(
            f"annstream produce: {stats.failed + unconfirmed} events not delivered", file=sys.stderr
        )
        return 1
    return 0


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest
