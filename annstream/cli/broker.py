"""`annstream broker`: run the embedded Kafka-protocol broker until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import threading
from types import FrameType

from annstream.broker import EmbeddedBroker
from annstream.config import load_config
from annstream.topics import ensure_topics

__all__ = ["HELP", "add_arguments", "run"]

HELP = "start the embedded Kafka-protocol broker (Tansu) for local use and print its address"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9092, help="listen port (default 9092)")
    parser.add_argument(
        "--partitions",
        type=int,
        default=3,
        help="partitions of the annstream topics created at start (default 3; the head-state "
        "changelog gets as many as the engagement topic)",
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
        here = dataclasses.replace(
            cfg,
            bootstrap_servers=broker.bootstrap_servers,
            create_topics=True,
            topic_partitions=args.partitions,
        )
        topics = ensure_topics(here)
        print(broker.bootstrap_servers, flush=True)
        print(
            f"embedded broker ready (pid {broker.pid}); topics: "
            f"{', '.join(topics)}; Ctrl-C to stop",
            flush=True,
        )
        stop.wait()
    print("embedded broker stopped", flush=True)
    return 0
