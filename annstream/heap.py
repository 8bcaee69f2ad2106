"""The process's memory: resident size, and handing freed heap back to the OS.

glibc keeps freed memory for reuse. Faiss, numpy and the store clients allocate and free a lot
per micro-batch (and a retrain frees a whole index at once); arrays below glibc's dynamic mmap
threshold (up to 32 MB) come from the heap, so without a trim the process keeps its peak
resident for good. `trim_heap()` (glibc `malloc_trim(0)`) returns the free pages; it costs a
walk of the heap (milliseconds), so call it after large frees (an index swap) and every few
hundred micro-batches, not per batch.
"""

from __future__ import annotations

import ctypes
import logging
import os

__all__ = ["rss_bytes", "trim_heap"]

logger = logging.getLogger(__name__)


def trim_heap() -> bool:
    """Hand freed heap pages back to the OS (glibc; elsewhere a no-op). True if any were."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        logger.debug("malloc_trim unavailable; freed memory stays with the allocator")
        return False


def rss_bytes() -> int | None:
    """Resident set size of this process (Linux), or None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
