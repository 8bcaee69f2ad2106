"""The `annstream` command: one module per subcommand in this package.

Each module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from importlib import metadata

from annstream.errors import AnnstreamError
from annstream.logs import configure_logging

__all__ = ["main"]

COMMANDS: tuple[str, ...] = (
    "demo",
    "run",
    "broker",
    "produce",
    "replay",
    "bench",
    "lookup",
    "tune",
    "status",
)


def _version() -> str:
    """The installed distribution's version (the package's own when run from a source tree)."""
    try:
        return metadata.version("annstream")
    except metadata.PackageNotFoundError:
        from annstream import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="annstream",
        description=(
            "Keep precomputed nearest-neighbour lists fresh as ads and engagement stream in."
        ),
    )
    parser.add_argument("--version", action="version", version=f"annstream {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument(
        "--log-json", action="store_true", help="log one JSON object per line (secrets masked)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"annstream.cli.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO, json=args.log_json)
    try:
        return int(args._run(args))
    except AnnstreamError as exc:
        print(f"annstream {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
