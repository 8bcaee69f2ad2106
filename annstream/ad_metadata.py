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

from annstream.events import AdChanges
from annstream.idmap import IdMap

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
    """Advertiser and campaign id per ad id; NO_ID where unknown.

    An `IdMap` (hash table) holds them: a micro-batch's changes cost O(batch), not a
    reallocation of every column, and a lookup O(1) per neighbour.
    """

    def __init__(self) -> None:
        self._map = IdMap(2)

    def __len__(self) -> int:
        return len(self._map)

    def memory_bytes(self) -> int:
        return self._map.nbytes

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
        if n > 1 and not bool(np.all(ids[1:] > ids[:-1])):
            _, first_in_reversed = np.unique(ids[::-1], return_index=True)
            last = n - 1 - first_in_reversed
            ids, advertisers, campaigns = ids[last], advertisers[last], campaigns[last]
        self._map.put(ids, np.stack([advertisers, campaigns], axis=1))

    def remove(self, ad_ids: npt.ArrayLike) -> None:
        """Forget deleted ads; ids not in the table are ignored."""
        ids = _ids("ad_ids", ad_ids)
        if ids.size == 0 or len(self._map) == 0:
            return
        self._map.remove(np.unique(ids[ids > np.iinfo(np.int64).min + 1]))

    def apply(self, changes: AdChanges) -> None:
        """One micro-batch's net changes (already unique and disjoint: trusted)."""
        if len(changes.delete_ids) and len(self._map):
            self._map.remove(changes.delete_ids)
        if len(changes.upsert_ids):
            assert changes.advertiser_ids is not None and changes.campaign_ids is not None
            self._map.put(
                changes.upsert_ids, np.stack([changes.advertiser_ids, changes.campaign_ids], 1)
            )

    def lookup(self, neighbour_ids: npt.ArrayLike) -> tuple[Int64Array, Int64Array]:
        """(advertiser ids, campaign ids) shaped like `neighbour_ids`; NO_ID for unknown ads
        and for padding (negative ids)."""
        ids = np.asarray(neighbour_ids)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"neighbour_ids: expected integer ids, got {ids.dtype}")
        ids = ids.astype("int64", copy=False)
        if len(self._map) == 0 or ids.size == 0:
            return np.full(ids.shape, NO_ID, "int64"), np.full(ids.shape, NO_ID, "int64")
        flat = np.maximum(ids.reshape(-1), -1)
        _, vals = self._map.get(flat, default=NO_ID)
        vals[flat < 0] = NO_ID
        return vals[:, 0].reshape(ids.shape), vals[:, 1].reshape(ids.shape)

    def state(self) -> dict[str, Int64Array]:
        """The table as arrays (for a snapshot); `from_state` rebuilds it."""
        ids, vals = self._map.items()
        return {
            "ad_ids": ids,
            "advertiser_ids": np.ascontiguousarray(vals[:, 0]),
            "campaign_ids": np.ascontiguousarray(vals[:, 1]),
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
        advertisers = _ids("advertiser_ids", state["advertiser_ids"], ids.size)
        campaigns = _ids("campaign_ids", state["campaign_ids"], ids.size)
        out = cls()
        if ids.size:
            out._map = IdMap(2, capacity=2 * ids.size)
            out._map.put(ids, np.stack([advertisers, campaigns], axis=1))
        return out
