"""Finds stored neighbour lists that the store lost or rolled back, so they can be rewritten.

The refresher rewrites a list only when its top K changes, so a store that lost its data (an
Aerospike namespace in memory, restarted) or came back from an old backup would keep serving
nothing or old lists while the service reports healthy. The verifier remembers the version of
each list this process stored, reads back a slice of the head queries at a time (round robin,
so every head query is checked over time) and names those whose record is missing or older.
Within an episode (a slice found something) the next slice is due at once, so a wiped store is
repaired at the pace of lookups, not of the verification interval.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from annstream.store.base import NeighbourStore, as_query_ids

__all__ = ["StoreVerifier"]

logger = logging.getLogger(__name__)

Int64Array = npt.NDArray[np.int64]


class StoreVerifier:
    """Every `every_s`, `sample` head queries' stored lists compared with what was stored."""

    def __init__(
        self,
        every_s: float,
        sample: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if every_s < 0 or sample <= 0:
            raise ValueError(
                f"service.verify_every_s must be >= 0 (0 = off) and service.verify_sample > 0, "
                f"got {every_s} and {sample}"
            )
        self.every_s = every_s
        self.sample = sample
        self._clock = clock
        self._versions: dict[int, int] = {}
        self._cursor = np.iinfo(np.int64).min
        self._next_at = clock() + every_s
        self.episode = False
        self.checked = 0
        self.found = 0
        self._episode_found = 0

    def stored(self, query_ids: npt.ArrayLike, versions: npt.ArrayLike) -> None:
        """The store holds these lists at (at least) these versions."""
        qids = as_query_ids(query_ids).tolist()
        self._versions.update(zip(qids, np.asarray(versions, np.int64).tolist(), strict=True))

    def forget(self, query_ids: npt.ArrayLike) -> None:
        """Queries that left the head set: their lists expire or were removed on purpose."""
        for q in as_query_ids(query_ids).tolist():
            self._versions.pop(q, None)

    def due(self) -> bool:
        return self.every_s > 0 and (self.episode or self._clock() >= self._next_at)

    def _slice(self, heads: Int64Array) -> Int64Array:
        """The next `sample` head queries after the cursor, wrapping around."""
        start = int(np.searchsorted(heads, self._cursor, side="right"))
        picked = heads[start : start + self.sample]
        if len(picked) < self.sample and start > 0:
            picked = np.concatenate([picked, heads[: min(start, self.sample - len(picked))]])
        if len(picked):
            self._cursor = int(picked[-1])
        return picked

    def check(self, store: NeighbourStore, head_ids: npt.ArrayLike) -> Int64Array:
        """Head queries of the next slice whose stored list is missing or older than the one
        this process stored (StoreUnavailableError when the store cannot be read)."""
        self._next_at = self._clock() + self.every_s
        heads = np.sort(as_query_ids(head_ids))
        self._prune(heads)
        get = self._versions.get
        versions = np.fromiter((get(q, -1) for q in heads.tolist()), np.int64, len(heads))
        heads = heads[versions >= 0]
        picked = self._slice(heads)
        known = versions[versions >= 0][np.searchsorted(heads, picked)]
        if not len(picked):
            self.episode = False
            return picked
        got = store.lookup(picked)
        bad = ~got.found | (got.versions < known)
        self.checked += len(picked)
        lost = picked[bad]
        if len(lost) and not self.episode:
            logger.warning(
                "the store lost %d of %d sampled neighbour lists (%d missing, %d older than "
                "stored); rewriting them and checking every head query: was it wiped, "
                "restarted without persistence or restored from a backup?",
                len(lost),
                len(picked),
                int((~got.found).sum()),
                int((bad & got.found).sum()),
            )
        elif not len(lost) and self.episode:
            logger.info(
                "stored neighbour lists verified again after %d rewrites", self._episode_found
            )
        self._episode_found = self._episode_found + len(lost) if len(lost) else 0
        self.episode = bool(len(lost))
        self.found += len(lost)
        return lost

    def _prune(self, heads: Int64Array) -> None:
        """Forget versions of queries that are no longer head queries here (amortised)."""
        n = len(self._versions)
        if n <= 2 * len(heads) + 1024:
            return
        qids = np.fromiter(self._versions.keys(), np.int64, n)
        versions = np.fromiter(self._versions.values(), np.int64, n)
        keep = np.isin(qids, heads)
        self._versions = dict(zip(qids[keep].tolist(), versions[keep].tolist(), strict=True))
