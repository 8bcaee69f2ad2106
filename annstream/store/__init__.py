"""The neighbour store: where refreshed neighbour lists are written and serving reads them.

`open_store(url)` picks the backend from the URL: `sqlite:///relative/path` (embedded, WAL
mode, relative to the working directory; `sqlite:////abs/path` with four slashes for an
absolute path) or `aerospike://host:port[,host:port]/namespace/set`. Readers pass
`create=False`: a SQLite file that does not exist is then an error naming its absolute path.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from annstream.config import StoreConfig
from annstream.errors import ConfigError
from annstream.store.base import HEAD_EXIT_POLICIES, NeighbourStore
from annstream.store.record import (
    LookupResult,
    NeighbourLists,
    StoredList,
    UpsertResult,
    pack_record,
    pack_records,
    unpack_record,
)

__all__ = [
    "HEAD_EXIT_POLICIES",
    "LookupResult",
    "NeighbourLists",
    "NeighbourStore",
    "StoredList",
    "UpsertResult",
    "apply_head_exit",
    "open_store",
    "pack_record",
    "pack_records",
    "parse_aerospike_url",
    "unpack_record",
]

logger = logging.getLogger(__name__)

ACCEPTED = (
    "sqlite:///relative/path.db, sqlite:////absolute/path.db or aerospike://host:port/namespace/set"
)


def parse_aerospike_url(url: str) -> tuple[list[tuple[str, int]], str, str]:
    """(seed hosts, namespace, set) of `aerospike://host:port[,host:port]/namespace/set`."""
    parts = urlsplit(url)
    path = [p for p in parts.path.split("/") if p]
    if parts.scheme != "aerospike" or not parts.netloc or len(path) != 2:
        raise ConfigError(f"store url {url!r} is not valid: accepted forms are {ACCEPTED}")
    hosts = []
    for seed in parts.netloc.split(","):
        host, _, port = seed.rpartition(":") if ":" in seed else (seed, "", "3000")
        if not host or not port.isdigit():
            raise ConfigError(f"store url {url!r}: bad seed {seed!r}; use host:port")
        hosts.append((host, int(port)))
    return hosts, path[0], path[1]


def open_store(url: str, cfg: StoreConfig | None = None, *, create: bool = True) -> NeighbourStore:
    """A store for `url` (cfg.url when url is empty); ConfigError on an unknown form.

    `create=False` for readers: never create a database (a missing SQLite file is an error).
    """
    cfg = cfg or StoreConfig(url=url)
    url = url or cfg.url
    if cfg.on_head_exit not in HEAD_EXIT_POLICIES:
        raise ConfigError(
            f"store.on_head_exit must be one of {', '.join(HEAD_EXIT_POLICIES)}, "
            f"got {cfg.on_head_exit!r}"
        )
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        from annstream.store.sqlite import SqliteStore

        return SqliteStore(url[len("sqlite:///") :], cfg, create=create)
    if url.startswith("aerospike://"):
        from annstream.store.aerospike import AerospikeStore

        hosts, namespace, set_name = parse_aerospike_url(url)
        return AerospikeStore(hosts, namespace, set_name, cfg, url=url)
    raise ConfigError(f"store url {url!r} is not valid: accepted forms are {ACCEPTED}")


def apply_head_exit(store: NeighbourStore, query_ids: object, cfg: StoreConfig) -> None:
    """Apply the configured policy to queries that left the head set: expire or delete."""
    import numpy as np

    ids = np.asarray(query_ids, dtype=np.int64)
    if cfg.on_head_exit == "delete":
        store.remove(ids)
    else:
        store.expire(ids, cfg.exit_ttl_s)
