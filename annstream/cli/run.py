"""`annstream run`: the long-running refresher service."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import threading
from types import FrameType
from typing import Any

from annstream.config import load_config
from annstream.logs import configure_logging, redact

HELP = "run the refresher service: consume ads and engagements, keep neighbour lists fresh"

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        help="TOML config file (sections kafka, index, snapshot, drift, heads, refresh, store, "
        "service); ANNSTREAM_<SECTION>__<KEY> environment variables override it, and "
        "ANNSTREAM_KAFKA__CLIENT__<ENTRY> sets one [kafka.client] entry, '_' read as '.' "
        "(ANNSTREAM_KAFKA__CLIENT__SASL_PASSWORD: sasl.password; commas allowed)",
    )
    parser.add_argument(
        "--bootstrap-servers", help="Kafka bootstrap servers (kafka.bootstrap_servers)"
    )
    parser.add_argument(
        "--store",
        help=(
            "store URL: sqlite:///relative/path.db (from the working directory), "
            "sqlite:////absolute/path.db (four slashes) or aerospike://host:port/namespace/set"
        ),
    )
    parser.add_argument("--snapshot-dir", help="where index snapshots live (snapshot.dir)")
    parser.add_argument("--group-id", help="consumer group of the replicas (kafka.group_id)")


def overrides_from(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Command-line flags as config overrides (flags win over file and environment)."""
    out: dict[str, dict[str, Any]] = {}
    pairs = {
        "bootstrap_servers": ("kafka", "bootstrap_servers"),
        "store": ("store", "url"),
        "snapshot_dir": ("snapshot", "dir"),
        "group_id": ("kafka", "group_id"),
    }
    for attr, (section, key) in pairs.items():
        value = getattr(args, attr, None)
        if value is not None:
            out.setdefault(section, {})[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    from consumers.service import RefresherService

    cfg = load_config(args.config, overrides=overrides_from(args))
    if not args.verbose:
        configure_logging(cfg.service.log_level, json=cfg.service.log_json or args.log_json)
    logger.info("configuration: %s", redact(dataclasses.asdict(cfg)))
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        logger.info("signal %d: finishing the micro-batch and shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    service = RefresherService.from_config(cfg)
    stats = service.run(stop)
    logger.info(
        "stopped: %d ad events, %d engagement events, %d records written, %d dead letters",
        stats.ad_events,
        stats.engagement_events,
        stats.records_written,
        stats.dead_letters,
    )
    return 0
