"""Avro schemas, schema ids and the Confluent wire format (magic 0, 4-byte schema id, payload).

Schema ids come from a local registry file (schemas/registry.json by default) or, when a URL is
configured, from a Confluent Schema Registry through confluent-kafka's `SchemaRegistryClient`
(basic auth, TLS, `mock://` for tests). Readers resolve any writer schema they can look up by id
against their own reader schema, so adding an optional field never breaks an older consumer.

Code asks for the schema of a kind of record by its subject under the default topic names
(`AD_SUBJECT`, ...); a Schema Registry maps that to the subject of the configured topic,
`<topic>-value` (Confluent's TopicNameStrategy), so Java, Connect and ksqlDB find it there.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import unquote, urlsplit, urlunsplit

import fastavro

from annstream.config import KafkaConfig
from annstream.errors import InvalidEventError, SchemaError
from annstream.logs import add_secret, redact_text

__all__ = [
    "AD_SUBJECT",
    "ENGAGEMENT_SUBJECT",
    "HEAD_STATE_SUBJECT",
    "NEIGHBOUR_SUBJECT",
    "ConfluentSchemaRegistry",
    "LocalSchemaRegistry",
    "SchemaRegistry",
    "frame",
    "load_schema",
    "open_registry",
    "schema_dir",
    "topic_subjects",
    "unframe",
]

logger = logging.getLogger(__name__)

AD_SUBJECT = "annstream.ads-value"
ENGAGEMENT_SUBJECT = "annstream.engagements-value"
NEIGHBOUR_SUBJECT = "annstream.neighbours-value"
HEAD_STATE_SUBJECT = "annstream.head-state-value"
_SUBJECT_FILES = {
    AD_SUBJECT: "ad_event.avsc",
    ENGAGEMENT_SUBJECT: "engagement_event.avsc",
    NEIGHBOUR_SUBJECT: "neighbour_list.avsc",
    HEAD_STATE_SUBJECT: "head_state.avsc",
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


def topic_subjects(kafka: KafkaConfig) -> dict[str, str]:
    """The registry subject of each kind of record: `<configured topic>-value` (TopicNameStrategy)."""
    return {
        AD_SUBJECT: f"{kafka.ad_topic}-value",
        ENGAGEMENT_SUBJECT: f"{kafka.engagement_topic}-value",
        NEIGHBOUR_SUBJECT: f"{kafka.results_topic}-value"
        if kafka.results_topic
        else NEIGHBOUR_SUBJECT,
        HEAD_STATE_SUBJECT: f"{kafka.head_state_topic}-value",
    }


def _client_settings(kafka: KafkaConfig) -> tuple[dict[str, Any], str]:
    """(SchemaRegistryClient settings, the URLs as messages may show them).

    Credentials move from the URLs' `user:password@` to `basic.auth.user.info`, so that no URL
    the client may quote in an error carries them.
    """
    urls, user, password = [], kafka.schema_registry_user, kafka.schema_registry_password
    for raw in (u.strip() for u in kafka.schema_registry_url.split(",") if u.strip()):
        parts = urlsplit(raw)
        if parts.username or parts.password:
            if kafka.schema_registry_user or kafka.schema_registry_password:
                raise SchemaError(
                    "kafka.schema_registry_url carries user:password@ and "
                    "kafka.schema_registry_user/password are set too: keep one of them"
                )
            user, password = unquote(parts.username or ""), unquote(parts.password or "")
            netloc = parts.netloc.rpartition("@")[2]
            raw = urlunsplit(parts._replace(netloc=netloc))
        urls.append(raw)
    settings: dict[str, Any] = {"url": ",".join(urls), "timeout": 10}
    if user or password:
        add_secret(password)
        settings["basic.auth.user.info"] = f"{user}:{password}"
    for key, value in (
        ("ssl.ca.location", kafka.schema_registry_ca_location),
        ("ssl.certificate.location", kafka.schema_registry_cert_location),
        ("ssl.key.location", kafka.schema_registry_key_location),
    ):
        if value:
            settings[key] = value
    return settings, settings["url"]


class ConfluentSchemaRegistry:
    """A Confluent Schema Registry through confluent-kafka's client; writer ids on first use.

    `subjects` maps annstream's subjects to those of the configured topics (`topic_subjects`).
    With `auto_register` a writer registers its schema (dev); without, it only looks the schema
    up under its subject and refuses to start when it is missing (production: schemas are
    registered ahead, by CI or an operator, under the registry's compatibility rules).
    """

    def __init__(
        self,
        client: Any,
        *,
        subjects: Mapping[str, str] | None = None,
        auto_register: bool = True,
        where: str = "",
    ) -> None:
        self.client = client
        self.subjects = dict(subjects or {})
        self.auto_register = auto_register
        self.where = redact_text(where or str(client.config().get("url", "")))
        self._ids: dict[str, int] = {}
        self._schemas: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, kafka: KafkaConfig) -> ConfluentSchemaRegistry:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        settings, where = _client_settings(kafka)
        try:
            client = SchemaRegistryClient.new_client(settings)
        except (ValueError, TypeError, OSError) as exc:
            raise SchemaError(
                f"cannot set up the schema registry client for {redact_text(where)}: "
                f"{redact_text(str(exc))}; check the kafka.schema_registry_* settings"
            ) from None
        return cls(
            client,
            subjects=topic_subjects(kafka),
            auto_register=kafka.schema_registry_auto_register,
            where=where,
        )

    def _failure(self, exc: Exception, doing: str) -> SchemaError:
        from confluent_kafka.schema_registry import SchemaRegistryError

        if isinstance(exc, SchemaRegistryError):
            why = f"HTTP {exc.http_status_code}: {exc.error_message}"
        else:
            why = f"cannot reach it ({type(exc).__name__}: {exc})"
        return SchemaError(redact_text(f"schema registry {self.where}, {doing}: {why}"))

    def id_for(self, subject: str) -> int:
        from confluent_kafka.schema_registry import Schema, SchemaRegistryError

        with self._lock:
            if subject in self._ids:
                return self._ids[subject]
            if subject not in _SUBJECT_FILES:
                raise SchemaError(f"no local schema for subject {subject!r} to register")
            file = _SUBJECT_FILES[subject]
            schema = Schema((schema_dir() / file).read_text("utf-8"), "AVRO")
            target = self.subjects.get(subject, subject)
            try:
                if self.auto_register:
                    schema_id = int(self.client.register_schema(target, schema))
                else:
                    schema_id = int(self.client.lookup_schema(target, schema).schema_id)
            except SchemaRegistryError as exc:
                if not self.auto_register and exc.http_status_code == 404:
                    raise SchemaError(
                        f"schema registry {self.where} has no {file} under subject {target!r}, "
                        "and kafka.schema_registry_auto_register is false: register it there "
                        "first, or allow auto-registration"
                    ) from None
                action = "registering" if self.auto_register else "looking up"
                raise self._failure(exc, f"{action} {file} under {target!r}") from None
            except Exception as exc:  # httpx and ssl errors: the client wraps none of them
                raise self._failure(exc, f"subject {target!r}") from None
            self._ids[subject] = schema_id
            return schema_id

    def schema(self, schema_id: int) -> dict[str, Any]:
        from confluent_kafka.schema_registry import SchemaRegistryError

        with self._lock:
            if schema_id in self._schemas:
                return self._schemas[schema_id]
            try:
                found = self.client.get_schema(schema_id)
            except SchemaRegistryError as exc:
                if exc.http_status_code == 404:
                    raise InvalidEventError(
                        f"unknown schema id {schema_id}: the schema registry does not know it"
                    ) from None
                raise self._failure(exc, f"schema id {schema_id}") from None
            except Exception as exc:
                raise self._failure(exc, f"schema id {schema_id}") from None
            kind = found.schema_type or "AVRO"
            if kind != "AVRO":
                raise InvalidEventError(f"schema id {schema_id} is a {kind} schema, not Avro")
            try:
                parsed = fastavro.parse_schema(json.loads(found.schema_str))
            except (ValueError, fastavro.schema.SchemaParseException) as exc:
                raise InvalidEventError(
                    f"schema id {schema_id} is no Avro schema fastavro can read "
                    f"(references are not supported): {exc}"
                ) from None
            self._schemas[schema_id] = cast(dict[str, Any], parsed)
            return self._schemas[schema_id]


def open_registry(config: KafkaConfig | str | None = None, file: str = "") -> SchemaRegistry:
    """The Schema Registry the Kafka settings name, else the local registry file (or the shipped
    one). A bare URL (and `file`) is accepted too, with the default topics' subjects."""
    if not isinstance(config, KafkaConfig):
        config = KafkaConfig(schema_registry_url=config or "", schema_registry_file=file)
    if config.schema_registry_url:
        return ConfluentSchemaRegistry.from_config(config)
    return LocalSchemaRegistry(config.schema_registry_file or None)
