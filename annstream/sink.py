"""The sink between the refresher and the neighbour store: retries, partial failures, backpressure.

`write()` returns only when every neighbour list of the micro-batch is stored (or was already
stored with a newer version); otherwise it raises StoreUnavailableError and the caller must not
commit the offsets that micro-batch covers. Rows that failed are retried record by record with
bounded exponential backoff; rows that succeeded are never rewritten.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from annstream.config import StoreConfig
from annstream.errors import StoreUnavailableError
from annstream.store import apply_head_exit
from annstream.store.base import NeighbourStore
from annstream.store.record import NeighbourLists

__all__ = ["NeighbourSink", "SinkStats"]

logger = logging.getLogger(__name__)


@dataclass
class SinkStats:
    stored: int = 0
    stale: int = 0
    retries: int = 0
    errors: int = 0
    expired: int = 0
    removed: int = 0


class NeighbourSink:
    """Writes micro-batches of neighbour lists to a NeighbourStore with bounded retries."""

    def __init__(
        self,
        store: NeighbourStore,
        cfg: StoreConfig,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = store
        self.cfg = cfg
        self.stats = SinkStats()
        self._sleep = sleep

    def write(self, lists: NeighbourLists) -> None:
        """Store every list, or raise StoreUnavailableError with nothing claimed as stored."""
        pending = np.arange(len(lists))
        ttl = self.cfg.ttl_s or None
        last_error = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                self.stats.retries += 1
                self._sleep(self.cfg.retry_backoff_s * 2 ** (attempt - 1))
            try:
                result = self.store.upsert(lists.take(pending), ttl_s=ttl)
            except StoreUnavailableError as exc:
                last_error = str(exc)
                self.stats.errors += 1
                logger.warning("store unavailable (attempt %d): %s", attempt + 1, exc)
                continue
            self.stats.stored += int(result.stored.sum())
            self.stats.stale += int(result.stale.sum())
            if result.errors:
                self.stats.errors += len(result.errors)
                last_error = next(iter(result.errors.values()))
            pending = pending[~result.done]
            if len(pending) == 0:
                return
        raise StoreUnavailableError(
            f"{len(pending)} of {len(lists)} neighbour lists not stored after "
            f"{self.cfg.retries} retries: {last_error}",
            retry_after=max(1.0, self.cfg.retry_backoff_s * 2**self.cfg.retries),
        )

    def head_exits(self, query_ids: np.ndarray) -> None:
        """Apply store.on_head_exit (expire or delete) to queries that left the head set."""
        if len(query_ids) == 0:
            return
        apply_head_exit(self.store, query_ids, self.cfg)
        if self.cfg.on_head_exit == "delete":
            self.stats.removed += len(query_ids)
        else:
            self.stats.expired += len(query_ids)
