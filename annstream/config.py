"""All settings of annstream in one place.

A `Config` is built from defaults, then a TOML file, then environment variables
(`ANNSTREAM_<SECTION>__<FIELD>`, e.g. `ANNSTREAM_KAFKA__BOOTSTRAP_SERVERS`), then explicit
overrides (command-line flags), and is frozen afterwards. Unknown keys and values of the
wrong type raise `ConfigError` naming the key, so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from annstream.errors import ConfigError

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
]

ENV_PREFIX = "ANNSTREAM_"
MAX_TTL_S = 315_360_000  # 10 years: a real Aerospike server answers a longer TTL with result 4


@dataclass(frozen=True)
class KafkaConfig:
    """Broker, topics and client settings; `client` is passed to librdkafka as is (SASL/SSL).

    Ad and engagement messages over `max_message_bytes` are dead-lettered without decoding.
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
    max_message_bytes: int = 1 << 20
    client: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class IndexConfig:
    """The live Faiss IVF index: `metric` is cosine (normalised inner product), ip or l2."""

    dim: int = 50
    metric: str = "cosine"
    kind: str = "ivfflat"
    nlist: int = 1024
    nprobe: int = 32
    pq_m: int = 10
    pq_nbits: int = 8
    train_size: int = 50_000
    training_file: str = ""


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

    Recall is judged against the first measurement of the same index (right after training or
    start-up): a drop of `recall_drop` triggers a retrain. nprobe, not drift, limits the absolute
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
    `scan_k`: changed ads considered per head query and micro-batch; a query with more
    qualifying candidates is searched again in full.
    `exclude_self`: leave a query's own id out of its list (similar items, where a query is
    itself an ad).
    `retired_max_mb`: memory for the lists of queries that left the head set and stay readable
    until `store.exit_ttl_s` (the refresher removes deleted ads from them); over it, the lists
    expiring soonest are rewritten empty and forgotten.
    """

    k: int = 100
    margin: int = 20
    batch_ms: int = 250
    batch_events: int = 5_000
    full_recompute_per_batch: int = 5_000
    nprobe: int = 0
    scan_k: int = 16
    exclude_self: bool = False
    retired_max_mb: int = 256


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
    """

    url: str = "sqlite:///var/annstream.db"
    ttl_s: int = 0
    on_head_exit: str = "expire"
    exit_ttl_s: int = 86_400
    retries: int = 3
    retry_backoff_s: float = 0.2
    retry_backoff_max_s: float = 10.0
    timeout_ms: int = 1_000
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
    lists are compared with an exact search; a recall@K under `recall_warn_below` is logged.
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
        return _merge(self, {section: values}, source="override")


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is dict:
        if isinstance(value, str):
            pairs = [p for p in value.split(",") if p.strip()]
            try:
                value = dict(p.split("=", 1) for p in pairs)
            except ValueError:
                raise ConfigError(
                    f"{where}: expected key=value pairs separated by commas"
                ) from None
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table of settings, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        ):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return tp(value) if tp is float or not isinstance(value, float) else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported setting type {tp!r}")  # pragma: no cover


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
            if key not in known:
                raise ConfigError(
                    f"{source}: unknown setting {name}.{key}; known: {', '.join(sorted(known))}"
                )
            updates[key] = _coerce(value, hints[key], f"{source}: {name}.{key}")
        changes[name] = dataclasses.replace(current, **updates)
    return dataclasses.replace(cfg, **changes)


def _env_table(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    table: dict[str, dict[str, str]] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        section, _, name = key[len(ENV_PREFIX) :].partition("__")
        table.setdefault(section.lower(), {})[name.lower()] = value
    return table


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Defaults, then the TOML file at `path`, then `ANNSTREAM_*` variables, then `overrides`."""
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
    cfg = _merge(cfg, _env_table(os.environ if env is None else env), source="environment")
    if overrides:
        cfg = _merge(cfg, overrides, source="override")
    return cfg
