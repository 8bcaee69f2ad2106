"""annstream: keeps precomputed nearest-neighbour lists fresh as ads and engagement stream in."""

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

__version__ = "0.1.0"

__all__ = [
    "AnnstreamError",
    "BrokerError",
    "Config",
    "ConfigError",
    "IndexStateError",
    "InvalidEventError",
    "SchemaError",
    "SnapshotError",
    "StoreConfigError",
    "StoreError",
    "StoreUnavailableError",
    "__version__",
    "load_config",
]
