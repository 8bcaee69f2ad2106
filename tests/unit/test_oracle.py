"""The exact oracle on small hand-made cases: every named check fails when it must, ties pass."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from annstream.store.record import NeighbourLists
from annstream.store.sqlite import SqliteStore
from annstream.testing.oracle import ExactOracle, HeadRules, StoredView, read_store

RULES = HeadRules(k=2, margin=1, enter_score=4.0, exit_score=2.0, half_life_s=3600.0, metric="ip")
HOUR = 3_600_000
E = np.eye(4, dtype=np.float32)


def _oracle() -> ExactOracle:
    """Ads 1..4 on the axes, scaled 4, 3, 2, 1; query 10 points along (1, 1, 1, 1)."""
    o = ExactOracle(RULES, dim=4)
    o.add_ads([1, 2, 3, 4], [False] * 4, E * np.array([[4], [3], [2], [1]], dtype=np.float32))
    q = np.ones((1, 4), dtype=np.float32)
    o.add_engagements([10], [5.0], [0], q)
    return o


def _view(
    rows: list[list[int]],
    scores: Sequence[Sequence[float]],
    qids: list[int] | None = None,
    expiring: list[bool] | None = None,
    versions: list[int] | None = None,
) -> StoredView:
    width = RULES.width
    ids = np.full((len(rows), width), -1, dtype=np.int64)
    sc = np.full((len(rows), width), -np.inf, dtype=np.float32)
    for i, (r, s) in enumerate(zip(rows, scores, strict=True)):
        ids[i, : len(r)] = r
        sc[i, : len(s)] = s
    n = len(rows)
    return StoredView(
        query_ids=np.array(qids or [10], dtype=np.int64),
        ids=ids,
        scores=sc,
        versions=np.array(versions or [1] * n, dtype=np.int64),
        expiring=np.array(expiring or [False] * n, dtype=bool),
    )


def test_the_exact_list_passes_every_check() -> None:
    rep = _oracle().judge(_view([[1, 2, 3]], [[4, 3, 2]]), index_ads=4)
    assert rep.ok(), rep.as_dict()
    assert rep.checks["list_exact"].checked == 1
    assert rep.checks["score_stale"].checked == 3
    assert rep.checks["index_count"].checked == 1


def test_a_tie_at_the_last_place_accepts_either_ad() -> None:
    o = _oracle()
    o.add_ads([5], [False], [[0, 0, 2, 0]])  # ties ad 3 at 2.0
    for last in (3, 5):
        assert o.judge(_view([[1, 2, last]], [[4, 3, 2]])).ok()
    rep = o.judge(_view([[1, 2, 4]], [[4, 3, 1]]))
    assert rep.failed() == {"list_exact": 1}


def test_ties_inside_the_list_may_come_in_either_order() -> None:
    o = _oracle()
    o.add_ads([5], [False], [[0, 3, 0, 0]])  # ties ad 2 at 3.0
    assert o.judge(_view([[1, 5, 2]], [[4, 3, 3]])).ok()
    assert o.judge(_view([[1, 2, 5]], [[4, 3, 3]])).ok()


def test_a_list_out_of_order_missing_an_ad_or_too_short_is_not_exact() -> None:
    o = _oracle()
    for rows, scores in (([[2, 1, 3]], [[3, 4, 2]]), ([[1, 3, 4]], [[4, 2, 1]]), ([[1]], [[4]])):
        assert o.judge(_view(rows, scores)).failed() == {"list_exact": 1}, rows
    # a valid prefix between K and K + margin is exact
    assert o.judge(_view([[1, 2]], [[4, 3]])).ok()


def test_a_stale_score_is_named() -> None:
    rep = _oracle().judge(_view([[1, 2, 3]], [[4, 3.01, 2]]))
    assert rep.failed() == {"score_stale": 1}
    assert "ad 2" in rep.checks["score_stale"].examples[0]


def test_a_deleted_ad_in_a_live_list_and_in_an_expiring_one_are_separate_checks() -> None:
    o = _oracle()
    o.add_ads([3], [True], np.zeros((1, 4)))
    o.add_engagements([11], [1.0], [0], np.ones((1, 4)))  # score 1 < exit: must have left
    view = _view([[1, 2, 3], [3, 1]], [[4, 3, 2], [2, 4]], qids=[10, 11], expiring=[False, True])
    rep = o.judge(view)
    assert rep.failed() == {"deleted_ad_live": 1, "list_exact": 1, "deleted_ad_expiring": 1}
    assert rep.live_lists == 1 and rep.expiring_lists == 1


def test_decay_decides_who_must_and_who_must_not_be_a_head_query() -> None:
    o = _oracle()  # query 10: weight 5 at t = 0
    # query 11: weight 5 two half-lives after: the clock moves, query 10 decays to 1.25 < exit
    o.add_engagements([11], [5.0], [2 * HOUR], np.ones((1, 4)))
    # late events (before the clock): query 12 at 8 one half-life old = 4.0, on the enter
    # score (a tie: may be a head query), query 13 at 12 = 6 (must be one)
    o.add_engagements([12, 13], [8.0, 12.0], [HOUR, HOUR], np.ones((2, 4)))
    must, may = o.head_bounds()
    assert must.tolist() == [11, 13] and may.tolist() == [11, 12, 13]
    assert o.clock_ms() == 2 * HOUR
    ok = [[1, 2, 3], [1, 2, 3]]
    ok, sc = [[1, 2, 3]] * 3, [[4, 3, 2]] * 3
    rep = o.judge(_view(ok, sc, qids=[10, 11, 13]))
    assert rep.failed() == {"orphan_live_list": 1}
    assert "query 10" in rep.checks["orphan_live_list"].examples[0]
    assert o.judge(_view(ok, sc, qids=[10, 11, 13], expiring=[True, False, False])).ok()
    rep = o.judge(_view(ok, sc, qids=[10, 11, 13], expiring=[True, True, False]))
    assert rep.failed() == {"head_missing": 1}


def test_between_exit_and_enter_a_query_may_or_may_not_be_a_head_query() -> None:
    o = ExactOracle(RULES, dim=4)
    o.add_ads([1, 2, 3], [False] * 3, E[:3])
    o.add_engagements([10], [3.0], [0], np.ones((1, 4)))
    assert o.judge(_view([[1, 2, 3]], [[1, 1, 1]])).ok()
    assert o.judge(_view([[1, 2, 3]], [[1, 1, 1]], expiring=[True])).ok()


def test_versions_going_backwards_across_reads_are_counted() -> None:
    o = _oracle()
    o.observe_versions(_view([[1, 2, 3]], [[4, 3, 2]], versions=[5]))
    o.observe_versions(_view([[1, 2, 3]], [[4, 3, 2]], versions=[7]))
    rep = o.judge(_view([[1, 2, 3]], [[4, 3, 2]], versions=[6]))
    assert rep.failed() == {"version_backwards": 1}
    assert rep.checks["version_backwards"].checked == 3


def test_index_count_compares_with_the_live_ads() -> None:
    o = _oracle()
    o.add_ads([2], [True], np.zeros((1, 4)))
    rep = o.judge(_view([[1, 3, 4]], [[4, 2, 1]]), index_ads=4)
    assert rep.failed() == {"index_count": 1}
    assert rep.checks["index_count"].examples == ["index holds 4 ads, 3 live"]


def test_cosine_normalises_both_sides() -> None:
    rules = HeadRules(k=1, margin=0, enter_score=1.0, exit_score=0.5, half_life_s=60.0)
    o = ExactOracle(rules, dim=2)
    o.add_ads([1, 2], [False, False], [[10, 0], [1, 1]])
    o.add_engagements([7], [1.0], [0], [[3, 0]])
    one = StoredView(
        np.array([7]),
        np.array([[1]]),
        np.array([[1.0]], "float32"),
        np.array([1]),
        np.zeros(1, bool),
    )
    assert o.judge(one).ok()


def test_read_store_reads_lists_and_their_expiry_from_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = SqliteStore(str(tmp_path / "store.db"))
    lists = NeighbourLists(
        query_ids=np.array([10, 11], dtype=np.int64),
        ids=np.array([[1, 2, 3], [3, 1, -1]], dtype=np.int64),
        scores=np.array([[4, 3, 2], [2, 4, -np.inf]], dtype=np.float32),
        versions=np.array([3, 4], dtype=np.int64),
        computed_at_ms=np.zeros(2, dtype=np.int64),
        k=2,
    )
    store.upsert(lists)
    store.expire(np.array([11]), 3600)
    store.close()
    view = read_store(url, [10, 11, 12])
    assert view.query_ids.tolist() == [10, 11]
    assert view.expiring.tolist() == [False, True]
    assert view.versions.tolist() == [3, 4]
    assert view.ids[1].tolist()[:2] == [3, 1]
