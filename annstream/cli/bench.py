"""`annstream bench NAME`: run one benchmark from annstream/bench/ and print its JSON result.

Each benchmark module `annstream/bench/<name>.py` defines `HELP`, `add_arguments(parser)` and
`run(args) -> dict`; the dict is printed as one JSON object, and `"ok": false` in it makes the
command exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

HELP = "run a benchmark (ingest, refresh, store, ...) and print one JSON object"

BENCHMARKS: tuple[str, ...] = (
    "ingest",
    "refresh",
    "scale",
    "store",
    "serving",
    "freshness",
    "load",
    "faults",
    "soak",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="NAME", required=True)
    for name in BENCHMARKS:
        module = importlib.import_module(f"annstream.bench.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        p.add_argument("--json", action="store_true", help="print only the JSON result")
        module.add_arguments(p)
        p.set_defaults(_bench=module.run)


def run(args: argparse.Namespace) -> int:
    """Print the result; exit 1 when the benchmark says it failed (`"ok": false`)."""
    result = args._bench(args)
    print(json.dumps(result, indent=None if args.json else 2, sort_keys=False))
    sys.stdout.flush()
    return 0 if result.get("ok", True) else 1
