"""Test helpers shipped with annstream: an in-memory Aerospike wire-protocol server."""

from __future__ import annotations

from typing import Any

__all__ = ["AerospikeTestServer", "Fault"]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m annstream.testing.aerospike_server` does not import itself twice.
    if name in __all__:
        from annstream.testing import aerospike_server

        return getattr(aerospike_server, name)
    raise AttributeError(f"module 'annstream.testing' has no attribute {name!r}")
