"""Avro schemas, schema ids and the Confluent wire format (magic 0, 4-byte schema id, payload).

Schema ids come from a local registry file (schemas/registry.json by default) or, when a URL is
configured, from a Confluent-compatible Schema Registry. Readers resolve any writer schema they
can look up by id against their own reader schema, so adding an optional field never breaks an
older consumer.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import fastavro

from annstream.errors import InvalidEventError, SchemaError

__all__ = [
    "AD_SUBJECT",
    "ENGAGEMENT_SUBJECT",
    "NEIGHBOUR_SUBJECT",
    "HttpSchemaRegistry",
    "LocalSchemaRegistry",
    "SchemaRegistry",
    "frame",
    "load_schema",
    "open_registry",
    "schema_dir",
    "unframe",
]

logger = logging.getLogger(__name__)

AD_SUBJECT = "annstream.ads-value"
ENGAGEMENT_SUBJECT = "annstream.engagements-value"
NEIGHBOUR_SUBJECT = "annstream.neighbours-value"
_SUBJECT_FILES = {
    AD_SUBJECT: "ad_event.avsc",
    ENGAGEMENT_SUBJECT: "engagement_event.avsc",
    NEIGHBOUR_SUBJECT: "neighbour_list.avsc",
}
_HEADER = struct.Struct(">bI")
HEADER_SIZE = _HEADER.size


def schema_dir() -> Path:
    """Where the .avsc files are: inside the installed wheel, or schemas/ of a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_schemas", here.parent / "schemas"):
        if (candidate / "registry.json").exists():
            return candidate
    raise SchemaError(f"no schemas directory next to {here}; reinstall annstream")


def load_schema(name_or_path: str | Path) -> dict[str, Any]:
    """Parse one .avsc file (a bare name is looked up in schema_dir())."""
    path = Path(name_or_path)
    if not path.is_absolute() and not path.exists():
        path = schema_dir() / path
    try:
        parsed = cast(dict[str, Any], fastavro.parse_schema(json.loads(path.read_text("utf-8"))))
    except (OSError, ValueError, fastavro.schema.SchemaParseException) as exc:
        raise SchemaError(f"cannot load Avro schema {path}: {exc}") from exc
    return parsed


def frame(schema_id: int, payload: bytes) -> bytes:
    """Prefix an Avro payload with the Confluent header."""
    return _HEADER.pack(0, schema_id) + payload


def unframe(message: bytes | None) -> tuple[int, memoryview]:
    """Split a Confluent-framed message into (schema id, payload), rejecting what is not one."""
    if message is None:
        raise InvalidEventError("empty message (null value)")
    if len(message) <= HEADER_SIZE:
        raise InvalidEventError(
            f"truncated message: {len(message)} bytes, a framed Avro event needs more than "
            f"{HEADER_SIZE}"
        )
    magic, schema_id = _HEADER.unpack_from(message)
    if magic != 0:
        raise InvalidEventError(f"bad magic byte {magic}: not Confluent wire format")
    return schema_id, memoryview(message)[HEADER_SIZE:]


class SchemaRegistry(Protocol):
    """Maps subjects to the id writers put in the header, and ids to writer schemas."""

    def id_for(self, subject: str) -> int: ...

    def schema(self, schema_id: int) -> dict[str, Any]: ...


@dataclass(frozen=True)
class _Entry:
    id: int
    subject: str
    version: int
    schema: dict[str, Any]


class LocalSchemaRegistry:
    """Schema ids from a JSON file: `{"schemas": [{"id", "subject", "version", "file"}]}`.

    A subject's newest version is the one writers use; every listed id stays readable.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else schema_dir() / "registry.json"
        try:
            doc = json.loads(self.path.read_text("utf-8"))
            rows = doc["schemas"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SchemaError(f"cannot read schema registry file {self.path}: {exc}") from exc
        self._by_id: dict[int, _Entry] = {}
        self._latest: dict[str, _Entry] = {}
        for row in rows:
            try:
                source = row.get("schema") or row["file"]
                schema = (
                    cast(dict[str, Any], fastavro.parse_schema(source))
                    if isinstance(source, dict)
                    else load_schema(self.path.parent / source)
                )
                entry = _Entry(int(row["id"]), str(row["subject"]), int(row["version"]), schema)
            except (KeyError, TypeError, ValueError) as exc:
                raise SchemaError(f"{self.path}: bad registry entry {row!r}: {exc}") from exc
            if entry.id in self._by_id:
                raise SchemaError(f"{self.path}: schema id {entry.id} is listed twice")
            self._by_id[entry.id] = entry
            latest = self._latest.get(entry.subject)
            if latest is None or entry.version > latest.version:
                self._latest[entry.subject] = entry

    def id_for(self, subject: str) -> int:
        try:
            return self._latest[subject].id
        except KeyError:
            raise SchemaError(
                f"subject {subject!r} is not in {self.path}; known: {', '.join(self._latest)}"
            ) from None

    def schema(self, schema_id: int) -> dict[str, Any]:
        try:
            return self._by_id[schema_id].schema
        except KeyError:
            raise InvalidEventError(
                f"unknown schema id {schema_id}: not in {self.path}; register it there"
            ) from None


class HttpSchemaRegistry:
    """A Confluent-compatible Schema Registry over HTTP; writer ids are registered on first use."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._ids: dict[str, int] = {}
        self._schemas: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise KeyError(path) from exc
            raise SchemaError(f"schema registry {self.url}{path}: HTTP {exc.code}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise SchemaError(f"schema registry {self.url} unreachable: {exc}") from exc

    def id_for(self, subject: str) -> int:
        with self._lock:
            if subject not in self._ids:
                if subject not in _SUBJECT_FILES:
                    raise SchemaError(f"no local schema for subject {subject!r} to register")
                text = (schema_dir() / _SUBJECT_FILES[subject]).read_text("utf-8")
                reply = self._call("POST", f"/subjects/{subject}/versions", {"schema": text})
                self._ids[subject] = int(reply["id"])
            return self._ids[subject]

    def schema(self, schema_id: int) -> dict[str, Any]:
        with self._lock:
            if schema_id not in self._schemas:
                try:
                    reply = self._call("GET", f"/schemas/ids/{schema_id}")
                except KeyError:
                    raise InvalidEventError(
                        f"unknown schema id {schema_id}: the schema registry {self.url} "
                        "does not know it"
                    ) from None
                parsed = fastavro.parse_schema(json.loads(reply["schema"]))
                self._schemas[schema_id] = cast(dict[str, Any], parsed)
            return self._schemas[schema_id]


def open_registry(url: str = "", file: str = "") -> SchemaRegistry:
    """The Schema Registry at `url` if set, else the local registry `file` (or the shipped one)."""
    if url:
        return HttpSchemaRegistry(url)
    return LocalSchemaRegistry(file or None)
