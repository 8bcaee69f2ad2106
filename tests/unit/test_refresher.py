"""The refresher against the real LiveIvfIndex: after every micro-batch each head query's
top K equals a fresh search of the live index (same quantizer and nprobe), ties aside."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annstream.config import IndexConfig, RefreshConfig
from annstream.heads import HeadChanges
from annstream.index import LiveIvfIndex
from annstream.refresher import AdChanges, MicroBatcher, Refresher

DIM = 8
K = 5


class World:
    """A live index, query vectors by id, and a refresher under test."""

    def __init__(self, metric: str = "cosine", margin: int = 2, seed: int = 0, n_ads: int = 300):
        self.rng = np.random.default_rng(seed)
        self.cfg = IndexConfig(dim=DIM, metric=metric, nlist=8, nprobe=3)
        base = self.rng.standard_normal((n_ads, DIM)).astype(np.float32)
        self.index = LiveIvfIndex.train(self.cfg, self.rng.standard_normal((400, DIM)))
        self.index.upsert(np.arange(n_ads), base)
        self.next_ad = n_ads
        self.queries: dict[int, npt.NDArray[np.float32]] = {}
        self.refresher = Refresher(self.index, RefreshConfig(k=K, margin=margin))
        self.version = 0

    def lookup(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        return np.array([self.queries[int(i)] for i in ids], dtype=np.float32).reshape(-1, DIM)

    def step(self, ads: AdChanges | None = None, heads: HeadChanges | None = None) -> Any:
        self.version += 1
        return self.refresher.apply(
            ads or AdChanges.empty(DIM), heads or HeadChanges(), self.lookup, self.version
        )

    def check(self) -> None:
        qids = np.array(sorted(self.queries), dtype=np.int64)
        assert sorted(self.refresher.head_ids().tolist()) == qids.tolist()
        if not len(qids):
            return
        want_s, want_i = self.index.search(self.lookup(qids), K)
        got_s, got_i = self.refresher.topk(qids)
        got_s, got_i = got_s[:, :K], got_i[:, :K]
        np.testing.assert_allclose(got_s, want_s, rtol=1e-4, atol=1e-4)
        bad = np.flatnonzero(np.any(got_i != want_i, axis=1))
        for row in bad:  # ties aside: equal ids wherever the scores are distinct
            s = want_s[row]
            tied = np.isclose(s[:, None], s[None, :], rtol=1e-5, atol=1e-6).sum(axis=1) > 1
            assert np.array_equal(got_i[row][~tied], want_i[row][~tied]), (
                row,
                got_i[row],
                want_i[row],
            )


ops = st.lists(
    st.tuples(
        st.integers(0, 6),  # inserts
        st.integers(0, 6),  # deletes
        st.integers(0, 4),  # updates
        st.integers(0, 3),  # head queries entering
        st.integers(0, 2),  # head queries leaving
        st.integers(0, 2),  # query vectors changing
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    metric=st.sampled_from(["cosine", "ip", "l2"]),
    margin=st.integers(0, 3),
    batches=ops,
)
def test_refresher_topk_matches_fresh_search_after_every_batch(
    seed: int, metric: str, margin: int, batches: list[tuple[int, ...]]
) -> None:
    w = World(metric=metric, margin=margin, seed=seed, n_ads=60)
    rng = w.rng
    next_q = 0
    for n_ins, n_del, n_upd, n_enter, n_exit, n_vec in batches:
        live = w.index.ids()
        dels = rng.choice(live, min(n_del, len(live)), replace=False)
        upds = rng.choice(live, min(n_upd, len(live)), replace=False)
        ins = np.arange(w.next_ad, w.next_ad + n_ins, dtype=np.int64)
        w.next_ad += n_ins
        up_ids = np.concatenate([upds, ins]).astype(np.int64)
        ads = AdChanges(up_ids, rng.standard_normal((len(up_ids), DIM)).astype(np.float32), dels)
        heads_now = np.array(sorted(w.queries), dtype=np.int64)
        exited = rng.choice(heads_now, min(n_exit, len(heads_now)), replace=False)
        for q in exited:
            del w.queries[int(q)]
        stay = np.array(sorted(w.queries), dtype=np.int64)
        changed = rng.choice(stay, min(n_vec, len(stay)), replace=False)
        entered = np.arange(next_q, next_q + n_enter, dtype=np.int64)
        next_q += n_enter
        for q in np.concatenate([changed, entered]):
            w.queries[int(q)] = rng.standard_normal(DIM).astype(np.float32)
        w.step(ads, HeadChanges(entered=entered, exited=np.sort(exited), vector_changed=changed))
        w.check()


def test_refresher_emits_only_queries_whose_topk_changed() -> None:
    w = World()
    w.queries = {i: w.rng.standard_normal(DIM).astype(np.float32) for i in range(40)}
    res = w.step(heads=HeadChanges(entered=np.arange(40, dtype=np.int64)))
    assert res.query_ids.tolist() == list(range(40))
    assert res.ids.shape == (40, K + 2) and res.version == 1
    # a copy of query 3's best ad, slightly closer: changes query 3 for sure
    _, before = w.refresher.topk(np.arange(40))
    vec = w.queries[3] * 10
    res = w.step(AdChanges(np.array([10_000]), vec[None, :], np.empty(0, np.int64)))
    assert 3 in res.query_ids.tolist()
    _, after = w.refresher.topk(np.arange(40))
    changed = np.flatnonzero(np.any(before[:, :K] != after[:, :K], axis=1))
    assert res.query_ids.tolist() == changed.tolist()
    assert res.ids[res.query_ids.tolist().index(3), 0] == 10_000
    w.check()
    res = w.step()
    assert len(res.query_ids) == 0 and res.stats["changed"] == 0


def test_refresher_deletes_refill_from_margin_then_research() -> None:
    w = World(margin=3)
    w.queries = {0: w.rng.standard_normal(DIM).astype(np.float32)}
    w.step(heads=HeadChanges(entered=np.array([0])))
    for _ in range(3):  # three deletes of the current best: margin absorbs, then re-search
        _, ids = w.refresher.topk(np.array([0]))
        res = w.step(AdChanges(np.empty(0, np.int64), np.empty((0, DIM), np.float32), ids[0, :1]))
        assert res.query_ids.tolist() == [0]
        assert ids[0, 0] not in res.ids[0]
        w.check()
    assert res.stats["re_searched"] + res.stats["full_searches"] >= 0
    # an unknown id deleted and an update of an ad change nothing wrong
    w.step(
        AdChanges(
            np.array([5]), w.rng.standard_normal((1, DIM)).astype(np.float32), np.array([99_999])
        )
    )
    w.check()


def test_refresher_head_exit_forgets_and_vector_change_researches() -> None:
    w = World()
    w.queries = {i: w.rng.standard_normal(DIM).astype(np.float32) for i in range(5)}
    w.step(heads=HeadChanges(entered=np.arange(5, dtype=np.int64)))
    del w.queries[2]
    w.queries[4] = w.rng.standard_normal(DIM).astype(np.float32)
    res = w.step(heads=HeadChanges(exited=np.array([2]), vector_changed=np.array([4])))
    assert res.query_ids.tolist() == [4]
    assert w.refresher.head_ids().tolist() == [0, 1, 3, 4]
    scores, ids = w.refresher.topk(np.array([2]))
    assert ids.tolist() == [[-1] * (K + 2)] and np.all(np.isneginf(scores))
    w.check()


def test_refresher_recomputes_everything_after_retrain_rate_limited() -> None:
    w = World(n_ads=200)
    w.refresher = Refresher(w.index, RefreshConfig(k=K, margin=2, full_recompute_per_batch=7))
    w.queries = {i: w.rng.standard_normal(DIM).astype(np.float32) for i in range(20)}
    w.step(heads=HeadChanges(entered=np.arange(20, dtype=np.int64)))
    new_index = w.index.retrained(w.rng.standard_normal((400, DIM)).astype(np.float32))
    assert new_index.version == w.index.version + 1
    w.index = new_index
    w.refresher.swap_index(new_index)
    seen = []
    for _ in range(3):
        res = w.step(
            AdChanges(np.array([w.next_ad]), w.rng.standard_normal((1, DIM)).astype(np.float32))
        )
        w.next_ad += 1
        seen.append(res.stats["pending_full"])
    assert seen == [13, 6, 0]
    w.check()
    w.refresher.recompute_all()
    assert w.refresher.pending_full == 20
    w.step()
    w.step()
    w.step()
    assert w.refresher.pending_full == 0
    w.check()


def test_refresher_rejects_non_increasing_version() -> None:
    w = World()
    w.step()
    with pytest.raises(ValueError, match="version"):
        w.refresher.apply(AdChanges.empty(DIM), HeadChanges(), w.lookup, w.version)


def test_micro_batcher_time_or_count() -> None:
    mb = MicroBatcher(RefreshConfig(batch_ms=100, batch_events=10), now_ms=0)
    assert not mb.due(50)
    mb.add(9)
    assert not mb.due(99)
    mb.add(1)
    assert mb.due(1)
    mb.reset(200)
    assert not mb.due(250) and mb.remaining_ms(250) == 50
    assert mb.due(300)


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_refresher_orders_equal_scores_like_the_index_search(metric: str) -> None:
    """Copies of held ads tie exactly; the lists keep the search's order (ties by id)."""
    w = World(metric=metric, margin=3, n_ads=200)
    w.queries = {i: w.rng.standard_normal(DIM).astype(np.float32) for i in range(30)}
    qids = np.arange(30, dtype=np.int64)
    w.step(heads=HeadChanges(entered=qids))
    for _ in range(3):
        _, held = w.refresher.topk(qids)
        src = np.unique(held[:, : K + 3])
        src = w.rng.choice(src[src >= 0], 12, replace=False)
        vecs = w.index.vectors(src)
        new = np.arange(w.next_ad, w.next_ad + 2 * len(src), dtype=np.int64)
        w.next_ad += len(new)
        gone = w.rng.choice(src, 3, replace=False)
        w.step(AdChanges(new, np.concatenate([vecs, vecs]), gone))
        # at its k-th place a search keeps the tied ad it met first, so compare with a
        # search as wide as the lists
        want_s, want_i = w.index.search(w.lookup(qids), K + 3)
        got_s, got_i = w.refresher.topk(qids)
        np.testing.assert_array_equal(got_i[:, :K], want_i[:, :K])
        np.testing.assert_array_equal(got_s[:, :K], want_s[:, :K])


def test_refresher_bad_ad_vectors_raise_before_anything_changes() -> None:
    w = World()
    w.queries = {i: w.rng.standard_normal(DIM).astype(np.float32) for i in range(5)}
    w.step(heads=HeadChanges(entered=np.arange(5, dtype=np.int64)))
    before = w.refresher.topk(np.arange(5))
    n_ads = w.index.ntotal
    bad = np.full((1, DIM), np.nan, dtype=np.float32)
    with pytest.raises(Exception, match="NaN"):
        w.step(AdChanges(np.array([w.next_ad]), bad, w.index.ids()[:3]))
    assert w.index.ntotal == n_ads
    after = w.refresher.topk(np.arange(5))
    np.testing.assert_array_equal(after[1], before[1])
    w.check()
