"""annstream.tuning: the first-training gate, fit warnings and the nprobe loop."""

from __future__ import annotations

import math

import pytest

from annstream.config import IndexConfig
from annstream.tuning import (
    NprobeTuner,
    TrainingGate,
    fit_warnings,
    min_training_ads,
    suggest_nlist,
    suggest_nprobe,
)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_gate_trains_at_train_size_or_caught_up_or_after_the_wait_never_under_nlist() -> None:
    clock = Clock()
    gate = TrainingGate(IndexConfig(nlist=1024, train_size=50_000, train_wait_s=300), clock)
    assert gate.decide(50_000, False)[0]
    ready, why = gate.decide(1_000, True)
    assert not ready and "waiting for at least 1,024 (index.nlist 1024 needs them" in why
    ready, why = gate.decide(12_000, False)
    assert not ready
    assert why == (
        "training: 12,000 of 50,000 ads, waiting for the ad topic to be caught up or 300 s"
    )
    ready, why = gate.decide(12_000, True)
    assert ready and "caught up at 12,000 ads" in why
    ready, why = gate.decide(12_000, None)  # nothing to catch up with at start
    assert not ready and why.endswith("waiting for more ads or 300 s")
    clock.t += 300
    ready, why = gate.decide(12_000, False)
    assert ready and "index.train_wait_s (300 s) passed" in why


def test_ivfpq_needs_its_codebook_size_to_train() -> None:
    pq = IndexConfig(nlist=16, kind="ivfpq", pq_nbits=8)
    assert min_training_ads(pq) == 256
    assert (
        "at least 256 (index.pq_nbits 8 (2^nbits codewords) needs them"
        in (TrainingGate(pq).decide(100, True)[1])
    )
    assert min_training_ads(IndexConfig(nlist=16)) == 16


@pytest.mark.parametrize(
    ("n", "nlist"), [(30_000, 256), (50_000, 512), (1_000_000, 2048), (500, 8), (10, 1)]
)
def test_suggested_nlist_is_a_power_of_two_near_two_sqrt_n_with_39_ads_per_list(
    n: int, nlist: int
) -> None:
    assert suggest_nlist(n) == nlist


def test_fit_warnings_name_the_setting_and_a_value() -> None:
    """The issue's case: 30,000 384-d ads under the defaults (nlist 1024, nprobe 32), K 100."""
    warnings = fit_warnings(30_000, 1024, 32, 100)
    assert len(warnings) == 2
    assert warnings[0].startswith("index.nlist = 1024 is far from 30,000 ads (29 per list")
    assert "suggest index.nlist = 256 (and nprobe = 64)" in warnings[0]
    assert "annstream tune --k 100" in warnings[0]
    assert warnings[1].startswith("index.nprobe = 32 of 1024 lists scans ~938 ads per query")
    assert "suggest index.nprobe = 256" in warnings[1]  # 29 ads per list: lower nlist first
    too_few_lists = fit_warnings(10_000_000, 64, 8, 10)
    assert len(too_few_lists) == 1 and "over 4096: every probe scans" in too_few_lists[0]
    assert fit_warnings(50_000, 512, 32, 100) == []
    assert fit_warnings(0, 1024, 32, 100) == []
    assert "refresh.nprobe = 1" in fit_warnings(50_000, 512, 1, 100, "refresh.nprobe")[0]
    assert suggest_nprobe(50_000, 512, 100) == 64
    assert suggest_nprobe(100_000, 256, 10) == 16  # at least 1/16 of the lists


def test_tuner_raises_nprobe_until_the_target_then_asks_for_a_smaller_nlist() -> None:
    tuner = NprobeTuner(0.95, nprobe=1, nlist=64)
    assert tuner.observe(0.5, settled=False) is None  # lists of the old nprobe: ignored
    step = tuner.observe(0.5, settled=True)
    assert step is not None and step.nprobe == 2 and step.retrain_nlist is None
    assert "index.recall_target 0.950: nprobe 1 -> 2" in step.reason
    step = tuner.observe(0.9, settled=True)
    assert step is not None and step.nprobe == 3  # close: x 1.5
    assert tuner.observe(0.96, settled=True) is None
    assert tuner.observe(math.nan, settled=True) is None
    seen = [tuner.observe(0.6, settled=True) for _ in range(4)]
    assert [s.nprobe for s in seen if s is not None] == [6, 12, 16, 16]
    last = seen[-1]
    assert (
        last is not None
        and last.retrain_nlist == 32
        and "retraining with nlist 32" in (last.reason)
    )
    assert tuner.observe(0.6, settled=True) is None  # once per index
    tuner.index_changed(32, 16)
    assert tuner.bound == 8 and tuner.history[0] == (64, 1, 0.5)
    with pytest.raises(ValueError, match="recall_target"):
        NprobeTuner(0.0, 1, 8)
