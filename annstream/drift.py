"""Quantizer drift: watch list imbalance and sampled recall, retrain in the background, swap.

The owner thread of the index drives everything between micro-batches:

    monitor.observe(ad_vectors)                 # every upserted ad feeds the reservoir
    monitor.after_batch(index)                  # measures every `check_every_batches`
    due, reason = monitor.should_retrain()
    if due and not retrainer.running:
        retrainer.start(index, monitor.reservoir.sample())
    new = retrainer.poll(index)
    if new is not None:                         # version + 1: recompute every head query
        index = new
        monitor.reset()

Concurrency: `start()` copies the live ids and vectors in the owner thread and turns on the
index's journal; the background thread trains a new quantizer on the sample and adds the copy
to a brand-new index it alone owns, so it never touches the live Faiss index. `poll()`, in the
owner thread again, replays the journal (updates applied meanwhile) onto the new index and hands
it back. The copy costs (4d + 8) bytes per ad for the duration; in exchange the owner thread
never stalls for the whole re-add (seconds at millions of ads), only for the replay.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from annstream.ann import min_train_size, recall_at_k
from annstream.config import DriftConfig, IndexConfig
from annstream.errors import IndexStateError
from annstream.index import LiveIvfIndex

__all__ = ["BackgroundRetrainer", "DriftMonitor", "DriftReport", "Reservoir"]

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


class Reservoir:
    """A uniform sample of at most `capacity` ad vectors out of all seen (algorithm R)."""

    def __init__(self, capacity: int, dim: int, seed: int | None = 0) -> None:
        if capacity <= 0 or dim <= 0:
            raise ValueError(f"reservoir capacity and dim must be positive: {capacity}, {dim}")
        self.capacity = capacity
        self.dim = dim
        self.seen = 0
        self._rng = np.random.default_rng(seed)
        self._buf = np.empty((0, dim), dtype="float32")

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def add(self, vectors: npt.ArrayLike) -> None:
        """Offer a micro-batch of vectors; each is kept with probability capacity / seen."""
        x = np.ascontiguousarray(vectors, dtype="float32")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"reservoir vectors must have shape (n, {self.dim}), got {x.shape}")
        n = x.shape[0]
        pos = self.seen + np.arange(n, dtype="int64")
        fill = pos < self.capacity
        if fill.any():
            end = int(pos[fill][-1]) + 1
            if self._buf.shape[0] < end:
                rows = min(self.capacity, max(end, 2 * self._buf.shape[0]))
                grown = np.empty((rows, self.dim), dtype="float32")
                grown[: len(self)] = self._buf[: len(self)]
                self._buf = grown
            self._buf[pos[fill]] = x[fill]
        rest = ~fill
        if rest.any():
            slot = self._rng.integers(0, pos[rest] + 1)
            hit = slot < self.capacity
            self._buf[slot[hit]] = x[rest][hit]
        self.seen += n

    def sample(self, n: int | None = None) -> F32:
        """A copy of the kept vectors, or of `n` of them drawn without replacement."""
        kept = self._buf[: len(self)]
        if n is None or n >= kept.shape[0]:
            return kept.copy()
        rows = np.sort(self._rng.choice(kept.shape[0], size=n, replace=False))
        return np.ascontiguousarray(kept[rows])


@dataclass(frozen=True)
class DriftReport:
    """One drift measurement of the live index; `recall` is None when there was nothing to ask."""

    imbalance: float
    recall: float | None
    ntotal: int
    nlist: int
    version: int
    train_min: int


class DriftMonitor:
    """List imbalance and sampled recall@k (IVF at the live nprobe vs exact) of the live index.

    Recall queries are drawn from the reservoir of recent ads; the exact side scans every list,
    about recall_sample x ntotal x d multiply-adds per check.
    """

    def __init__(
        self,
        cfg: DriftConfig,
        dim: int,
        *,
        k: int = 10,
        min_ads_per_list: float = 10.0,
        seed: int | None = 0,
    ) -> None:
        self.cfg = cfg
        self.k = k
        self.min_ads_per_list = min_ads_per_list
        self.reservoir = Reservoir(cfg.reservoir_size, dim, seed)
        self.batches = 0
        self.last: DriftReport | None = None
        self.baseline: float | None = None

    def observe(self, vectors: npt.ArrayLike) -> None:
        """Feed the vectors of upserted ads (one call per micro-batch)."""
        self.reservoir.add(vectors)

    def after_batch(self, index: LiveIvfIndex) -> DriftReport | None:
        """Count a micro-batch; measure every `check_every_batches` (if enabled)."""
        self.batches += 1
        every = max(1, self.cfg.check_every_batches)
        if not self.cfg.enabled or self.batches % every:
            return None
        return self.check(index)

    def check(self, index: LiveIvfIndex) -> DriftReport:
        """Measure now: imbalance of the lists and recall of sampled reservoir queries."""
        recall = None
        queries = self.reservoir.sample(self.cfg.recall_sample)
        if index.ntotal and queries.shape[0]:
            k = min(self.k, index.ntotal)
            _, found = index.search(queries, k)
            _, exact = index.search_exact(queries, k)
            recall = recall_at_k(found, exact, k)
        report = DriftReport(
            imbalance=index.imbalance(),
            recall=recall,
            ntotal=index.ntotal,
            nlist=int(index.ivf.nlist),
            version=index.version,
            train_min=min_train_size(index.ivf),
        )
        self.last = report
        if self.baseline is None and recall is not None and self._enough_ads(report):
            self.baseline = recall
        logger.info("drift check: %r (baseline recall %s)", report, self.baseline)
        return report

    def should_retrain(self) -> tuple[bool, str]:
        """(True, reason) once the last check passed a DriftConfig threshold."""
        r = self.last
        if not self.cfg.enabled:
            return False, "drift retraining is disabled (drift.enabled = false)"
        if r is None:
            return False, "no drift check yet"
        if not self._enough_ads(r):
            return False, f"too few ads to judge drift ({r.ntotal} in {r.nlist} lists)"
        if len(self.reservoir) < r.train_min:
            return False, (
                f"reservoir holds {len(self.reservoir)} ads, training needs {r.train_min}"
            )
        if r.imbalance > self.cfg.imbalance_threshold:
            return True, (
                f"list imbalance {r.imbalance:.2f} > drift.imbalance_threshold "
                f"{self.cfg.imbalance_threshold:.2f}"
            )
        if (
            r.recall is not None
            and self.baseline is not None
            and r.recall < self.baseline - self.cfg.recall_drop
        ):
            return True, (
                f"sampled recall@{self.k} {r.recall:.3f} dropped more than drift.recall_drop "
                f"{self.cfg.recall_drop:.3f} below {self.baseline:.3f} measured after training"
            )
        if r.recall is not None and r.recall < self.cfg.recall_threshold:
            return True, (
                f"sampled recall@{self.k} {r.recall:.3f} < drift.recall_threshold "
                f"{self.cfg.recall_threshold:.3f}"
            )
        return False, f"within thresholds: imbalance {r.imbalance:.2f}, recall {r.recall}"

    def _enough_ads(self, r: DriftReport) -> bool:
        return r.ntotal >= self.min_ads_per_list * r.nlist

    def reset(self) -> None:
        """Forget the last measurement and the recall baseline (call after swapping in a
        retrained index; its first check sets the new baseline)."""
        self.last = None
        self.baseline = None
        self.batches = 0


class _Job:
    """One background retrain: written by its thread only, read after `done` is set."""

    def __init__(self, source: LiveIvfIndex) -> None:
        self.source = source
        self.done = threading.Event()
        self.result: LiveIvfIndex | None = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def run(self, cfg: IndexConfig, sample: F32, ids: I64, vectors: F32, version: int) -> None:
        try:
            self.result = LiveIvfIndex.rebuild(cfg, sample, ids, vectors, version=version)
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()


class BackgroundRetrainer:
    """Trains a replacement index in a background thread; the owner thread polls and swaps."""

    def __init__(self) -> None:
        self._job: _Job | None = None

    @property
    def running(self) -> bool:
        """A retrain was started and not yet swapped in (or discarded) by `poll()`."""
        return self._job is not None

    def start(self, index: LiveIvfIndex, sample: npt.ArrayLike) -> None:
        """Copy the live ads, start journaling updates, and train on `sample` in a thread."""
        if self._job is not None:
            raise IndexStateError("a retrain is already running: poll() until it finishes")
        x = index.prepare(sample)
        need = min_train_size(index.ivf)
        if x.shape[0] < need:
            raise IndexStateError(
                f"{x.shape[0]} sample vectors are too few to retrain (need {need}): "
                "wait for the reservoir to fill"
            )
        ids, vectors = index.export()
        index.begin_journal()
        job = _Job(index)
        job.thread = threading.Thread(
            target=job.run,
            args=(index.cfg, x, ids, vectors, index.version + 1),
            name="annstream-retrain",
            daemon=True,
        )
        self._job = job
        job.thread.start()
        logger.info("retraining on %d sampled ads (%d live ads copied)", x.shape[0], ids.size)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the background work is done (for tests and shutdown)."""
        return True if self._job is None else self._job.done.wait(timeout)

    def poll(self, index: LiveIvfIndex) -> LiveIvfIndex | None:
        """Between micro-batches: the retrained index (version + 1) once ready, else None."""
        job = self._job
        if job is None or not job.done.is_set():
            return None
        if index is not job.source:
            raise IndexStateError("poll() must be given the index the retrain was started on")
        if job.thread is not None:
            job.thread.join()
        self._job = None
        ops = index.end_journal()
        result = job.result
        if result is None:
            logger.error("background retrain failed; keeping the current index", exc_info=job.error)
            return None
        result.replay(ops)
        result.nprobe = index.nprobe
        result.version = index.version + 1
        logger.info(
            "swapping in retrained index version %d: %d ads, %d journaled updates replayed",
            result.version,
            result.ntotal,
            len(ops),
        )
        return result

    def cancel(self, index: LiveIvfIndex) -> None:
        """Stop journaling and drop the pending result (the thread finishes on its own)."""
        if self._job is not None and self._job.source is index:
            index.end_journal()
        self._job = None
