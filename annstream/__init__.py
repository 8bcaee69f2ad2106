"""annstream: keeps precomputed nearest-neighbour lists fresh as ads and engagement stream in.

Embedding API: `load_config` / `Config` for settings, `open_store(url, cfg.store)` for the
neighbour store, `NeighbourReader(store).lookup(query_ids)` -> `ServingResult` for serving.
The service itself is `consumers.service.RefresherService` (see the README): the library does
not import the consumers. The store and serving names load on first use, so `import annstream`
stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from annstream.config import Config, load_config
from annstream.errors import (
    AnnstreamError,
    BrokerError,
    ConfigError,
    IndexStateError,
    InvalidEventError,
    SchemaError,
    SnapshotError,
    StoreConfigError,
    StoreError,
    StoreUnavailableError,
)

if TYPE_CHECKING:
    from annstream.serving import NeighbourReader, ServingResult
    from annstream.store import open_store

__version__ = "0.1.0"

__all__ = [
    "AnnstreamError",
    "BrokerError",
    "Config",
    "ConfigError",
    "IndexStateError",
    "InvalidEventError",
    "NeighbourReader",
    "SchemaError",
    "ServingResult",
    "SnapshotError",
    "StoreConfigError",
    "StoreError",
    "StoreUnavailableError",
    "__version__",
    "load_config",
    "open_store",
]

_LAZY = {
    "NeighbourReader": "annstream.serving",
    "ServingResult": "annstream.serving",
    "open_store": "annstream.store",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'annstream' has no attribute {name!r}")
