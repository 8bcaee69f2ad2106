"""Fitting the index to the data: when to train, how far the settings are from the catalogue,
and the nprobe loop that holds `index.recall_target`.

Three small pieces the service drives from its owner thread:

- `TrainingGate`: the first index is trained at `index.train_size` ads, or earlier on what is
  there once the ad topic is caught up or `index.train_wait_s` passed, never on fewer ads
  than Faiss needs for `index.nlist` (it keeps waiting, and says so).
- `fit_warnings`: the configured nlist / nprobe against the catalogue size and K, each with
  the setting to change and a suggested value (rules of thumb; `annstream tune` measures).
- `NprobeTuner`: raises nprobe from the stored recall the recall monitor measures until
  `index.recall_target` holds; past `MAX_PROBE_SHARE` of the lists it asks for a smaller
  nlist at the next retrain instead.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from annstream.config import IndexConfig

__all__ = [
    "CANDIDATES_PER_K",
    "MAX_ADS_PER_LIST",
    "MAX_PROBE_SHARE",
    "MIN_ADS_PER_LIST",
    "NprobeTuner",
    "TrainingGate",
    "TunerStep",
    "fit_warnings",
    "min_training_ads",
    "suggest_nlist",
    "suggest_nprobe",
]

logger = logging.getLogger(__name__)

MIN_ADS_PER_LIST = 39
"""Faiss warns when k-means gets fewer training points per centroid: lists that thin cost recall."""
MAX_ADS_PER_LIST = 4_096
"""Past this many ads per list every probe scans a large slice: search is slow for no recall."""
CANDIDATES_PER_K = 10
"""Probed lists holding fewer ads than this many per wanted neighbour: recall suffers."""
_SUGGESTED_PER_K = 50
_SUGGESTED_MIN_SHARE = 1 / 16
"""A suggested nprobe scans ~50 ads per wanted neighbour and at least 1/16 of the lists
(measured: recall@100 ~0.96 at nlist 256 / nprobe 64 on 30k clustered 384-d ads)."""
MAX_PROBE_SHARE = 0.25
"""The tuner does not probe more than this share of the lists: past it, nlist is too large."""
_TUNE_HINT = "run `annstream tune --k {k}` on your vectors to measure"


def _pow2(x: float) -> int:
    """The power of two nearest to `x` (in log scale), at least 1."""
    return 1 << max(0, round(math.log2(max(x, 1.0))))


def min_training_ads(cfg: IndexConfig) -> int:
    """Fewest ads Faiss trains `cfg` on: nlist centroids (and 2^nbits PQ codewords)."""
    need = cfg.nlist
    if cfg.kind == "ivfpq":
        need = max(need, 1 << cfg.pq_nbits)
    return need


def suggest_nlist(n_ads: int) -> int:
    """A power of two near 2 sqrt(n), with at least `MIN_ADS_PER_LIST` ads per list."""
    cap = max(1, n_ads // MIN_ADS_PER_LIST)
    nlist = _pow2(2.0 * math.sqrt(max(n_ads, 1)))
    while nlist > cap and nlist > 1:
        nlist //= 2
    return nlist


def suggest_nprobe(n_ads: int, nlist: int, k: int) -> int:
    """A power of two (at most nlist) whose lists hold ~50 x k ads on average, and at least
    1/16 of the lists."""
    per_list = max(n_ads / max(nlist, 1), 1e-9)
    want = max(_SUGGESTED_PER_K * k / per_list, _SUGGESTED_MIN_SHARE * nlist)
    return min(nlist, 1 << max(0, math.ceil(math.log2(max(want, 1.0)))))


def fit_warnings(
    n_ads: int, nlist: int, nprobe: int, k: int, nprobe_key: str = "index.nprobe"
) -> list[str]:
    """How the index settings miss a catalogue of `n_ads` ads at K = `k`: one message per
    setting, naming it with a suggested value (empty: nothing to say)."""
    if n_ads <= 0 or nlist <= 0:
        return []
    out: list[str] = []
    hint = _TUNE_HINT.format(k=k)
    per_list = n_ads / nlist
    if per_list < MIN_ADS_PER_LIST or per_list > MAX_ADS_PER_LIST:
        better = suggest_nlist(n_ads)
        why = (
            f"under {MIN_ADS_PER_LIST}: thin lists, poor recall at any nprobe"
            if per_list < MIN_ADS_PER_LIST
            else f"over {MAX_ADS_PER_LIST}: every probe scans a large slice, slow search"
        )
        out.append(
            f"index.nlist = {nlist} is far from {n_ads:,} ads ({per_list:,.0f} per list, {why}): "
            f"suggest index.nlist = {better} (and nprobe = "
            f"{suggest_nprobe(n_ads, better, k)}); {hint}"
        )
    scanned = min(nprobe, nlist) * per_list
    if scanned < CANDIDATES_PER_K * k and nprobe < nlist:
        out.append(
            f"{nprobe_key} = {nprobe} of {nlist} lists scans ~{scanned:,.0f} ads per query, "
            f"under {CANDIDATES_PER_K} x K = {CANDIDATES_PER_K * k:,}: recall@{k} suffers; "
            f"suggest {nprobe_key} = {suggest_nprobe(n_ads, nlist, k)} (or set "
            f"index.recall_target); {hint}"
        )
    return out


class TrainingGate:
    """Whether the first index can be trained now, and what the service is waiting for."""

    def __init__(self, cfg: IndexConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.train_size = cfg.train_size
        self.need = min_training_ads(cfg)
        self.needed_by = (
            f"index.nlist {cfg.nlist}"
            if self.need == cfg.nlist
            else f"index.pq_nbits {cfg.pq_nbits} (2^nbits codewords)"
        )
        self.wait_s = cfg.train_wait_s
        self._clock = clock
        self.started = clock()

    def decide(self, ads: int, caught_up: bool | None) -> tuple[bool, str]:
        """(train now, why or what it waits for) for `ads` buffered ads. `caught_up` None:
        the ad topic held nothing to catch up with at start (or the broker did not say), so
        only `train_size` or the wait apply (a service started before the ads are produced
        does not train on the first few)."""
        if ads >= self.train_size:
            return True, f"{ads:,} ads reached index.train_size {self.train_size:,}"
        if ads < self.need:
            return False, (
                f"training: {ads:,} of {self.train_size:,} ads, waiting for at least "
                f"{self.need:,} ({self.needed_by} needs them; lower it to train on fewer)"
            )
        if caught_up:
            return True, f"the ad topic is caught up at {ads:,} ads"
        left = self.wait_s - (self._clock() - self.started)
        if left <= 0:
            return True, f"index.train_wait_s ({self.wait_s:g} s) passed at {ads:,} ads"
        what = "the ad topic to be caught up" if caught_up is not None else "more ads"
        return (
            False,
            f"training: {ads:,} of {self.train_size:,} ads, waiting for {what} or {left:.0f} s",
        )


@dataclass(frozen=True)
class TunerStep:
    """What the tuner asks for: a new nprobe (recompute every list), or a smaller nlist at
    the next retrain (`retrain_nlist`, with `nprobe` scaled to it)."""

    nprobe: int
    retrain_nlist: int | None
    reason: str


class NprobeTuner:
    """Raises nprobe until the measured stored recall@K reaches `target`.

    A measurement counts only once the lists of the last change are all recomputed and stored
    (`settled`). Below target: nprobe x 2 when more than 0.1 short, else x 1.5 (at least + 1),
    never past `MAX_PROBE_SHARE` of the lists; at that bound it asks for nlist / 2 at the next
    retrain (same nprobe: twice the ads scanned), once per index. It never lowers nprobe: lower it in the config (see `annstream tune`).
    """

    def __init__(self, target: float, nprobe: int, nlist: int) -> None:
        if not 0.0 < target <= 1.0:
            raise ValueError(f"index.recall_target must be in (0, 1], got {target}")
        self.target = target
        self.nprobe = nprobe
        self.nlist = nlist
        self.last: float | None = None
        self.retrain_asked = False
        self.history: list[tuple[int, int, float]] = []
        """(nlist, nprobe, recall) of every settled measurement."""

    @property
    def bound(self) -> int:
        return max(1, min(self.nlist, math.ceil(MAX_PROBE_SHARE * self.nlist)))

    def index_changed(self, nlist: int, nprobe: int) -> None:
        """A retrained index was swapped in."""
        self.nlist, self.nprobe = nlist, nprobe
        self.retrain_asked = False

    def observe(self, recall: float, settled: bool) -> TunerStep | None:
        """A stored-recall measurement; a step when one is due."""
        if not settled or math.isnan(recall):
            return None
        self.last = recall
        self.history.append((self.nlist, self.nprobe, recall))
        if recall >= self.target:
            return None
        short = self.target - recall
        if self.nprobe < self.bound:
            grown = self.nprobe * 2 if short > 0.1 else math.ceil(self.nprobe * 1.5)
            new = min(self.bound, max(self.nprobe + 1, grown))
            reason = (
                f"stored recall {recall:.3f} < index.recall_target {self.target:.3f}: "
                f"nprobe {self.nprobe} -> {new}"
            )
            self.nprobe = new
            return TunerStep(new, None, reason)
        if self.retrain_asked or self.nlist < 2:
            return None
        self.retrain_asked = True
        nlist = self.nlist // 2
        nprobe = min(nlist, self.nprobe)
        return TunerStep(
            nprobe,
            nlist,
            f"stored recall {recall:.3f} < index.recall_target {self.target:.3f} at nprobe "
            f"{self.nprobe} ({MAX_PROBE_SHARE:.0%} of {self.nlist} lists): retraining with "
            f"nlist {nlist}",
        )
