"""All settings of annstream in one place.

A `Config` is built from defaults, then a TOML file, then environment variables
(`ANNSTREAM_<SECTION>__<FIELD>`, e.g. `ANNSTREAM_KAFKA__BOOTSTRAP_SERVERS`), then explicit
overrides (command-line flags), and is frozen afterwards. Unknown keys, values of the wrong type
and values out of range (`validate`) raise `ConfigError` naming the key and what is allowed,
before anything connects, so a typo never passes silently. No message shows a secret: the value
of a secret-looking key is never echoed, and every secret read is handed to `logs.add_secret`.

A table setting (`kafka.client`) takes one variable per entry, which adds to or replaces that
entry of the file's table: `ANNSTREAM_KAFKA__CLIENT__SASL_PASSWORD` sets `sasl.password` (`_`
becomes `.`), so a value may contain commas. `ANNSTREAM_KAFKA__CLIENT=k=v,k2=v2` replaces the
whole table and cannot carry a value with a comma.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from annstream.errors import ConfigError
from annstream.logs import MASK, add_secret, add_url_secrets, is_secret_key, redact_text

__all__ = [
    "Config",
    "DriftConfig",
    "HeadsConfig",
    "IndexConfig",
    "KafkaConfig",
    "MAX_TTL_S",
    "RefreshConfig",
    "ServiceConfig",
    "SnapshotConfig",
    "StoreConfig",
    "load_config",
    "validate",
]

ENV_PREFIX = "ANNSTREAM_"
MAX_TTL_S = 315_360_000  # 10 years: a real Aerospike server answers a longer TTL with result 4


@dataclass(frozen=True)
class KafkaConfig:
    """Broker, topics and client settings; `client` is passed to librdkafka as is (SASL/SSL).

    `max_message_bytes` is librdkafka's default message limit (1,000,000 bytes, not 1 MiB) and
    the `message.max.bytes` of annstream's producers: ad and engagement messages over it are
    dead-lettered without decoding (as a reference when the dead letter itself would not fit).
    An event whose event time is more than `max_event_skew_s` seconds ahead of the consumer's
    clock (a clock gone wrong, microseconds for milliseconds) is dead-lettered, as is a
    negative event time.
    The head queries' decay clock never runs ahead of the wall clock by more than
    `max_event_skew_s` either. A replica that gains an engagement partition restores its head
    state from `head_state_topic` (the latest snapshot and the changes after it) within
    `head_state_restore_timeout_s`.
    With `schema_registry_url` set, schema ids come from that Confluent Schema Registry under
    the subjects `<topic>-value` (TopicNameStrategy); basic auth from `user:password@` in the
    URL or `schema_registry_user`/`_password`, TLS from the `_location` settings. Writers
    register their schema unless `schema_registry_auto_register` is false (production: the
    schemas are registered ahead, and a writer whose schema is missing refuses to start).
    """

    bootstrap_servers: str = "127.0.0.1:9092"
    ad_topic: str = "annstream.ads"
    engagement_topic: str = "annstream.engagements"
    dead_letter_topic: str = "annstream.dead-letter"
    results_topic: str = ""
    head_state_topic: str = "annstream.head-state"
    group_id: str = "annstream-refresher"
    schema_registry_url: str = ""
    schema_registry_file: str = ""
    schema_registry_user: str = ""
    schema_registry_password: str = ""
    schema_registry_auto_register: bool = True
    schema_registry_ca_location: str = ""
    schema_registry_cert_location: str = ""
    schema_registry_key_location: str = ""
    max_message_bytes: int = 1_000_000
    max_event_skew_s: float = 600.0
    head_state_restore_timeout_s: float = 60.0
    create_topics: bool = False
    topic_partitions: int = -1
    topic_replication: int = -1
    compression_type: str = "lz4"
    client: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1000 <= self.max_message_bytes <= 1_000_000_000:
            raise ConfigError(
                f"kafka.max_message_bytes must be between 1000 and 1000000000 (librdkafka's "
                f"range), got {self.max_message_bytes}"
            )
        if not self.max_event_skew_s > 0:
            raise ConfigError(
                "kafka.max_event_skew_s must be a positive number of seconds (inf turns the "
                f"bound off), got {self.max_event_skew_s}"
            )


@dataclass(frozen=True)
class IndexConfig:
    """The live Faiss IVF index: `metric` is cosine (normalised inner product), ip or l2.

    Without a snapshot or `training_file`, the first index is trained on the ads consumed: at
    `train_size` ads, or on what is there once the ad topic is caught up (the end offsets taken
    at start reached, when the topic held ads then) or `train_wait_s` seconds after start,
    whichever comes first, but never on fewer than `nlist` ads (it keeps waiting and says so
    in the log and /status).
    `recall_target` (0 = off), e.g. 0.95: the service raises nprobe from its stored-recall
    monitor (recall@refresh.k) until the target holds, recomputing every list at
    `refresh.full_recompute_per_batch` a micro-batch, and halves nlist at a retrain when nprobe
    reaches a quarter of the lists; the nprobe reached is kept in snapshots.
    """

    dim: int = 50
    metric: str = "cosine"
    kind: str = "ivfflat"
    nlist: int = 1024
    nprobe: int = 32
    pq_m: int = 10
    pq_nbits: int = 8
    train_size: int = 50_000
    train_wait_s: float = 300.0
    training_file: str = ""
    recall_target: float = 0.0


@dataclass(frozen=True)
class SnapshotConfig:
    """Index snapshots: where, how often (seconds or events, whichever first), how many kept."""

    dir: str = "var/snapshots"
    every_s: float = 60.0
    every_events: int = 100_000
    keep: int = 3


@dataclass(frozen=True)
class DriftConfig:
    """When to retrain the coarse quantizer in the background.

    Recall (recall@refresh.k of the IVF against exact search) is measured on `recall_sample`
    head queries, what is served (on reservoir ads before there are any), every
    `check_every_batches` micro-batches and at once when a stored-recall sample falls under
    `service.recall_warn_below`. It is judged against the first measurement of the same index
    (right after training or start-up): a drop of `recall_drop` triggers a retrain. nprobe, not drift, limits the absolute
    figure, and retraining cannot raise it; `recall_threshold` (0 = off) adds an absolute floor.
    """

    enabled: bool = True
    imbalance_threshold: float = 1.6
    recall_drop: float = 0.03
    recall_threshold: float = 0.0
    recall_sample: int = 200
    check_every_batches: int = 50
    reservoir_size: int = 100_000


@dataclass(frozen=True)
class HeadsConfig:
    """Head queries: decayed engagement score, entry threshold with hysteresis, bounded memory.

    With `top_n` > 0 a query must also rank in the top N to enter, and leaves once it falls
    out of the top N * (1 + `top_n_slack`).
    """

    half_life_s: float = 3600.0
    enter_score: float = 5.0
    exit_score: float = 2.5
    top_n: int = 0
    top_n_slack: float = 0.1
    max_tracked: int = 1_000_000


@dataclass(frozen=True)
class RefreshConfig:
    """Micro-batches: every `batch_ms` or `batch_events`, whichever comes first.

    Each head query keeps `k` + `margin` neighbours; `nprobe` 0 means the index's own.
    `scan_k`: changed ads merged per head query and micro-batch; a query with more qualifying
    candidates is searched again in full instead. The merge is exact for any number, so the
    default never caps it: a cap only trades merges for (slower) full searches, which
    large catch-up batches would otherwise pay for most lists.
    `exclude_self`: leave a query's own id out of its list (similar items, where a query is
    itself an ad).
    `retired_max_mb`: memory for the lists of queries that left the head set and stay readable
    until `store.exit_ttl_s` (the refresher removes deleted ads from them); over it, the lists
    expiring soonest are rewritten empty and forgotten.
    Catching up (the oldest ad event waiting is `catch_up_behind_ms` old, e.g. a backfill or a
    restart; 0 = never), a micro-batch grows to `catch_up_events` or `catch_up_ms`, whichever
    comes first, or until a poll finds nothing more: each changed list is then written once
    per large batch instead of once per `batch_events`.
    """

    k: int = 100
    margin: int = 20
    batch_ms: int = 250
    batch_events: int = 5_000
    full_recompute_per_batch: int = 5_000
    nprobe: int = 0
    scan_k: int = 1_000_000
    exclude_self: bool = False
    retired_max_mb: int = 256
    catch_up_events: int = 50_000
    catch_up_ms: int = 10_000
    catch_up_behind_ms: int = 30_000


@dataclass(frozen=True)
class StoreConfig:
    """The neighbour store: `sqlite:///path` embedded, `aerospike://host:port/namespace/set`.

    `sqlite:///relative/path.db` is relative to the working directory,
    `sqlite:////absolute/path.db` (four slashes) is absolute. `ttl_s` and `exit_ttl_s`: -2 keep
    the stored TTL, -1 never expire, 0 namespace default, up to 315,360,000 s (10 years,
    Aerospike's limit). `retries` / `retry_backoff_s` bound the connection attempts at
    start-up; a store call itself tries once. Writes that fail stay pending in the service and
    are retried after a backoff starting at `retry_backoff_s` and doubling up to
    `retry_backoff_max_s`, while it keeps polling with consumption paused.
    Aerospike: a micro-batch is written in `batch_write` calls of at most `write_batch`
    records, `write_threads` calls at a time, each within `timeout_ms`.
    `neighbour_metadata`: store each neighbour's campaign and advertiser id (the `cmp` and `adv`
    bins); off, a record is 1.5 KB instead of 3.4 KB at K 100 + 20 and serving can filter by
    ad id only.
    `overlap_writes`: a micro-batch's store write runs on a writer thread while the next one
    is computed; its changelog and commit still wait for the write, in order. Off by default:
    on 2 shared cores the writer thread took CPU from the refresh and lost (`bench freshness`).
    """

    url: str = "sqlite:///var/annstream.db"
    ttl_s: int = 0
    on_head_exit: str = "expire"
    exit_ttl_s: int = 86_400
    retries: int = 3
    retry_backoff_s: float = 0.2
    retry_backoff_max_s: float = 10.0
    timeout_ms: int = 1_000
    write_batch: int = 500
    write_threads: int = 1
    neighbour_metadata: bool = True
    overlap_writes: bool = False
    user: str = ""
    password: str = ""
    tls_name: str = ""
    tls_cafile: str = ""

    def __post_init__(self) -> None:
        for key in ("ttl_s", "exit_ttl_s"):
            value = getattr(self, key)
            if not -2 <= value <= MAX_TTL_S:
                raise ConfigError(
                    f"store.{key} = {value} is out of range: use -2 (keep), -1 (never), "
                    f"0 (namespace default) or 1..{MAX_TTL_S} seconds (10 years, the most "
                    "Aerospike accepts; it refuses a longer TTL on every write)"
                )


@dataclass(frozen=True)
class ServiceConfig:
    """The long-running process: metrics port (0 = off), logging, shutdown bound.

    Every `recall_every_batches` micro-batches (0 = never) `recall_sample` head queries' stored
    lists are compared with an exact search (swept a 20 ms slice of lists per stored
    micro-batch); a recall@K under `recall_warn_below` is logged and asks for a drift check
    at once; `index.recall_target` steers nprobe from the same samples.
    The default suits the default index (IVF1024, nprobe 32: recall@100 ~0.82 on GloVe); set it
    from `annstream tune --k K --target T` together with nprobe.
    `/healthz` turns 503 when no loop step was seen for `health_stale_s`, or when the store has
    not accepted writes for `store_unhealthy_after_s`. A micro-batch waits at most
    `flush_timeout_s` for its head-state changelog, then is retried like a store outage.
    Every `verify_every_s` (0 = never) the stored lists of `verify_sample` head queries (round
    robin over all of them) are read back; missing or older ones are rewritten.
    """

    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    log_json: bool = False
    log_level: str = "INFO"
    shutdown_timeout_s: float = 30.0
    flush_timeout_s: float = 5.0
    recall_every_batches: int = 100
    recall_sample: int = 100
    recall_warn_below: float = 0.75
    health_stale_s: float = 60.0
    store_unhealthy_after_s: float = 30.0
    verify_every_s: float = 10.0
    verify_sample: int = 1_000


@dataclass(frozen=True)
class Config:
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)

    def replace(self, section: str, **values: Any) -> Config:
        """A copy with some fields of one section changed (values are checked like the file's)."""
        return validate(_merge(self, {section: values}, source="override"))


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_SCALARS = (str, int, float, bool)


def _kind(value: Any) -> str:
    """A value's kind for an error message, never its content."""
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def _shown(value: Any, key: str) -> str:
    """`value` as an error message may show it: scalars of ordinary keys only, redacted."""
    if is_secret_key(key) or not isinstance(value, _SCALARS):
        return _kind(value)
    return repr(redact_text(value)) if isinstance(value, str) else repr(value)


def _flatten(table: Mapping[str, Any], name: str, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, string value) of a settings table; TOML `sasl.password = "x"` nests."""
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            yield from _flatten(v, name, f"{key}.")
        elif isinstance(v, bool):
            yield key, "true" if v else "false"
        elif isinstance(v, str | int | float):
            yield key, str(v)
        else:
            raise ConfigError(
                f"expected a string, number or boolean for {name}.{key}, got {_kind(v)}"
            )


def _entry_variable(name: str, entry: str) -> str:
    return f"{ENV_PREFIX}{name.upper().replace('.', '__')}__{entry.upper().replace('.', '_')}"


def _pairs(text: str, name: str) -> dict[str, str]:
    """`k=v,k2=v2` (the whole-table variable). A secret may hold a comma, so none is taken here."""
    pairs = [p for p in text.split(",") if p.strip()]
    if any("=" not in p for p in pairs):
        raise ConfigError(
            f"expected key=value pairs separated by commas for {name}; a value that contains "
            f"a comma needs its own variable, e.g. {_entry_variable(name, 'sasl.password')}"
        )
    table = dict(p.split("=", 1) for p in pairs)
    secret = [k for k in table if is_secret_key(k)]
    if secret:
        raise ConfigError(
            f"a comma-separated {name} cannot carry the secret {secret[0]} (a comma in the "
            f"value would split it): pass it as {_entry_variable(name, secret[0])}"
        )
    return table


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """`value` as type `tp`; ConfigError naming the setting `name` (section.key) if it is not.

    Messages say 'expected ... for KEY': `KEY: value` would look like a secret to redact_text."""
    key = name.rpartition(".")[2]
    origin = typing.get_origin(tp)
    if origin is dict:
        if isinstance(value, str):
            value = _pairs(value, name)
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a table of settings for {name}, got {_kind(value)}")
        return dict(_flatten(value, name))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"expected true or false for {name}, got {_shown(value, key)}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"expected a number for {name}, got {_shown(value, key)}")
        try:
            return tp(value) if tp is float or not isinstance(value, float) else int(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"expected {tp.__name__} for {name}, got {_shown(value, key)}"
            ) from None
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"expected a string for {name}, got {_shown(value, key)}")
        return str(value)
    raise ConfigError(f"unsupported type {tp!r} of {name}")  # pragma: no cover


def _remember_secrets(key: str, value: Any) -> None:
    """Hand every secret in a raw setting to logs.add_secret before anything can echo it."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            _remember_secrets(str(k), v)
    elif isinstance(value, str):
        if is_secret_key(key):
            add_secret(value)
        add_url_secrets(value)
    elif isinstance(value, list | tuple):
        for v in value:
            _remember_secrets(key, v)


def _merge(cfg: Config, data: Mapping[str, Any], source: str) -> Config:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    changes: dict[str, Any] = {}
    for name, values in data.items():
        if name not in sections:
            raise ConfigError(
                f"{source}: unknown section [{name}]; known sections: {', '.join(sections)}"
            )
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: [{name}] must be a table of settings")
        current = changes.get(name, getattr(cfg, name))
        hints = typing.get_type_hints(type(current))
        known = {f.name for f in dataclasses.fields(current)}
        updates = {}
        for key, value in values.items():
            _remember_secrets(key, value)
            if key not in known:
                raise ConfigError(
                    f"{source}: unknown setting {name}.{key}; known: {', '.join(sorted(known))}"
                )
            try:
                updates[key] = _coerce(value, hints[key], f"{name}.{key}")
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
            _remember_secrets(key, updates[key])
        changes[name] = dataclasses.replace(current, **updates)
    return dataclasses.replace(cfg, **changes)


def _env_tables(
    env: Mapping[str, str],
) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, dict[str, str]]]]:
    """(whole settings, entries of table settings) from ANNSTREAM_* variables.

    `ANNSTREAM_KAFKA__CLIENT__SSL_CA_LOCATION` is the entry `ssl.ca.location` of kafka.client.
    """
    table: dict[str, dict[str, str]] = {}
    entries: dict[str, dict[str, dict[str, str]]] = {}
    for key, value in sorted(env.items()):
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        section, _, name = key[len(ENV_PREFIX) :].partition("__")
        name, nested, entry = name.partition("__")
        if not nested:
            table.setdefault(section.lower(), {})[name.lower()] = value
            continue
        if not entry.strip("_"):
            raise ConfigError(f"environment: {key} names no entry after {name}__")
        _remember_secrets(entry, value)
        fields = entries.setdefault(section.lower(), {})
        fields.setdefault(name.lower(), {})[entry.lower().replace("_", ".")] = value
    return table, entries


def _merge_entries(
    cfg: Config, entries: Mapping[str, Mapping[str, Mapping[str, str]]], source: str
) -> Config:
    """Add `entries` to the table settings they name (kafka.client, ...), keeping the others."""
    for section, fields in entries.items():
        current = getattr(cfg, section, None)
        if current is None:
            known = ", ".join(f.name for f in dataclasses.fields(Config))
            raise ConfigError(f"{source}: unknown section [{section}]; known sections: {known}")
        hints = typing.get_type_hints(type(current))
        for name, values in fields.items():
            if typing.get_origin(hints.get(name)) is not dict:
                tables = [n for n, tp in hints.items() if typing.get_origin(tp) is dict]
                raise ConfigError(
                    f"{source}: {section}.{name} is not a table of settings, so it takes no "
                    f"entries; tables: {', '.join(f'{section}.{t}' for t in tables) or 'none'}"
                )
            merged = {**getattr(current, name), **values}
            cfg = _merge(cfg, {section: {name: merged}}, source)
    return cfg


# What the code accepts; tests check these against the modules that use them.
METRICS = ("cosine", "ip", "l2")
INDEX_KINDS = ("ivfflat", "ivfpq")
HEAD_EXIT_POLICIES = ("expire", "delete")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
STORE_URL_FORMS = "sqlite:///path or aerospike://host:port/namespace/set"
REGISTRY_URL_SCHEMES = ("http://", "https://", "mock://")
COMPRESSION_TYPES = ("none", "gzip", "snappy", "lz4", "zstd")
MAX_TTL_S = 10 * 365 * 86_400
"""Aerospike's TTL cap (10 years); -2 keeps a record's TTL, -1 never expires, 0 = default."""
_TOPIC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _problems(cfg: Config) -> Iterator[str]:
    """One message per bad value: the key, the value (unless secret) and what is allowed."""

    def bad(section: str, key: str, allowed: str) -> str:
        value = getattr(getattr(cfg, section), key)
        return f"{section}.{key} = {MASK if is_secret_key(key) else _shown(value, key)}: {allowed}"

    def at_least(section: str, low: float, *keys: str) -> Iterator[str]:
        for key in keys:
            if getattr(getattr(cfg, section), key) < low:
                yield bad(section, key, f"must be >= {low:g}")

    def positive(section: str, *keys: str) -> Iterator[str]:
        for key in keys:
            if getattr(getattr(cfg, section), key) <= 0:
                yield bad(section, key, "must be > 0")

    def fraction(section: str, *keys: str) -> Iterator[str]:
        for key in keys:
            if not 0.0 <= getattr(getattr(cfg, section), key) <= 1.0:
                yield bad(section, key, "must be between 0 and 1")

    def one_of(section: str, key: str, allowed: tuple[str, ...]) -> Iterator[str]:
        if getattr(getattr(cfg, section), key) not in allowed:
            yield bad(section, key, f"use one of {', '.join(allowed)}")

    k = cfg.kafka
    for key in ("bootstrap_servers", "group_id"):
        if not getattr(k, key).strip():
            yield bad("kafka", key, "must not be empty")
    for key in ("ad_topic", "engagement_topic", "dead_letter_topic", "head_state_topic"):
        topic = getattr(k, key)
        if not topic or len(topic) > 249 or not set(topic) <= _TOPIC_CHARS or topic in (".", ".."):
            yield bad("kafka", key, "a Kafka topic name is 1-249 of a-z A-Z 0-9 . _ -")
    if k.results_topic and (len(k.results_topic) > 249 or not set(k.results_topic) <= _TOPIC_CHARS):
        yield bad(
            "kafka", "results_topic", "a Kafka topic name (1-249 of a-z A-Z 0-9 . _ -) or empty"
        )
    topics = {
        key: getattr(k, key)
        for key in (
            "ad_topic",
            "engagement_topic",
            "dead_letter_topic",
            "head_state_topic",
            "results_topic",
        )
        if getattr(k, key)
    }
    for key, topic in topics.items():
        same = [other for other, t in topics.items() if t == topic and other < key]
        if same:
            yield bad("kafka", key, f"must differ from kafka.{same[0]}: each topic has one use")
    yield from positive("kafka", "head_state_restore_timeout_s")
    yield from one_of("kafka", "compression_type", COMPRESSION_TYPES)
    for key in ("topic_partitions", "topic_replication"):
        if getattr(k, key) == 0 or getattr(k, key) < -1:
            yield bad("kafka", key, "must be -1 (the broker's default) or >= 1")
    urls = [u.strip() for u in k.schema_registry_url.split(",") if u.strip()]
    if any(not u.startswith(REGISTRY_URL_SCHEMES) for u in urls):
        yield bad(
            "kafka", "schema_registry_url", f"use {', '.join(REGISTRY_URL_SCHEMES)} URLs or empty"
        )
    if k.schema_registry_key_location and not k.schema_registry_cert_location:
        yield bad("kafka", "schema_registry_key_location", "needs schema_registry_cert_location")
    if any(not key.strip() for key in k.client):
        yield "kafka.client has an entry with an empty name"

    i = cfg.index
    yield from positive("index", "dim", "nlist", "nprobe", "train_size")
    yield from one_of("index", "metric", METRICS)
    yield from one_of("index", "kind", INDEX_KINDS)
    if 0 < i.nlist < i.nprobe:
        yield bad("index", "nprobe", f"must be <= index.nlist ({i.nlist}), the lists there are")
    yield from at_least("index", 0, "train_wait_s")
    yield from fraction("index", "recall_target")
    if 0 < i.train_size < i.nlist:
        yield bad("index", "train_size", f"must be >= index.nlist ({i.nlist}) to train the lists")
    if i.kind == "ivfpq":
        if i.pq_m <= 0 or (i.dim > 0 and i.dim % i.pq_m):
            yield bad("index", "pq_m", f"must be a positive divisor of index.dim ({i.dim})")
        if not 1 <= i.pq_nbits <= 16:
            yield bad("index", "pq_nbits", "must be between 1 and 16")

    yield from at_least("snapshot", 0, "every_s", "every_events")  # 0: that trigger is off
    yield from positive("snapshot", "keep")
    if not cfg.snapshot.dir.strip():
        yield bad("snapshot", "dir", "must not be empty")

    yield from at_least("drift", 1.0, "imbalance_threshold")
    yield from fraction("drift", "recall_drop", "recall_threshold")
    yield from positive("drift", "recall_sample", "check_every_batches", "reservoir_size")

    h = cfg.heads
    yield from positive("heads", "half_life_s", "max_tracked")
    yield from at_least("heads", 0, "enter_score", "exit_score", "top_n", "top_n_slack")
    if h.exit_score > h.enter_score:
        yield bad("heads", "exit_score", f"must be <= heads.enter_score ({h.enter_score:g})")

    r = cfg.refresh
    yield from positive("refresh", "k", "batch_ms", "batch_events", "full_recompute_per_batch")
    yield from at_least("refresh", 0, "margin", "nprobe", "scan_k", "catch_up_behind_ms")
    if r.catch_up_events < r.batch_events:
        yield bad(
            "refresh", "catch_up_events", f"must be >= refresh.batch_events ({r.batch_events})"
        )
    if r.catch_up_ms < r.batch_ms:
        yield bad("refresh", "catch_up_ms", f"must be >= refresh.batch_ms ({r.batch_ms})")
    if i.nlist > 0 and r.nprobe > i.nlist:
        yield bad("refresh", "nprobe", f"must be <= index.nlist ({i.nlist}); 0 = index.nprobe")

    st = cfg.store
    url = st.url
    if not (
        (url.startswith("sqlite:///") and len(url) > len("sqlite:///"))
        or url.startswith("aerospike://")
    ):
        yield bad("store", "url", f"use {STORE_URL_FORMS}")
    yield from one_of("store", "on_head_exit", HEAD_EXIT_POLICIES)
    yield from at_least("store", 0, "retries", "retry_backoff_s")
    yield from positive("store", "timeout_ms", "write_batch", "write_threads")

    sv = cfg.service
    if not 0 <= sv.metrics_port <= 65535:
        yield bad("service", "metrics_port", "must be 0 (off) or a TCP port, 1..65535")
    if not sv.metrics_host.strip():
        yield bad("service", "metrics_host", "must not be empty (0.0.0.0 for every interface)")
    if sv.log_level.upper() not in LOG_LEVELS:
        yield bad("service", "log_level", f"use one of {', '.join(LOG_LEVELS)}")
    yield from positive(
        "service", "shutdown_timeout_s", "flush_timeout_s", "recall_sample", "health_stale_s"
    )
    yield from at_least("service", 0, "recall_every_batches")
    if i.recall_target > 0 and sv.recall_every_batches == 0:
        yield bad(
            "index",
            "recall_target",
            "needs stored-recall samples: set service.recall_every_batches > 0",
        )
    yield from fraction("service", "recall_warn_below")


def validate(cfg: Config) -> Config:
    """`cfg` if every value is in range, else ConfigError naming each bad one (one line).

    Limits that must hold however a section is built (the message limit and event-time skew in
    KafkaConfig, the store TTLs) are checked by that section's `__post_init__`, already when
    the file or environment is merged; everything else is checked here.
    """
    problems = list(_problems(cfg))
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Defaults, then the TOML file at `path`, then `ANNSTREAM_*` variables, then `overrides`,
    checked by `validate`."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {p} not found: pass an existing TOML file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
        cfg = _merge(cfg, data, source=str(p))
    table, entries = _env_tables(os.environ if env is None else env)
    cfg = _merge(cfg, table, source="environment")
    cfg = _merge_entries(cfg, entries, source="environment")
    if overrides:
        cfg = _merge(cfg, overrides, source="override")
    return validate(cfg)
