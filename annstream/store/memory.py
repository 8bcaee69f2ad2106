"""A neighbour store in process memory, with the contract's semantics: for tests and tools.

Same behaviour as SQLite (the contract suite in tests/store/ runs against it): records hold
the packed bins of schemas/neighbour_record.md, the stale-write guard keeps the newer version,
expired records are invisible and overwritten by any version, TTL 0 means never. Faults can
be injected: rows that fail (retryable or for good) and the whole store going down, so unit
tests of what sits above a store need no server.
"""

from __future__ import annotations

import operator
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from annstream.config import StoreConfig
from annstream.errors import StoreUnavailableError
from annstream.store.base import TtlArg, as_query_ids, check_ttl, row_ttls
from annstream.store.record import (
    BIN_VERSION,
    LookupResult,
    NeighbourLists,
    StoredList,
    UpsertResult,
    absent_list,
    lookup_result,
    pack_records,
    stored_list,
)

__all__ = ["InMemoryStore"]


@dataclass
class _Record:
    bins: dict[str, Any]
    expires_at_ms: int | None


class InMemoryStore:
    """Neighbour lists in a dict; thread-safe; `calls` counts the store calls per method."""

    def __init__(
        self,
        cfg: StoreConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        url: str = "memory://",
    ) -> None:
        self.cfg = cfg or StoreConfig(url=url)
        self.url = url
        self.clock = clock
        self.calls: Counter[str] = Counter()
        self._records: dict[int, _Record] = {}
        self._lock = threading.Lock()
        self._down: str | None = None
        self._full = False
        self._failing: dict[int, tuple[bool, str]] = {}

    # ---- faults ------------------------------------------------------------------------

    def fail(
        self, query_ids: npt.ArrayLike, *, permanent: bool = False, reason: str = "injected"
    ) -> None:
        """Make upserts of these queries fail: retryable (`failed`) or for good (`permanent`)."""
        with self._lock:
            for q in as_query_ids(query_ids).tolist():
                self._failing[q] = (permanent, reason)

    def go_down(self, reason: str = "store unreachable") -> None:
        """Every call raises StoreUnavailableError until `heal()`."""
        self._down = reason

    def fill(self) -> None:
        """Writes raise StoreUnavailableError (a full store) until `heal()`; reads go on."""
        self._full = True

    def heal(self) -> None:
        with self._lock:
            self._down = None
            self._full = False
            self._failing.clear()

    def wipe(self) -> None:
        """Lose every record, as a server with an in-memory namespace does on restart."""
        with self._lock:
            self._records.clear()

    def __len__(self) -> int:
        now = self._now_ms()
        with self._lock:
            return sum(not self._expired(r, now) for r in self._records.values())

    # ---- the store ---------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    @staticmethod
    def _expired(record: _Record, now_ms: int) -> bool:
        return record.expires_at_ms is not None and record.expires_at_ms <= now_ms

    def _enter(self, method: str) -> None:
        self.calls[method] += 1
        if self._down is not None:
            raise StoreUnavailableError(f"store {self.url}: {self._down}", retry_after=0.1)

    def _live(self, query_id: int, now_ms: int) -> _Record | None:
        record = self._records.get(query_id)
        return None if record is None or self._expired(record, now_ms) else record

    def upsert(self, lists: NeighbourLists, ttl_s: TtlArg = None) -> UpsertResult:
        n = len(lists)
        ttls = row_ttls(ttl_s, self.cfg.ttl_s, n, "upsert").tolist()
        stored, stale, failed, permanent = (np.zeros(n, dtype=bool) for _ in range(4))
        errors: dict[int, str] = {}
        now = self._now_ms()
        qids, versions = lists.query_ids.tolist(), lists.versions.tolist()
        with self._lock:
            self._enter("upsert")
            if self._full:
                raise StoreUnavailableError(f"store {self.url} is full", retry_after=0.1)
            for row, bins in enumerate(pack_records(lists)):
                q = qids[row]
                fault = self._failing.get(q)
                if fault is not None:
                    (permanent if fault[0] else failed)[row] = True
                    kind = "permanent" if fault[0] else "retryable"
                    errors[row] = f"memory: {fault[1]} ({kind})"
                    continue
                prior = self._live(q, now)
                if prior is not None and int(prior.bins[BIN_VERSION]) >= versions[row]:
                    stale[row] = True
                    continue
                ttl = ttls[row]
                if ttl == -2:
                    expires = None if prior is None else prior.expires_at_ms
                else:
                    expires = now + ttl * 1000 if ttl > 0 else None
                self._records[q] = _Record(bins, expires)
                stored[row] = True
        return UpsertResult(stored, stale, failed, errors, permanent)

    def lookup(self, query_ids: npt.ArrayLike, *, metadata: bool = True) -> LookupResult:
        qids = as_query_ids(query_ids)
        now = self._now_ms()
        with self._lock:
            self._enter("lookup")
            found = [self._live(q, now) for q in qids.tolist()]
        bins = [None if r is None else dict(r.bins) for r in found]
        return lookup_result(qids, bins, metadata=metadata)

    def lookup_one(self, query_id: int, *, metadata: bool = True) -> StoredList:
        qid = operator.index(query_id)
        now = self._now_ms()
        with self._lock:
            self._enter("lookup")
            record = self._live(qid, now)
        if record is None:
            return absent_list(qid)
        return stored_list(qid, dict(record.bins), metadata=metadata)

    def remove(self, query_ids: npt.ArrayLike) -> None:
        keys = as_query_ids(query_ids).tolist()
        with self._lock:
            self._enter("remove")
            for q in keys:
                self._records.pop(q, None)

    def expire(self, query_ids: npt.ArrayLike, ttl_s: int) -> None:
        ttl = check_ttl(ttl_s, "expire")
        keys = as_query_ids(query_ids).tolist()
        now = self._now_ms()
        with self._lock:
            self._enter("expire")
            if ttl == -2:
                return
            for q in keys:
                record = self._live(q, now)
                if record is not None:
                    record.expires_at_ms = now + ttl * 1000 if ttl > 0 else None

    def close(self) -> None:
        pass

    def __enter__(self) -> InMemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
