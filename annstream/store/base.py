"""The interface every neighbour store implements, with the same semantics on each backend.

Semantics shared by all stores (the contract suite in tests/store/ checks them):
- `upsert` writes one record per query; a row whose version is <= the stored version is a
  no-op reported as `stale` (a replayed or reordered micro-batch never overwrites newer lists).
- `ttl_s`: None = the store's configured TTL, 0 = namespace default (never, on SQLite),
  -1 = never expire, -2 = leave the stored TTL unchanged, 1..315,360,000 = seconds from now
  (Aerospike refuses more than 10 years). One int for every row, or an int64 array with one
  TTL per row (e.g. the remaining exit TTL of lists rewritten after their query left).
- One attempt per call: no store retries or sleeps inside upsert / lookup / remove / expire
  (the caller owns the retry policy). Connecting at start-up is retried, bounded.
- Per row of an upsert: `stored`, `stale`, `failed` (may pass: retry the row, do not commit
  past it) or `permanent` (refused for good: report it, never retry it); codes.py decides
  which failures are which. A permanent row never fails the other rows.
- `StoreUnavailableError`: nothing could be done now (unreachable, every row failed
  retryably, a locked or full file); retry the whole call after `retry_after`.
  `StoreConfigError`: the store refuses a setting (a TTL on a namespace without nsup-period).
- `lookup` reads what it can: a key the store refuses to read is reported in
  `LookupResult.errors` and the other keys are read. `lookup_one` is the single-key path
  (serving's hot path: no columnar assembly), the error in `StoredList.error`. Both skip the
  campaign / advertiser ids with `metadata=False` (a caller that filters by none). Lookups
  are safe from many threads of one process at once.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from annstream.config import MAX_TTL_S
from annstream.store.record import LookupResult, NeighbourLists, StoredList, UpsertResult

__all__ = [
    "HEAD_EXIT_POLICIES",
    "MAX_TTL_S",
    "NeighbourStore",
    "TtlArg",
    "as_query_ids",
    "check_ttl",
    "row_ttls",
]

HEAD_EXIT_POLICIES = ("expire", "delete")
TTL_HELP = "-2 keep, -1 never, 0 namespace default, 1..315,360,000 seconds (10 years)"

TtlArg = int | npt.NDArray[np.int64] | None


@runtime_checkable
class NeighbourStore(Protocol):
    url: str

    def upsert(self, lists: NeighbourLists, ttl_s: TtlArg = None) -> UpsertResult: ...

    def lookup(self, query_ids: npt.ArrayLike, *, metadata: bool = True) -> LookupResult: ...

    def lookup_one(self, query_id: int, *, metadata: bool = True) -> StoredList: ...

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
    """One TTL as an int; ValueError naming the accepted range otherwise."""
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | np.integer):
        raise ValueError(f"{where}: ttl_s must be an int ({TTL_HELP}), got {ttl_s!r}")
    if not -2 <= ttl_s <= MAX_TTL_S:
        raise ValueError(f"{where}: ttl_s {ttl_s} is out of range ({TTL_HELP})")
    return int(ttl_s)


def row_ttls(ttl_s: TtlArg, default: int, n: int, where: str) -> npt.NDArray[np.int64]:
    """The TTL of each of `n` rows: `default` for None, one int for all, or one per row."""
    if ttl_s is None:
        return np.full(n, check_ttl(default, where), dtype=np.int64)
    if not isinstance(ttl_s, np.ndarray):
        return np.full(n, check_ttl(ttl_s, where), dtype=np.int64)
    if ttl_s.shape != (n,) or not np.issubdtype(ttl_s.dtype, np.integer):
        raise ValueError(
            f"{where}: per-row ttl_s must be an integer array of shape ({n},), "
            f"got {ttl_s.dtype} {ttl_s.shape}"
        )
    ttls = ttl_s.astype(np.int64)
    bad = (ttls < -2) | (ttls > MAX_TTL_S)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where}: ttl_s[{row}] = {ttls[row]} is out of range ({TTL_HELP})")
    return ttls
