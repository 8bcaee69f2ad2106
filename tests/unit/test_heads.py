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


# ---- the decay clock: bounded by the wall clock, carried by the state (issue 11) ----------

NOW_S = 1_750_000_000.0  # the injected wall clock
NOW = int(NOW_S * 1000)
YEAR = 365 * 24 * HOUR


def clocked(**kw: float) -> HeadQueryTracker:
    cfg = HeadsConfig(**{"half_life_s": 3600.0, "enter_score": 5.0, "exit_score": 2.5, **kw})  # type: ignore[arg-type]
    return HeadQueryTracker(cfg, dim=3, max_event_skew_s=600.0, wall_clock=lambda: NOW_S)


def _six_hours(t: HeadQueryTracker) -> tuple[list[int], list[int]]:
    """Queries 0..59 engaged at spread times over six hours, one micro-batch per 10 minutes;
    returns the heads now and the queries that entered and left again."""
    rng = np.random.default_rng(11)
    ever: set[int] = set()
    for step in range(36):
        at = NOW - 6 * HOUR + step * HOUR // 6
        ids = rng.choice(60, 8, replace=False)
        weights = rng.uniform(0.5, 4.0, 8) * (ids < 40 + step)
        t.observe(ids, weights, np.full(8, at), np.ones((8, 3), np.float32) * ids[:, None])
        ch = t.changes()
        ever.update(ch.entered.tolist())
    heads = t.head_ids().tolist()
    return heads, sorted(ever - set(heads))


def test_heads_far_future_event_moves_the_clock_by_the_skew_at_most() -> None:
    t = clocked()
    heads, _ = _six_hours(t)
    assert len(heads) >= 10
    before = t.clock_ms
    at_bound = t.score(heads, before) * 2 ** (-(NOW + 600_000 - before) / HOUR)
    expected_exits = [q for q, s in zip(heads, at_bound, strict=True) if s < 2.5]
    assert len(expected_exits) < len(heads) / 2
    exits: list[int] = []
    for bad in (NOW + 100 * YEAR, NOW * 1000):  # +100 years, and a timestamp in microseconds
        t.observe([1_000], [1.0], [bad], vec([1, 1, 1]))
        exits += t.changes().exited.tolist()
        assert t.clock_ms == NOW + 600_000
    assert exits == expected_exits
    assert t.head_ids().tolist() == sorted(set(heads) - set(exits))
    # the far-future query decays like any other (its time was clipped to the bound)
    assert t.score([1_000], now_ms=NOW + 600_000 + HOUR)[0] == pytest.approx(1.0, rel=0.01)
    # new queries still enter
    t.observe([2_000], [9.0], [NOW], vec([0, 1, 0]))
    assert 2_000 in t.changes().entered.tolist()


def test_heads_event_within_the_skew_counts_at_its_own_time() -> None:
    t = clocked()
    t.observe([1], [6.0], [NOW + 300_000], vec([1, 0, 0]))
    assert t.clock_ms == NOW + 300_000
    assert t.changes().entered.tolist() == [1]


def test_heads_restore_without_new_events_keeps_the_head_set() -> None:
    t = clocked()
    heads, left = _six_hours(t)
    assert heads and left, "the workload must have queries that entered and left"
    other = HeadQueryTracker.from_state(
        t.cfg, 3, t.state(), max_event_skew_s=600.0, wall_clock=lambda: NOW_S + 3600
    )
    assert other.clock_ms == t.clock_ms
    ch = other.changes()
    assert ch.entered.tolist() == heads and ch.exited.tolist() == []
    assert other.head_ids().tolist() == heads
    assert len(other.changes()) == 0


def test_heads_clock_restored_from_partial_states_is_the_latest() -> None:
    t = clocked()
    t.observe([1, 2], [9.0, 9.0], [NOW - 2 * HOUR, NOW - 2 * HOUR], vec([1, 0, 0], [0, 1, 0]))
    t.changes()
    old = t.state([1])
    t.observe([3], [1.0], [NOW], vec([0, 0, 1]))  # advances the clock: 1 and 2 decay to 2.25
    t.changes()
    other = clocked()
    other.load_state(old)
    other.load_state(t.state([3]))
    assert other.clock_ms == NOW
    # 1 was a head, decayed below exit on the clock: reported as exited, not left live
    ch = other.changes()
    assert ch.entered.tolist() == [] and ch.exited.tolist() == [1]


def test_heads_restored_head_below_exit_is_reported_exited_once() -> None:
    t = clocked()
    t.observe([1, 2], [6.0, 20.0], [NOW - 3 * HOUR, NOW - 3 * HOUR], vec([1, 0, 0], [0, 1, 0]))
    assert t.changes().entered.tolist() == [1, 2]
    other = HeadQueryTracker.from_state(t.cfg, 3, t.state(), 600.0, lambda: NOW_S)
    other.observe([3], [1.0], [NOW], vec([0, 0, 1]))  # three hours on: 1 at 0.75, 2 at 2.5
    ch = other.changes()
    assert ch.entered.tolist() == [2] and ch.exited.tolist() == [1]
    assert other.head_ids().tolist() == [2]
    assert len(other.changes()) == 0


def test_heads_restored_heads_are_not_evicted_before_they_are_decided() -> None:
    t = clocked(max_tracked=10)
    t.observe([1], [3.0], [NOW], vec([1, 0, 0]))
    t._head[t._lookup(np.array([1]))[0]] = True  # a head through hysteresis
    other = HeadQueryTracker.from_state(t.cfg, 3, t.state(), 600.0, lambda: NOW_S)
    other.observe(np.arange(100, 120), np.full(20, 4.0), np.full(20, NOW))
    assert 1 in other.tracked_ids().tolist()
    assert other.changes().entered.tolist() == [1]


def test_heads_restored_head_keeps_its_place_within_the_top_n_slack() -> None:
    t = clocked(enter_score=0.0, exit_score=0.0, top_n=2, top_n_slack=0.5)
    t.observe([1, 2, 3], [5.0, 4.0, 3.0], [NOW] * 3, vec([1, 0, 0], [0, 1, 0], [0, 0, 1]))
    assert t.changes().entered.tolist() == [1, 2]
    t.observe([3], [1.5], [NOW])  # 3 overtakes 2, which stays within the top 3
    assert t.changes().entered.tolist() == [3]
    other = HeadQueryTracker.from_state(t.cfg, 3, t.state(), 600.0, lambda: NOW_S)
    assert other.changes().entered.tolist() == [1, 2, 3]


def test_heads_state_of_a_restored_head_not_yet_decided_keeps_it_a_head() -> None:
    t = clocked()
    t.observe([1], [6.0], [NOW - HOUR], vec([1, 0, 0]))
    t.changes()
    t.observe([2], [1.0], [NOW], vec([0, 1, 0]))
    t.changes()  # 1 at 3.0: a head through hysteresis only
    other = HeadQueryTracker.from_state(t.cfg, 3, t.state(), 600.0, lambda: NOW_S)
    assert other.state()["in_head"].tolist() == [True, False]  # e.g. a snapshot before the batch
    third = HeadQueryTracker.from_state(t.cfg, 3, other.state(), 600.0, lambda: NOW_S)
    assert third.changes().entered.tolist() == [1]


def test_an_empty_state_chunk_loads_as_nothing() -> None:
    """The changelog writes a chunk with no rows when a partition's events of a micro-batch
    were all dead-lettered (it records the engagement offset); restoring it must not fail."""
    tracker = HeadQueryTracker(HeadsConfig(enter_score=2.0, exit_score=1.0), 4)
    tracker.load_state(tracker.state(np.empty(0, "int64")))
    assert len(tracker.tracked_ids()) == 0


def test_heads_retired_expiry_travels_with_the_state_and_keeps_the_row() -> None:
    """Issue 11 item 8 across restarts: the expiry of a retired list is part of the state,
    so a new owner knows which readable lists to keep clean; the row is not evicted while
    the list is readable, and re-entering ends it."""
    t = clocked(max_tracked=3)
    t.observe([1, 2], [9.0, 9.0], [NOW - 4 * HOUR, NOW - 4 * HOUR], vec([1, 0, 0], [0, 1, 0]))
    t.changes()
    t.observe([3], [9.0], [NOW], vec([0, 0, 1]))
    assert t.changes().exited.tolist() == [1, 2]
    t.retire([1, 2, 99], [NOW + HOUR, -1, NOW])  # 2: nothing readable; 99: not tracked
    assert [a.tolist() for a in t.retired()] == [[1], [NOW + HOUR]]
    assert t.retired(now_ms=NOW + HOUR)[0].tolist() == []

    other = HeadQueryTracker.from_state(
        t.cfg, 3, t.state(), max_event_skew_s=600.0, wall_clock=lambda: NOW_S
    )
    assert [a.tolist() for a in other.retired([1, 2, 3])] == [[1], [NOW + HOUR]]
    other.observe([4, 5], [0.1, 0.1], [NOW, NOW])  # over max_tracked: 2 goes, 1 stays
    assert 1 in other.tracked_ids().tolist() and 2 not in other.tracked_ids().tolist()
    other.observe([1], [9.0], [NOW])
    assert 1 in other.changes().entered.tolist()
    assert other.retired()[0].tolist() == []
    older = {k: v for k, v in t.state().items() if k != "retired_until_ms"}
    again = HeadQueryTracker.from_state(t.cfg, 3, older, wall_clock=lambda: NOW_S)
    assert again.retired()[0].tolist() == []  # records before the column: none


def test_heads_resumed_queries_re_enter_at_exit_or_are_reported_exited() -> None:
    """Entrants whose rows a restore did not find: their lists may be live, so the next
    decision keeps them (tracked, with a vector, at or above exit) or reports them exited."""
    t = tracker()
    t.observe([1, 2], [3.0, 1.0], [0, 0], vec([1, 0, 0], [0, 1, 0]), [True, True])
    assert len(t.changes(0).entered) == 0  # 3 and 1 are under enter (5)
    t.resume([1, 2, 9])  # 9 is not tracked at all
    ch = t.changes(0)
    assert ch.entered.tolist() == [1] and ch.exited.tolist() == [2, 9]
    assert t.head_ids().tolist() == [1] and 9 in t.tracked_ids().tolist()
    t.resume([1])  # a head stays a head: nothing to decide
    assert len(t.changes(0)) == 0
