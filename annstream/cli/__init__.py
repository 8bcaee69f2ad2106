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

from confluent_kafka import KafkaError, KafkaException

from annstream.errors import AnnstreamError
from annstream.logs import add_url_secrets, configure_logging, redact_text

__all__ = ["error_line", "main"]

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


_UNREACHABLE = frozenset(
    {
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._TIMED_OUT,
        KafkaError._RESOLVE,
    }
)


def _kafka_reason(exc: KafkaException) -> str:
    """librdkafka's refusal as one sentence that says what to check."""
    error = exc.args[0] if exc.args else None
    if not isinstance(error, KafkaError):
        return f"Kafka: {exc}"
    if error.code() == KafkaError._INVALID_ARG:
        return f"Kafka client settings: {error.str()}; fix or remove it in [kafka.client]"
    if error.code() in _UNREACHABLE:
        return f"Kafka: {error.str()}; is a broker up at kafka.bootstrap_servers?"
    return f"Kafka: {error.str()}"


def error_line(command: str, message: str) -> str:
    """The one line a failed command prints: secrets masked (logs.redact_text), no newlines."""
    return f"annstream {command}: error: " + " ".join(redact_text(message).split())


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for arg in argv:
        add_url_secrets(arg)
    args = build_parser().parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO, json=args.log_json)
    try:
        return int(args._run(args))
    except AnnstreamError as exc:
        reason = str(exc)
    except KafkaException as exc:
        reason = _kafka_reason(exc)
    except KeyboardInterrupt:
        return 130
    print(error_line(args.command, reason), file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
