"""`annstream status`: what a running refresher reports on its /status endpoint."""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any

from annstream.config import load_config
from annstream.errors import AnnstreamError, ConfigError

__all__ = ["HELP", "add_arguments", "fetch_status", "flatten", "run"]

HELP = (
    "show a running service's status: what its first training waits for, lag, freshness, "
    "recall and its target, nprobe, index, head queries"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        help="base URL of the service's metrics endpoint, e.g. http://127.0.0.1:9108 "
        "(default: 127.0.0.1 and service.metrics_port of --config)",
    )
    parser.add_argument("--config", help="TOML config file (service.metrics_port)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (5)")
    parser.add_argument("--json", action="store_true", help="print the raw JSON document")


def fetch_status(url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """GET <url>/status as a dict; AnnstreamError naming the URL when it cannot be read."""
    target = url.rstrip("/")
    if not target.endswith("/status"):
        target += "/status"
    try:
        with urllib.request.urlopen(target, timeout=timeout_s) as response:
            doc = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise AnnstreamError(
            f"{target} answered HTTP {exc.code}: is this an annstream service?"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        raise AnnstreamError(
            f"cannot reach {target} ({exc}): is the service running with service.metrics_port set?"
        ) from None
    except json.JSONDecodeError:
        raise AnnstreamError(
            f"{target} did not return JSON: is this an annstream service?"
        ) from None
    if not isinstance(doc, dict):
        raise AnnstreamError(f"{target} returned {type(doc).__name__}, not a status object")
    return doc


def flatten(doc: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf value) pairs in document order; list items as `key.0`, `key.1`, ...
    (a fit warning is a line of its own)."""
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from flatten(value, f"{name}.")
        elif isinstance(value, list) and value:
            yield from flatten({str(i): v for i, v in enumerate(value)}, f"{name}.")
        else:
            yield name, value


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def run(args: argparse.Namespace) -> int:
    url = args.url
    if not url:
        port = load_config(args.config).service.metrics_port
        if port <= 0:
            raise ConfigError(
                "no --url and service.metrics_port is 0 (off): pass --url http://host:port"
            )
        url = f"http://127.0.0.1:{port}"
    doc = fetch_status(url, args.timeout)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    pairs = list(flatten(doc))
    width = max((len(k) for k, _ in pairs), default=0)
    for key, value in pairs:
        print(f"{key:<{width}}  {_fmt(value)}")
    return 0
