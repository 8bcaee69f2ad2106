"""HeadQueryTracker: decayed scores, hysteresis, top N, vector changes, eviction, state."""

from __future__ import annotations

import numpy as np
import pytest

from annstream.config import HeadsConfig
from annstream.heads import HeadQueryTracker

HOUR = 3_600_000


def tracker(**kw: float) -> HeadQueryTracker:
    cfg = HeadsConfig(**{"half_life_s": 3600.0, "enter_score": 5.0, "exit_score": 2.5, **kw})  # type: ignore[arg-type]
    return HeadQueryTracker(cfg, dim=3)


def vec(*rows: list[float]) -> np.ndarray:
    return np.array(rows, dtype=np.float32)


def test_heads_score_decays_with_half_life_and_aggregates_batch() -> None:
    t = tracker()
    t.observe([1, 1, 2], [4.0, 4.0, 1.0], [0, HOUR, HOUR])
    # 4 halved after one hour plus 4 at that time
    assert t.score([1, 2, 3], now_ms=HOUR).tolist() == pytest.approx([6.0, 1.0, 0.0])
    assert t.score([1], now_ms=2 * HOUR)[0] == pytest.approx(3.0)
    t.observe([1], [1.0], [0])  # a late event decays to the latest time seen
    assert t.score([1], now_ms=HOUR)[0] == pytest.approx(6.5)


def test_heads_enter_exit_with_hysteresis_and_need_a_vector() -> None:
    t = tracker()
    t.observe([7, 8], [6.0, 6.0], [0, 0], vec([1, 0, 0], [0, 0, 0]), [True, False])
    ch = t.changes(0)
    assert ch.entered.tolist() == [7]  # 8 has no vector yet
    assert t.head_ids().tolist() == [7]
    # one hour later 7 is at 3: below enter, above exit, so it stays
    assert len(t.changes(HOUR)) == 0
    ch = t.changes(2 * HOUR)  # 1.5 < 2.5
    assert ch.exited.tolist() == [7] and t.head_ids().tolist() == []
    t.observe([8], [0.0], [0], vec([0, 1, 0]), None)
    assert t.changes(0).entered.tolist() == [7, 8]  # back at time 0 both score 6


def test_heads_vector_changed_reported_once_for_head_queries_only() -> None:
    t = tracker()
    t.observe([1, 2], [9.0, 1.0], [0, 0], vec([1, 0, 0], [0, 1, 0]))
    t.changes(0)
    t.observe([1, 1, 2], [0.0, 0.0, 0.0], [1, 2, 1], vec([1, 0, 0], [0, 0, 1], [1, 1, 1]))
    ch = t.changes(2)
    assert ch.vector_changed.tolist() == [1] and ch.entered.tolist() == []
    np.testing.assert_array_equal(t.vectors([1]), vec([0, 0, 1]))  # the last one in the batch
    assert len(t.changes(3)) == 0
    t.observe([1], [0.0], [3], vec([0, 0, 1]))  # same vector again: no change
    assert len(t.changes(3)) == 0
    with pytest.raises(KeyError):
        t.vectors([99])


def test_heads_top_n_with_slack() -> None:
    t = tracker(enter_score=0.0, exit_score=0.0, top_n=2, top_n_slack=0.5)
    ids = np.arange(5)
    t.observe(ids, [5.0, 4.0, 3.0, 2.0, 1.0], np.zeros(5), np.eye(5, 3, dtype=np.float32))
    assert t.changes(0).entered.tolist() == [0, 1]
    t.observe([2], [1.5], [0])  # 2 now ranks first at 4.5 > 4: enters, 1 ranks third: stays
    ch = t.changes(0)
    assert ch.entered.tolist() == [2] and ch.exited.tolist() == []
    t.observe([3, 4], [10.0, 10.0], [0, 0])  # 2 and 1 fall to 4th and 5th, beyond 2 * 1.5
    ch = t.changes(0)
    assert ch.entered.tolist() == [3, 4] and ch.exited.tolist() == [1, 2]


def test_heads_memory_bounded_by_evicting_cold_non_head_queries() -> None:
    t = tracker(max_tracked=100)
    t.observe([0], [50.0], [0], vec([1, 1, 1]))
    t.changes(0)
    ids = np.arange(1, 301)
    t.observe(ids, ids.astype(np.float32) / 100, np.zeros(300))
    assert len(t) <= 100
    assert t.head_ids().tolist() == [0]
    assert t.score([300])[0] == pytest.approx(3.0)  # the hottest survive
    assert t.score([1])[0] == 0.0


def test_heads_drop_and_state_round_trip() -> None:
    t = tracker()
    t.observe([1, 2, 3], [9.0, 3.0, 9.0], [0, 0, 0], vec([1, 0, 0], [0, 1, 0], [0, 0, 1]))
    t.changes(0)
    assert t.drop([3, 42]).tolist() == [3]
    ch = t.changes(0)
    assert ch.dropped.tolist() == [3] and ch.exited.tolist() == []
    t.observe([1], [0.0], [HOUR])  # 1 decays to 4.5: head only thanks to hysteresis
    state = t.state()
    assert state["query_ids"].tolist() == [1, 2]
    other = HeadQueryTracker.from_state(t.cfg, 3, state)
    assert other.changes(HOUR).entered.tolist() == [1]  # resumes at the exit threshold
    np.testing.assert_array_equal(other.vectors([2]), vec([0, 1, 0]))
    assert other.score([1, 2], now_ms=HOUR).tolist() == pytest.approx([4.5, 1.5])


def test_heads_rejects_bad_input() -> None:
    t = tracker()
    with pytest.raises(ValueError, match="same length"):
        t.observe([1, 2], [1.0], [0, 0])
    with pytest.raises(ValueError, match="shape"):
        t.observe([1], [1.0], [0], np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="finite"):
        t.observe([1], [1.0], [0], vec([np.nan, 0, 0]))
    with pytest.raises(ValueError, match="exit_score"):
        HeadQueryTracker(HeadsConfig(enter_score=1.0, exit_score=2.0), dim=3)


def test_tracked_ids_lists_heads_and_non_heads() -> None:
    tracker = HeadQueryTracker(HeadsConfig(enter_score=2.0, exit_score=1.0), 4)
    ids = np.array([5, 3, 5], dtype="int64")
    tracker.observe(ids, np.ones(3, "float32"), np.zeros(3, "int64"), np.ones((3, 4), "float32"))
    tracker.changes(0)
    np.testing.assert_array_equal(tracker.tracked_ids(), [3, 5])
    np.testing.assert_array_equal(tracker.head_ids(), [5])


def test_an_empty_state_chunk_loads_as_nothing() -> None:
    """The changelog writes a chunk with no rows when a partition's events of a micro-batch
    were all dead-lettered (it records the engagement offset); restoring it must not fail."""
    tracker = HeadQueryTracker(HeadsConfig(enter_score=2.0, exit_score=1.0), 4)
    tracker.load_state(tracker.state(np.empty(0, "int64")))
    assert len(tracker.tracked_ids()) == 0
