"""Campaign and advertiser id of every live ad, so stored neighbour lists can carry them.

Serving filters neighbours by targeting and budget rules without another lookup, which needs
each neighbour's campaign and advertiser stored next to it (issue 5). The ids arrive with the
ad events; this table keeps the last ones per ad as a sorted id array with parallel columns,
changed and read a whole micro-batch at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["NO_ID", "AdMetadata"]

logger = logging.getLogger(__name__)

NO_ID = -1
"""Unknown campaign or advertiser (also what padding neighbours get)."""

Int64Array = npt.NDArray[np.int64]
_STATE_KEYS = ("ad_ids", "advertiser_ids", "campaign_ids")


def _ids(name: str, values: npt.ArrayLike, n: int | None = None) -> Int64Array:
    a = np.asarray(values)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name}: expected a 1-d integer array, got {a.dtype} of shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name}: expected {n} entries (one per ad id), got {a.shape[0]}")
    return np.ascontiguousarray(a, dtype="int64")


class AdMetadata:
    """Advertiser and campaign id per ad id; NO_ID where unknown."""

    def __init__(self) -> None:
        self._ids: Int64Array = np.empty(0, "int64")
        self._advertisers: Int64Array = np.empty(0, "int64")
        self._campaigns: Int64Array = np.empty(0, "int64")

    def __len__(self) -> int:
        return int(self._ids.size)

    def memory_bytes(self) -> int:
        return int(self._ids.nbytes + self._advertisers.nbytes + self._campaigns.nbytes)

    def _find(self, ad_ids: Int64Array) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:
        """Insertion position of each id in the table and whether it is there."""
        pos = np.searchsorted(self._ids, ad_ids)
        hit = np.zeros(ad_ids.shape, dtype=bool)
        inside = pos < self._ids.size
        hit[inside] = self._ids[pos[inside]] == ad_ids[inside]
        return pos, hit

    def update(
        self, ad_ids: npt.ArrayLike, advertiser_ids: npt.ArrayLike, campaign_ids: npt.ArrayLike
    ) -> None:
        """Set the ids of upserted ads; where an ad repeats, its last occurrence wins."""
        ids = _ids("ad_ids", ad_ids)
        n = ids.size
        advertisers = _ids("advertiser_ids", advertiser_ids, n)
        campaigns = _ids("campaign_ids", campaign_ids, n)
        if n == 0:
            return
        unique, first_in_reversed = np.unique(ids[::-1], return_index=True)
        last = n - 1 - first_in_reversed
        advertisers, campaigns = advertisers[last], campaigns[last]
        pos, hit = self._find(unique)
        self._advertisers[pos[hit]] = advertisers[hit]
        self._campaigns[pos[hit]] = campaigns[hit]
        new = ~hit
        if new.any():
            at = pos[new]
            self._ids = np.insert(self._ids, at, unique[new])
            self._advertisers = np.insert(self._advertisers, at, advertisers[new])
            self._campaigns = np.insert(self._campaigns, at, campaigns[new])

    def remove(self, ad_ids: npt.ArrayLike) -> None:
        """Forget deleted ads; ids not in the table are ignored."""
        ids = _ids("ad_ids", ad_ids)
        if ids.size == 0 or self._ids.size == 0:
            return
        pos, hit = self._find(ids)
        gone = np.unique(pos[hit])
        if gone.size:
            self._ids = np.delete(self._ids, gone)
            self._advertisers = np.delete(self._advertisers, gone)
            self._campaigns = np.delete(self._campaigns, gone)

    def lookup(self, neighbour_ids: npt.ArrayLike) -> tuple[Int64Array, Int64Array]:
        """(advertiser ids, campaign ids) shaped like `neighbour_ids`; NO_ID for unknown ads
        and for padding (negative ids)."""
        ids = np.asarray(neighbour_ids)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"neighbour_ids: expected integer ids, got {ids.dtype}")
        ids = ids.astype("int64", copy=False)
        if self._ids.size == 0 or ids.size == 0:
            return np.full(ids.shape, NO_ID, "int64"), np.full(ids.shape, NO_ID, "int64")
        # Lists share many neighbours, and sorted needles search the table several times faster.
        unique, inverse = np.unique(ids, return_inverse=True)
        pos, hit = self._find(unique)
        hit &= unique >= 0
        advertisers = np.full(unique.shape, NO_ID, dtype="int64")
        campaigns = np.full(unique.shape, NO_ID, dtype="int64")
        advertisers[hit] = self._advertisers[pos[hit]]
        campaigns[hit] = self._campaigns[pos[hit]]
        inverse = inverse.reshape(ids.shape)
        return advertisers[inverse], campaigns[inverse]

    def state(self) -> dict[str, Int64Array]:
        """The table as arrays (for a snapshot); `from_state` rebuilds it."""
        return {
            "ad_ids": self._ids.copy(),
            "advertiser_ids": self._advertisers.copy(),
            "campaign_ids": self._campaigns.copy(),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, npt.NDArray[Any]]) -> AdMetadata:
        """The table saved by `state()`; ValueError if the arrays are missing or inconsistent."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"ad metadata state lacks {missing}: pass what state() returned")
        ids = _ids("ad_ids", state["ad_ids"])
        if ids.size > 1 and not bool(np.all(ids[1:] > ids[:-1])):
            raise ValueError("ad metadata state: ad_ids must be sorted and unique")
        out = cls()
        out._ids = ids.copy()
        out._advertisers = _ids("advertiser_ids", state["advertiser_ids"], ids.size).copy()
        out._campaigns = _ids("campaign_ids", state["campaign_ids"], ids.size).copy()
        return out
