"""Logging setup: plain text or one JSON object per line, with secrets masked on the way out.

Kafka client settings (`sasl.password`, `ssl.key.password`, ...), store passwords and tokens
end up in config dumps and error messages; `RedactFilter` masks the values of such keys in the
message, its arguments, extra fields and exception text before any handler writes them. The CLI
passes its error messages through `redact_text` too, so this is the one place that decides what
a secret is: values of secret-looking keys, URL passwords, and every value handed to
`add_secret` (the config loader does so for each secret it reads), which also catches a secret
quoted in a form no pattern knows (a librdkafka message, the tail of a mis-split value).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json as jsonlib
import logging
import re
import sys
import threading
import urllib.parse
from collections.abc import Mapping
from typing import IO, Any

__all__ = [
    "JsonFormatter",
    "MASK",
    "RedactFilter",
    "add_secret",
    "add_url_secrets",
    "configure_logging",
    "is_secret_key",
    "redact",
    "redact_text",
]

MASK = "***"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Anywhere in a key: sasl.* (bar the mechanism names), ssl.key*, basic.auth* (Schema Registry).
_SECRET_WORDS = (
    r"(?:password|passwd|passphrase|secret|token|api[_.-]?key|credentials?|jaas\.config"
    r"|private[_.-]?key|user[_.-]?info|sasl[_.-](?!mechanisms?\b)|ssl[_.-]key|basic[_.-]auth)"
)
_SECRET_KEY = re.compile(rf"^[\w.\-]*{_SECRET_WORDS}[\w.\-]*$", re.IGNORECASE)
_KEY = rf"[\w.\-]*{_SECRET_WORDS}[\w.\-]*"
# 'sasl.password': 'x'  |  "token": "x"  |  password='x'
_QUOTED = re.compile(rf"""(?P<k>['"]?{_KEY}['"]?\s*[:=]\s*)(?P<q>['"])(?P<v>.*?)(?P=q)""", re.I)
# password=x  |  sasl.password: x  (up to a space, comma, semicolon, brace or quote)
_BARE = re.compile(rf"""(?P<k>\b{_KEY}\s*[:=]\s*)(?P<v>[^\s,;'"{{}}()\[\]]+)""", re.I)
# scheme://user:password@host
_URL = re.compile(r"(?P<k>\b[a-z][a-z0-9+.\-]*://[^\s:/@]*:)(?P<v>[^\s@/]+)(?=@)", re.I)
# librdkafka: Invalid value "x" for configuration property "sasl.password"
_RDKAFKA = re.compile(
    r'(?P<k>value ")(?P<v>.*?)(?P<rest>" for configuration property "(?P<p>[^"]+)")'
)
# Shorter values are not masked as literals: they would mangle ordinary words.
_MIN_SECRET_LENGTH = 4
_secrets: frozenset[str] = frozenset()
_secrets_lock = threading.Lock()

_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_INSTALLED = "_annstream_handler"


def is_secret_key(key: str) -> bool:
    """True for setting names whose values must never be logged (password, token, ...)."""
    return bool(_SECRET_KEY.match(key))


def add_secret(value: str) -> None:
    """Mask `value` (and its comma-separated pieces) wherever `redact_text` meets it from now on."""
    global _secrets
    # A value split on its commas (a list of hosts, a list of settings) may show up in pieces.
    pieces = {value, *value.split(",")}
    with _secrets_lock:
        _secrets = _secrets | {p for p in pieces if len(p) >= _MIN_SECRET_LENGTH and p != MASK}


def add_url_secrets(text: str) -> None:
    """`add_secret` the password of every `scheme://user:password@` URL in `text`."""
    for m in _URL.finditer(text):
        add_secret(m["v"])
        add_secret(urllib.parse.unquote(m["v"]))


def redact_text(text: str) -> str:
    """`text` with the values of secret-looking keys, URL passwords and known secrets masked."""
    if not text:
        return text
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _RDKAFKA.sub(
        lambda m: f"{m['k']}{MASK if is_secret_key(m['p']) else m['v']}{m['rest']}", text
    )
    text = _QUOTED.sub(lambda m: f"{m['k']}{m['q']}{MASK}{m['q']}", text)
    text = _BARE.sub(lambda m: f"{m['k']}{MASK}", text)
    return _URL.sub(lambda m: f"{m['k']}{MASK}", text)


def redact(value: Any) -> Any:
    """A copy of a config dump (mappings, dataclasses, lists, strings) with secrets masked."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {
            k: (MASK if v not in ("", None) else v)
            if isinstance(k, str) and is_secret_key(k) and not isinstance(v, Mapping)
            else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value


class RedactFilter(logging.Filter):
    """Masks secrets in a record's message, extra fields and exception text (never drops it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not hide the record
            message = f"{record.msg!r} {record.args!r}"
        record.msg, record.args = redact_text(message), None
        for key, value in list(record.__dict__.items()):
            if key in _RECORD_FIELDS:
                continue
            record.__dict__[key] = MASK if is_secret_key(key) else redact(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def _jsonable(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return _jsonable(tolist())
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601), level, logger, message, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                doc[key] = _jsonable(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return jsonlib.dumps(doc, default=str)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is at emit time (it may be swapped, e.g. by pytest)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass


def configure_logging(
    level: str | int = "INFO", json: bool = False, stream: IO[str] | None = None
) -> logging.Handler:
    """Install one redacting handler on the root logger (text or JSON lines) at `level`.

    Calling it again replaces the handler it installed before; other handlers are kept.
    """
    if isinstance(level, str):
        resolved = logging.getLevelName(level.upper())
        if not isinstance(resolved, int):
            raise ValueError(
                f"unknown log level {level!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL"
            )
        level = resolved
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _INSTALLED, False)]:
        root.removeHandler(old)
        old.close()
    handler: logging.Handler = (
        logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    )
    handler.setFormatter(JsonFormatter() if json else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RedactFilter())
    setattr(handler, _INSTALLED, True)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
