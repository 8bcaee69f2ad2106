"""`annstream lookup QUERY_ID... --store URL`: print stored neighbour lists as JSON lines.

Each line shows the neighbours' campaign and advertiser ids when the lists carry them, and
`--exclude-campaigns` / `--exclude-advertisers` / `--exclude-ids` drop neighbours the way a
serving caller's targeting rules would (the stored surplus still fills K where it can).
The store is opened for reading only: a SQLite file that does not exist is an error naming
its absolute path, never an empty new store. A key the store refuses to read (e.g. a record
of another set at its digest) prints `found: false` with an `error`; the others print as usual.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import numpy.typing as npt

from annstream.config import load_config
from annstream.serving import ServingResult, exclude, select
from annstream.store import LookupResult, open_store
from annstream.store.base import as_query_ids

__all__ = ["HELP", "add_arguments", "run"]

HELP = "look up the stored neighbour lists of query ids (one JSON object per query)"


def _id_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integer ids, got {text!r}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query_ids", nargs="+", type=int, metavar="QUERY_ID")
    parser.add_argument(
        "--store",
        help=(
            "store URL (default: config): sqlite:///relative/path.db (from the working "
            "directory), sqlite:////absolute/path.db (four slashes) or "
            "aerospike://host:port/namespace/set; a missing SQLite file is an error, "
            "never created"
        ),
    )
    parser.add_argument("--config", help="TOML config file (store settings)")
    parser.add_argument("--k", type=int, help="neighbours per query (default: the stored K)")
    for what, flag in (("campaign", "campaigns"), ("advertiser", "advertisers"), ("ad", "ids")):
        singular = "id" if what == "ad" else what
        parser.add_argument(
            f"--exclude-{flag}",
            f"--exclude-{singular}",
            dest=f"exclude_{flag}",
            type=_id_list,
            action="extend",
            default=[],
            metavar="ID[,ID...]",
            help=f"drop neighbours of these {what} ids (comma-separated, repeatable)",
        )


def _metadata_of(
    result: ServingResult, raw: LookupResult, values: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """`values` (a [n, m] column of `raw`) for the neighbours `result` kept; -1 for padding."""
    if values.shape[1] == 0:
        return np.full(result.ids.shape, -1, dtype=np.int64)
    same = (result.ids[:, :, None] == raw.ids[:, None, :]) & (result.ids[:, :, None] >= 0)
    picked = np.take_along_axis(values, same.argmax(axis=2), axis=1)
    return np.where(same.any(axis=2), picked, -1)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config).store
    store = open_store(args.store or cfg.url, cfg, create=False)
    try:
        raw = store.lookup(as_query_ids(args.query_ids))
    finally:
        store.close()
    predicate = None
    if args.exclude_campaigns or args.exclude_advertisers or args.exclude_ids:
        predicate = exclude(args.exclude_campaigns, args.exclude_advertisers, args.exclude_ids)
    try:
        result = select(raw, args.k, predicate)
    except ValueError as exc:
        print(f"annstream lookup: error: {exc}", file=sys.stderr)
        return 2
    columns = {
        name: _metadata_of(result, raw, values)
        for name, values in (
            ("campaign_ids", raw.campaign_ids),
            ("advertiser_ids", raw.advertiser_ids),
        )
        if values is not None
    }
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
            **{name: values[i, :n].tolist() for name, values in columns.items()},
        }
        if i in result.errors:
            line["error"] = result.errors[i]
        print(json.dumps(line))
    return 0
