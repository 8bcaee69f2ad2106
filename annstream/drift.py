"""Quantizer drift: watch list imbalance and sampled recall, retrain in the background, swap.

The owner thread of the index drives everything between micro-batches:

    monitor.observe(ad_vectors)                 # every upserted ad feeds the reservoir
    monitor.after_batch(index, head_sample)     # every `check_every_batches`, or when
                                                # request_check() was called (the stored-
                                                # recall warning): recall of head queries
    due, reason = monitor.should_retrain()
    if due and not retrainer.running:
        retrainer.start(index, monitor.reservoir.sample())   # nlist=: another list count
    new = retrainer.poll(index)
    if new is not None:                         # version + 1: recompute every head query
        index = new
        monitor.reset()

Concurrency: the live Faiss index is touched by the owner thread only, and never for long.
The recall check's exact side (every ad scanned for the sample queries: about a second at a
million ads) is a sweep over the lists (ids under IVFPQ), a time slice per micro-batch
(`sweep_slice_s`); ads changed during the sweep can bias the estimate by about the share of the
catalogue changed in that time, the same way for the baseline and later checks. `start()`
turns on the index's journal and starts training the new quantizer on the sample in a
background thread; each `poll()` copies a time slice of the live lists (ids and vectors) in the
owner thread, and once the copy is complete the background thread adds it to a brand-new index
it alone owns. A later `poll()` replays the journal (updates applied since the start; the copy
may hold an ad twice, moved between lists, and the replay settles it) and hands the new index
back. The copy costs (4d + 8) bytes per ad for the duration; the owner thread never stalls for
the whole copy or re-add (seconds at millions of ads), only for a slice and the replay.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from faiss.contrib.inspect_tools import get_invlist

from annstream.ann import min_train_size, recall_at_k
from annstream.config import DriftConfig, IndexConfig
from annstream.errors import IndexStateError
from annstream.index import LiveIvfIndex
from annstream.recall import ExactSweep
from annstream.tuning import min_training_ads

__all__ = ["BackgroundRetrainer", "DriftMonitor", "DriftReport", "Reservoir"]

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
QuerySample = Callable[[int], npt.ArrayLike]
"""n -> up to n query vectors to judge recall on (the service passes head queries)."""


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

    Recall queries are what is served: a sample of the head queries (`queries(n)`, passed by
    the service), or, with none yet, the reservoir of recent ads. The exact side scans every ad,
    about recall_sample x ntotal x d multiply-adds per check, in slices of `sweep_slice_s`
    per micro-batch in `after_batch` (an `ExactSweep`: IVFFlat lists, IVFPQ id chunks), at
    once in `check`.
    """

    def __init__(
        self,
        cfg: DriftConfig,
        dim: int,
        *,
        k: int = 10,
        min_ads_per_list: float = 10.0,
        seed: int | None = 0,
        sweep_slice_s: float = 0.02,
    ) -> None:
        self.cfg = cfg
        self.k = k
        self.min_ads_per_list = min_ads_per_list
        self.sweep_slice_s = sweep_slice_s
        self.reservoir = Reservoir(cfg.reservoir_size, dim, seed)
        self.batches = 0
        self.last: DriftReport | None = None
        self.baseline: float | None = None
        self._sweep: ExactSweep | None = None
        self._requested = False
        self._on_heads = False

    @property
    def checking(self) -> bool:
        """A check is under way or asked for (it needs more micro-batches)."""
        return self._sweep is not None or self._requested

    def request_check(self) -> None:
        """Measure at the next micro-batch (the stored recall fell under its warning)."""
        if self.cfg.enabled and not self._requested and self._sweep is None:
            logger.info("drift check requested by the stored-recall warning")
            self._requested = True

    def _queries(self, queries: QuerySample | None) -> F32:
        """The recall sample: head queries when given and any, else reservoir ads. A
        baseline measured on the other kind is dropped (the next report sets it again)."""
        n = self.cfg.recall_sample
        x = None if queries is None else np.ascontiguousarray(queries(n), dtype="float32")
        on_heads = x is not None and x.shape[0] > 0
        if on_heads != self._on_heads:
            self._on_heads, self.baseline = on_heads, None
        if x is None or not on_heads:
            return self.reservoir.sample(n)
        return x

    def observe(self, vectors: npt.ArrayLike) -> None:
        """Feed the vectors of upserted ads (one call per micro-batch)."""
        self.reservoir.add(vectors)

    def after_batch(
        self, index: LiveIvfIndex, queries: QuerySample | None = None
    ) -> DriftReport | None:
        """Count a micro-batch; every `check_every_batches` (if enabled) or when requested,
        start a measurement on `queries(n)` (head queries; the reservoir without), which scans
        a slice of the lists per call; returns the report once it is complete."""
        self.batches += 1
        every = max(1, self.cfg.check_every_batches)
        if not self.cfg.enabled:
            return None
        sweep = self._sweep
        if sweep is not None and (sweep.index is not index or sweep.version != index.version):
            sweep = self._sweep = None  # the index was swapped: start again
        if sweep is None:
            if self.batches % every and not self._requested:
                return None
            self._requested = False
            x = self._queries(queries)
            if not index.ntotal or not x.shape[0]:
                return self._measure(index, x)
            sweep = self._sweep = ExactSweep(index, x, min(self.k, index.ntotal))
        if not sweep.step(self.sweep_slice_s):
            return None
        self._sweep = None
        return self._report(index, sweep.recall())

    def check(self, index: LiveIvfIndex, queries: QuerySample | None = None) -> DriftReport:
        """Measure now: imbalance of the lists and recall of sampled head queries (or
        reservoir ads)."""
        return self._measure(index, self._queries(queries))

    def _measure(self, index: LiveIvfIndex, x: F32) -> DriftReport:
        recall = None
        if index.ntotal and x.shape[0]:
            k = min(self.k, index.ntotal)
            _, found = index.search(x, k)
            _, exact = index.search_exact(x, k)
            recall = recall_at_k(found, exact, k)
        return self._report(index, recall)

    def _report(self, index: LiveIvfIndex, recall: float | None) -> DriftReport:
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
        self._sweep = None


class _Job:
    """One background retrain. The owner thread copies the live lists a slice at a time
    (`copy_slice`); the thread trains meanwhile, waits for the copy, then adds it."""

    def __init__(self, source: LiveIvfIndex) -> None:
        self.source = source
        self.copied = threading.Event()
        self.done = threading.Event()
        self.cancelled = False
        self.result: LiveIvfIndex | None = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.next_list = 0
        self.ids: list[I64] = []
        self.vectors: list[F32] = []

    def copy_slice(self, budget_s: float | None) -> None:
        """Copy lists of the live index (owner thread) for about `budget_s` (None: all)."""
        index = self.source
        if index.cfg.kind != "ivfflat":  # exact vectors sit in one list of the side store
            ids, vectors = index.export()
            self.ids, self.vectors = [ids], [vectors]
            self.copied.set()
            return
        ivf, d = index.ivf, index.dim
        nlist = int(ivf.nlist)
        t0 = time.perf_counter()
        while self.next_list < nlist:
            ids, codes = get_invlist(ivf.invlists, self.next_list)  # type: ignore[no-untyped-call]
            if len(ids):
                self.ids.append(np.asarray(ids, dtype="int64"))
                self.vectors.append(np.asarray(codes).view("float32").reshape(-1, d))
            self.next_list += 1
            if budget_s is not None and time.perf_counter() - t0 >= budget_s:
                break
        if self.next_list >= nlist:
            self.copied.set()

    def run(self, cfg: IndexConfig, sample: F32, version: int) -> None:
        try:
            fresh = LiveIvfIndex.train(cfg, sample)
            fresh.version = version
            self.copied.wait()
            if self.cancelled:
                return
            if self.ids:
                # an ad moved between lists during the copy may be there twice: the later
                # copy is newer (upsert keeps the last), and the journal replay settles it
                fresh.upsert(np.concatenate(self.ids), np.concatenate(self.vectors))
            self.ids, self.vectors = [], []
            self.result = fresh
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()


class BackgroundRetrainer:
    """Trains a replacement index in a background thread; the owner thread polls and swaps.

    `copy_slice_s`: owner-thread time per `poll()` spent copying the live lists.
    """

    def __init__(self, copy_slice_s: float = 0.02) -> None:
        self._job: _Job | None = None
        self.copy_slice_s = copy_slice_s

    @property
    def running(self) -> bool:
        """A retrain was started and not yet swapped in (or discarded) by `poll()`."""
        return self._job is not None

    def start(self, index: LiveIvfIndex, sample: npt.ArrayLike, nlist: int | None = None) -> None:
        """Start journaling updates and training on `sample` in a thread; the live ads are
        copied by the following `poll()` calls. `nlist`: the new index's lists (default: the
        live index's)."""
        if self._job is not None:
            raise IndexStateError("a retrain is already running: poll() until it finishes")
        x = index.prepare(sample)
        cfg = index.cfg if nlist is None else dataclasses.replace(index.cfg, nlist=nlist)
        need = min_training_ads(cfg)
        if x.shape[0] < need:
            raise IndexStateError(
                f"{x.shape[0]} sample vectors are too few to retrain (need {need}): "
                "wait for the reservoir to fill"
            )
        index.begin_journal()
        job = _Job(index)
        job.thread = threading.Thread(
            target=job.run,
            args=(cfg, x, index.version + 1),
            name="annstream-retrain",
            daemon=True,
        )
        self._job = job
        job.thread.start()
        logger.info("retraining on %d sampled ads (%d live ads to copy)", x.shape[0], index.ntotal)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the background work is done (for tests and shutdown); the rest of the
        copy is made now, in the calling (owner) thread."""
        job = self._job
        if job is None:
            return True
        if not job.copied.is_set():
            job.copy_slice(None)
        return job.done.wait(timeout)

    def poll(self, index: LiveIvfIndex) -> LiveIvfIndex | None:
        """Between micro-batches: copy a slice of the live ads, or return the retrained index
        (version + 1) once ready, else None."""
        job = self._job
        if job is None:
            return None
        if index is not job.source:
            raise IndexStateError("poll() must be given the index the retrain was started on")
        if not job.copied.is_set():
            job.copy_slice(self.copy_slice_s)
            return None
        if not job.done.is_set():
            return None
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
        job = self._job
        if job is not None:
            job.cancelled = True
            job.copied.set()
            if job.source is index:
                index.end_journal()
        self._job = None
