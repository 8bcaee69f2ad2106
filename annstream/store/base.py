"""The interface every neighbour store implements, with the same semantics on each backend.

Semantics shared by all stores (the contract suite in tests/store/ checks them):
- `upsert` writes one record per query; a row whose version is <= the stored version is a
  no-op reported as `stale` (a replayed or reordered micro-batch never overwrites newer lists).
- `ttl_s`: None = the store's configured TTL, 0 = namespace default (never, on SQLite),
  -1 = never expire, -2 = leave the stored TTL unchanged, > 0 = seconds from now.
- Rows that could not be written are `failed`; the caller retries them and does not commit
  past them. `StoreUnavailableError` means nothing could be written after bounded retries.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from annstream.store.record import LookupResult, NeighbourLists, UpsertResult

__all__ = ["HEAD_EXIT_POLICIES", "NeighbourStore", "as_query_ids", "check_ttl"]

HEAD_EXIT_POLICIES = ("expire", "delete")


@runtime_checkable
class NeighbourStore(Protocol):
    url: str

    def upsert(self, lists: NeighbourLists, ttl_s: int | None = None) -> UpsertResult: ...

    def lookup(self, query_ids: npt.ArrayLike) -> LookupResult: ...

    def remove(self, query_ids: npt.ArrayLike) -> None: ...

    def expire(self, query_ids: npt.ArrayLike, ttl_s: int) -> None: ...

    def close(self) -> None: ...


def as_query_ids(query_ids: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Query ids as a 1-d int64 array; ValueError naming the problem otherwise."""
    array = np.asarray(query_ids)
    if array.ndim != 1:
        raise ValueError(f"query_ids must be 1-d, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"query_ids must be integers (int64), got {array.dtype}")
    return array.astype(np.int64, copy=False)


def check_ttl(ttl_s: int, where: str) -> int:
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | np.integer) or ttl_s < -2:
        raise ValueError(f"{where}: ttl_s must be an int >= -2 (-2 keep, -1 never, 0 default)")
    return int(ttl_s)
