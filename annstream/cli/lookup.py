"""`annstream lookup QUERY_ID... --store URL`: print stored neighbour lists as JSON lines."""

from __future__ import annotations

import argparse
import json
import math

from annstream.config import load_config
from annstream.serving import NeighbourReader, exclude
from annstream.store import open_store

__all__ = ["HELP", "add_arguments", "run"]

HELP = "look up the stored neighbour lists of query ids (one JSON object per query)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query_ids", nargs="+", type=int, metavar="QUERY_ID")
    parser.add_argument(
        "--store",
        help="store URL: sqlite:///path or aerospike://host:port/ns/set (default: config)",
    )
    parser.add_argument("--config", help="TOML config file (store settings)")
    parser.add_argument("--k", type=int, help="neighbours per query (default: the stored K)")
    parser.add_argument(
        "--exclude-campaign", type=int, action="append", default=[], metavar="ID",
        help="drop neighbours of this campaign (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--exclude-advertiser", type=int, action="append", default=[], metavar="ID",
        help="drop neighbours of this advertiser (repeatable)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config).store
    store = open_store(args.store or cfg.url, cfg)
    try:
        predicate = None
        if args.exclude_campaign or args.exclude_advertiser:
            predicate = exclude(args.exclude_campaign, args.exclude_advertiser)
        result = NeighbourReader(store).lookup(args.query_ids, k=args.k, predicate=predicate)
    finally:
        store.close()
    for i, qid in enumerate(result.query_ids.tolist()):
        n = int(result.counts[i])
        line = {
            "query_id": qid,
            "found": bool(result.found[i]),
            "version": int(result.versions[i]),
            "computed_at_ms": int(result.computed_at_ms[i]),
            "filtered": int(result.filtered[i]),
            "ids": result.ids[i, :n].tolist(),
            "scores": [
                round(s, 6) if math.isfinite(s) else None for s in result.scores[i, :n].tolist()
            ],
        }
        print(json.dumps(line))
    return 0
