"""`annstream broker`: run the embedded Kafka-protocol broker until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType

from annstream.broker import EmbeddedBroker, create_topics
from annstream.config import load_config

__all__ = ["HELP", "add_arguments", "run"]

HELP = "start the embedded Kafka-protocol broker (Tansu) for local use and print its address"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9092, help="listen port (default 9092)")
    parser.add_argument(
        "--partitions",
        type=int,
        default=3,
        help="partitions of the annstream topics created at start (default 3)",
    )
    parser.add_argument("--config", help="TOML config file naming the topics to create")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config).kafka
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with EmbeddedBroker(args.host, args.port) as broker:
        topics = [cfg.ad_topic, cfg.engagement_topic, cfg.dead_letter_topic, cfg.results_topic]
        create_topics(broker.bootstrap_servers, topics, partitions=args.partitions)
        print(broker.bootstrap_servers, flush=True)
        print(
            f"embedded broker ready (pid {broker.pid}); topics: "
            f"{', '.join(t for t in topics if t)}; Ctrl-C to stop",
            flush=True,
        )
        stop.wait()
    print("embedded broker stopped", flush=True)
    return 0
