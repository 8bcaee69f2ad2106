"""`annstream replay`: re-publish historical events with their event times, resumably."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import signal
import sys
from types import FrameType

from annstream.cli.produce import add_kafka_arguments, kafka_overrides
from annstream.config import load_config
from annstream.errors import ConfigError

__all__ = ["HELP", "add_arguments", "parse_time_ms", "run"]

HELP = "replay an Avro file or a time range of a topic into a topic, keeping event times"

EPILOG = """\
Every message keeps its event time as the Kafka timestamp and is keyed by its id (ads by ad
id, engagements by query id, 8-byte big-endian), in source order, so per-key order holds.
--speed 1 replays in real time, 10 ten times faster, 0 (default) as fast as possible;
--rate caps events per second either way.

With --checkpoint FILE the replay records, after the broker confirmed them, how far it got;
run the same command again after an interruption and it continues from there (at most the
messages in flight at a crash are sent twice). Delete the file to start over.

examples:
  annstream replay --from-file ads-2024-06.avro --checkpoint ads.ckpt --progress
  annstream replay --from-file engagements.avro --to-topic annstream.engagements --speed 60
  annstream replay --from-topic archive.engagements --start 2024-06-01T00:00 \\
      --end 2024-06-02T00:00 --to-topic annstream.engagements --rate 20000 --checkpoint e.ckpt
"""


def parse_time_ms(text: str) -> int:
    """Milliseconds since the epoch, or an ISO-8601 time (UTC when no zone is given)."""
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"time {text!r}: use milliseconds since the epoch or ISO-8601 (2024-06-01T00:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-file", metavar="FILE.avro", help="Avro container file of events")
    src.add_argument("--from-topic", metavar="TOPIC", help="source topic (messages copied as is)")
    parser.add_argument("--start", help="--from-topic: first event time (ms or ISO-8601)")
    parser.add_argument("--end", help="--from-topic: end of the range, exclusive")
    parser.add_argument(
        "--to-topic", help="target topic (default for files: kafka.ad_topic / engagement_topic)"
    )
    parser.add_argument(
        "--speed", type=float, default=0.0, help="event-time speed factor (0 = no pacing)"
    )
    parser.add_argument("--checkpoint", metavar="FILE", help="resume file (see below)")
    parser.add_argument("--max-events", type=int, help="stop after this many events")
    parser.add_argument("--batch-size", type=int, default=5_000, help="events per batch (5000)")
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=2.0,
        help="--from-topic: seconds without new messages at the end before stopping (2)",
    )
    add_kafka_arguments(parser)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from annstream.kafka import make_consumer, make_producer
    from annstream.schemas import open_registry
    from producers.publish import Progress, Publisher
    from producers.replay import replay_file, replay_topic
    from producers.sources import avro_file_kind

    if args.batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    if args.from_file and (args.start or args.end):
        raise ConfigError("--start/--end select a range of --from-topic; a file is replayed whole")
    cfg = load_config(args.config, overrides=kafka_overrides(args))
    k = cfg.kafka
    if args.from_file:
        kind = avro_file_kind(args.from_file)
        topic = args.to_topic or (k.ad_topic if kind == "ads" else k.engagement_topic)
    elif not args.to_topic:
        raise ConfigError("--from-topic needs --to-topic")
    else:
        topic = args.to_topic
    signal.signal(signal.SIGTERM, _interrupt)
    progress = Progress(None, f"replay -> {topic}", enabled=True if args.progress else None)
    publisher = Publisher(make_producer(k), topic, rate=args.rate, progress=progress)
    common = {
        "speed": args.speed,
        "checkpoint": args.checkpoint,
        "batch_size": args.batch_size,
        "max_events": args.max_events,
    }
    if args.from_file:
        registry = open_registry(k)
        result = replay_file(args.from_file, publisher, registry, **common)
    else:
        consumer = make_consumer(k, "annstream-replay", **{"enable.partition.eof": True})
        try:
            result = replay_topic(
                consumer,
                args.from_topic,
                publisher,
                start_ms=parse_time_ms(args.start) if args.start else None,
                end_ms=parse_time_ms(args.end) if args.end else None,
                idle_s=args.idle_timeout,
                **common,
            )
        finally:
            consumer.close()
    stats = result.stats
    resumed = (
        f" (resumed after {result.resumed_from} delivered earlier)" if result.resumed_from else ""
    )
    if args.json:
        print(json.dumps(stats.as_dict(topic) | {"resumed_from": result.resumed_from}))
    else:
        print(stats.summary(topic) + resumed)
    unconfirmed = stats.sent - stats.delivered - stats.failed
    if stats.failed or unconfirmed:
        print(
            f"annstream replay: {stats.failed + unconfirmed} events not delivered", file=sys.stderr
        )
        return 1
    return 0
