"""The sink between the refresher and the neighbour store: one pass per call, reported per row.

`write()` makes exactly one store call and returns what happened to each list: stored, stale
(the store holds a newer version: done), failed (retryable) or refused for good (`permanent`,
e.g. a record over the server's size limit). It never sleeps and never loops: the caller (the
Checkpoint) keeps what is not stored pending and retries it after its own backoff, so there is
one retry policy, not one nested in another. A store that cannot be reached raises
StoreUnavailableError, with nothing claimed as stored.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from annstream.config import StoreConfig
from annstream.store import apply_head_exit
from annstream.store.base import NeighbourStore
from annstream.store.record import NeighbourLists, UpsertResult

__all__ = ["NeighbourSink", "SinkStats", "refusal_reason"]

logger = logging.getLogger(__name__)

_LOGGED_IDS = 10
_REASON = re.compile(r"[^a-z0-9]+")


@dataclass
class SinkStats:
    stored: int = 0
    stale: int = 0
    failed: int = 0
    refused: int = 0
    unavailable: int = 0
    expired: int = 0
    removed: int = 0


def refusal_reason(error: str) -> str:
    """A short label for why a row was refused (a metric label: bounded, no ids in it)."""
    label = _REASON.sub("_", error.lower()).strip("_")[:40].rstrip("_")
    return label or "unknown"


def _permanent(result: UpsertResult) -> npt.NDArray[np.bool_]:
    if result.permanent is None:
        return np.zeros_like(result.stored)
    return result.permanent


class NeighbourSink:
    """Writes micro-batches of neighbour lists to a NeighbourStore, one store call per call."""

    def __init__(self, store: NeighbourStore, cfg: StoreConfig) -> None:
        self.store = store
        self.cfg = cfg
        self.stats = SinkStats()

    def write(
        self, lists: NeighbourLists, ttl_s: npt.NDArray[np.int64] | None = None
    ) -> UpsertResult:
        """One upsert of every list (`ttl_s`: one TTL per row, None: store.ttl_s); per row
        stored / stale / failed / permanent.

        Raises StoreUnavailableError when the store could not be asked at all."""
        try:
            live = self.cfg.ttl_s or None
            result = self.store.upsert(lists, ttl_s=live if ttl_s is None else ttl_s)
        except Exception:
            self.stats.unavailable += 1
            raise
        permanent = _permanent(result)
        result = UpsertResult(result.stored, result.stale, result.failed, result.errors, permanent)
        self.stats.stored += int(result.stored.sum())
        self.stats.stale += int(result.stale.sum())
        self.stats.failed += int(result.failed.sum())
        if permanent.any():
            self.stats.refused += int(permanent.sum())
            self._log_refused(lists, result)
        if result.failed.any():
            rows = np.flatnonzero(result.failed)
            logger.warning(
                "%d of %d neighbour lists not stored (retried later): %s",
                len(rows),
                len(lists),
                result.errors.get(int(rows[0]), "no reason given"),
            )
        return result

    def _log_refused(self, lists: NeighbourLists, result: UpsertResult) -> None:
        rows = np.flatnonzero(_permanent(result))
        shown = ", ".join(
            f"query {int(lists.query_ids[r])}: {result.errors.get(int(r), 'no reason given')}"
            for r in rows[:_LOGGED_IDS]
        )
        more = f" (and {len(rows) - _LOGGED_IDS} more)" if len(rows) > _LOGGED_IDS else ""
        logger.error(
            "%d neighbour lists refused for good by %s, not retried: %s%s",
            len(rows),
            self.store.url,
            shown,
            more,
        )

    def head_exits(self, query_ids: npt.NDArray[np.int64]) -> None:
        """Apply store.on_head_exit (expire or delete) to queries that left the head set."""
        if len(query_ids) == 0:
            return
        apply_head_exit(self.store, query_ids, self.cfg)
        if self.cfg.on_head_exit == "delete":
            self.stats.removed += len(query_ids)
        else:
            self.stats.expired += len(query_ids)
