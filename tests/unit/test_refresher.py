"""The refresher against the real LiveIvfIndex, judged list by list after every micro-batch.

The whole stored list (K + margin) is the contract. A model store takes every emitted row (live
lists, retired rewrites with their TTL, exits expiring) and must equal the refresher's lists, so
a list that changed and was not emitted fails. Every valid entry and its score is compared with
a fresh search of the same index (same nprobe) and, when nprobe = nlist, with an exact numpy
brute force over the live ads that shares no code with the index; ties may swap.
"""

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
from annstream.refresher import (
    RETIRED_GRACE_S,
    AdChanges,
    MicroBatcher,
    Refresher,
    RefreshResult,
    RetiredLists,
)

DIM = 8
K = 5
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


def exact_scores(metric: str, q: F32, xb: F32) -> npt.NDArray[np.float64]:
    """Higher is better, in float64: the oracle's own arithmetic."""
    q64, x64 = q.astype(np.float64), xb.astype(np.float64)
    if metric == "cosine":
        q64 = q64 / np.linalg.norm(q64)
        x64 = x64 / np.linalg.norm(x64, axis=1, keepdims=True)
    if metric == "l2":
        return np.asarray(-((x64 - q64) ** 2).sum(axis=1))
    return np.asarray(x64 @ q64)


def assert_same_prefix(
    got_i: I64, got_s: F32, ref_i: I64, ref_s: npt.NDArray[Any], tol: float, what: str
) -> None:
    """`got` (m valid entries) is the best m of `ref` (descending, longer), ties aside.

    Equal scores may swap order or, at the boundary score, members: compare scores as a
    multiset, ids above the boundary as a set, and boundary ids against every reference id
    with that score.
    """
    m = len(got_i)
    if m == 0:
        return
    np.testing.assert_allclose(got_s, ref_s[:m], rtol=0, atol=tol, err_msg=what)
    edge = ref_s[m - 1]
    above = set(ref_i[:m][ref_s[:m] > edge + tol].tolist())
    assert set(got_i[got_s > edge + tol].tolist()) == above, what
    at_edge = set(ref_i[np.abs(ref_s - edge) <= tol].tolist())
    assert set(got_i[np.abs(got_s - edge) <= tol].tolist()) <= at_edge, what


class World:
    """A live index, the ads' raw vectors, query vectors by id, a refresher and a model store."""

    def __init__(
        self,
        metric: str = "cosine",
        margin: int = 2,
        seed: int = 0,
        n_ads: int = 300,
        *,
        dim: int = DIM,
        kind: str = "ivfflat",
        nlist: int = 8,
        nprobe: int = 3,
        k: int = K,
        scan_k: int = 16,
        exclude_self: bool = False,
        retired_ttl_s: int | None = None,
        retired_max_mb: int = 256,
        full_recompute_per_batch: int = 5_000,
    ) -> None:
        self.rng = np.random.default_rng(seed)
        self.dim, self.k, self.metric = dim, k, metric
        self.cfg = IndexConfig(
            dim=dim, metric=metric, kind=kind, nlist=nlist, nprobe=nprobe, pq_m=dim // 4, pq_nbits=4
        )
        base = self.rng.standard_normal((n_ads, dim)).astype(np.float32)
        self.index = LiveIvfIndex.train(self.cfg, self.rng.standard_normal((700, dim)))
        self.index.upsert(np.arange(n_ads), base)
        self.ads: dict[int, F32] = {i: base[i] for i in range(n_ads)}
        self.next_ad = n_ads
        self.queries: dict[int, F32] = {}
        self.now_s = 1_700_000_000.0
        self.ttl_s = retired_ttl_s
        self.rcfg = RefreshConfig(
            k=k,
            margin=margin,
            scan_k=scan_k,
            exclude_self=exclude_self,
            retired_max_mb=retired_max_mb,
            full_recompute_per_batch=full_recompute_per_batch,
        )
        self.refresher = Refresher(
            self.index, self.rcfg, retired_ttl_s=retired_ttl_s, clock=lambda: self.now_s
        )
        self.version = 0
        # the model store: query id -> (ids, scores, expiry in ms or None)
        self.store: dict[int, tuple[I64, F32, int | None]] = {}
        self.emitted = 0

    @property
    def width(self) -> int:
        return self.refresher.width

    def lookup(self, ids: I64) -> F32:
        return np.array([self.queries[int(i)] for i in ids], dtype=np.float32).reshape(-1, self.dim)

    def step(self, ads: AdChanges | None = None, heads: HeadChanges | None = None) -> RefreshResult:
        self.version += 1
        ads = ads or AdChanges.empty(self.dim)
        heads = heads or HeadChanges()
        res = self.refresher.apply(ads, heads, self.lookup, self.version)
        up, vecs = np.asarray(ads.upsert_ids).tolist(), np.asarray(ads.upsert_vectors)
        for row, i in enumerate(up):
            self.ads[int(i)] = vecs[row]
        for i in np.asarray(ads.delete_ids).tolist():
            self.ads.pop(int(i), None)
        self.sink(res, heads)
        return res

    def sink(self, res: RefreshResult, heads: HeadChanges) -> None:
        """What the service does with a result: write lists, rewrite retired, expire exits."""
        now_ms = int(self.now_s * 1000)
        assert np.all(np.diff(res.query_ids) > 0), "emitted query ids are sorted and unique"
        assert res.ids.shape == res.scores.shape == (len(res.query_ids), self.width)
        for q, ids, scores in zip(res.query_ids.tolist(), res.ids, res.scores, strict=True):
            self.store[q] = (ids.copy(), scores.copy(), None)
        r = res.retired
        assert np.all(np.diff(r.query_ids) > 0)
        assert np.all(r.ttl_s >= 1) if self.ttl_s and self.ttl_s > 0 else True
        rows = zip(r.query_ids.tolist(), r.ids, r.scores, r.ttl_s.tolist(), strict=True)
        for q, ids, scores, ttl in rows:
            self.store[q] = (ids.copy(), scores.copy(), now_ms + 1000 * ttl)
        self.emitted += len(res.query_ids) + len(r)
        for q in np.asarray(heads.exited).tolist():
            if q in self.store and self.ttl_s is not None:
                ids, scores, _ = self.store[q]
                self.store[q] = (ids, scores, now_ms + 1000 * self.ttl_s)
            elif q in self.store:
                del self.store[q]

    def advance(self, seconds: float) -> None:
        self.now_s += seconds
        now_ms = int(self.now_s * 1000)
        for q in [q for q, (_, _, exp) in self.store.items() if exp is not None and exp <= now_ms]:
            del self.store[q]

    def check(self, *, exact: bool | None = None, tol: float | None = None) -> None:
        """Every list, whole, against the model store, a fresh search and the brute force."""
        qids = np.array(sorted(self.queries), dtype=np.int64)
        assert sorted(self.refresher.head_ids().tolist()) == qids.tolist()
        w, k = self.width, self.k
        live = self.index.ids()
        got_s, got_i = self.refresher.topk(qids)
        # the store holds exactly what the refresher holds: every change was emitted
        for row, q in enumerate(qids.tolist()):
            ids, scores, exp = self.store[q]
            assert exp is None, f"live list {q} has a TTL"
            np.testing.assert_array_equal(ids, got_i[row], err_msg=f"stored list {q} is stale")
            np.testing.assert_array_equal(scores, got_s[row], err_msg=f"stored scores {q}")
        retired = self.refresher.retired_lists()
        kept = dict(zip(retired.query_ids.tolist(), range(len(retired)), strict=True))
        assert not set(kept) & set(qids.tolist()), "a head query is also retired"
        for q, (ids, scores, _) in self.store.items():
            held = ids[ids >= 0]
            assert np.isin(held, live).all(), f"stored list {q} holds a deleted ad"
            if q in self.queries or (q not in kept and (ids == -1).all()):
                continue  # a live list (checked above) or an evicted, emptied one
            assert q in kept, f"readable retired list {q} is not maintained"
            np.testing.assert_array_equal(ids, retired.ids[kept[q]])
            np.testing.assert_array_equal(scores, retired.scores[kept[q]])
        r_held = retired.ids[retired.ids >= 0]
        assert np.isin(r_held, live).all(), "a retired list holds a deleted ad"
        if not len(qids):
            return
        pq = self.index.cfg.kind == "ivfpq"
        if exact is None:
            exact = not pq and self.refresher.nprobe >= self.cfg.nlist
        extra = w + 8
        ref_s, ref_i = self.index.search(self.lookup(qids), extra, nprobe=self.refresher.nprobe)
        ads_ids = np.array(sorted(self.ads), dtype=np.int64)
        assert np.array_equal(ads_ids, live), "the index holds exactly the live ads"
        ads_x = np.array([self.ads[i] for i in ads_ids.tolist()], dtype=np.float32)
        for row, q in enumerate(qids.tolist()):
            ids, scores = got_i[row], got_s[row]
            m = int((ids >= 0).sum())
            what = f"query {q}: {ids.tolist()} {scores.tolist()}"
            assert (ids[:m] >= 0).all() and (ids[m:] == -1).all(), what
            assert np.all(np.isneginf(scores[m:])) and np.isfinite(scores[:m]).all(), what
            assert len(set(ids[:m].tolist())) == m, what
            assert np.all(np.diff(scores[:m]) <= 0), what
            if self.rcfg.exclude_self:
                assert q not in ids.tolist(), what
                keep = ref_i[row] != q
                r_i, r_s = ref_i[row][keep], ref_s[row][keep]
            else:
                r_i, r_s = ref_i[row], ref_s[row]
            n_ref = int((r_i[:w] >= 0).sum())
            assert m >= min(k, n_ref), what
            scale = 1.0 + float(np.abs(r_s[np.isfinite(r_s)]).max(initial=0.0))
            t = tol if tol is not None else (1e-4 if pq else 1e-6) * scale
            assert_same_prefix(ids[:m], scores[:m], r_i, r_s, t, "fresh search, " + what)
            if exact:
                true = exact_scores(self.metric, self.queries[q], ads_x)
                if self.rcfg.exclude_self:
                    true[ads_ids == q] = -np.inf
                order = np.lexsort((ads_ids, -true))[:extra]
                t_exact = 1e-5 * scale
                assert_same_prefix(
                    ids[:m], scores[:m], ads_ids[order], true[order], t_exact, "exact, " + what
                )
                # the stored score of every entry is its true score now (no stale score)
                pos = np.searchsorted(ads_ids, ids[:m])
                np.testing.assert_allclose(scores[:m], true[pos], rtol=0, atol=t_exact)


# ---- the differential test -----------------------------------------------------------------

ops = st.lists(
    st.tuples(
        st.integers(0, 6),  # inserts (some copy a held ad: exact ties)
        st.integers(0, 6),  # deletes (some of held ads, some of margin entries)
        st.integers(0, 4),  # updates (some nudged in place, some of margin entries)
        st.integers(0, 3),  # head queries entering (some re-entering after an exit)
        st.integers(0, 2),  # head queries leaving
        st.integers(0, 2),  # query vectors changing
        st.integers(0, 1),  # an ad both updated and deleted
        st.integers(0, 40),  # seconds passing (retired lists expire)
    ),
    min_size=1,
    max_size=12,
)


def held_ads(w: World, margin_only: bool = False) -> I64:
    qids = np.array(sorted(w.queries), dtype=np.int64)
    if not len(qids):
        return np.empty(0, np.int64)
    _, ids = w.refresher.topk(qids)
    ids = ids[:, w.k :] if margin_only else ids
    return np.unique(ids[ids >= 0])


def pick(rng: np.random.Generator, pool: I64, n: int, taken: set[int]) -> I64:
    pool = np.array([i for i in pool.tolist() if i not in taken], dtype=np.int64)
    n = max(0, min(n, len(pool)))
    out = rng.choice(pool, n, replace=False).astype(np.int64) if n else pool[:0]
    taken.update(out.tolist())
    return out


def run_batches(w: World, batches: list[tuple[int, ...]]) -> None:
    rng, d = w.rng, w.dim
    next_q = 10_000
    exited_before: list[int] = []
    for n_ins, n_del, n_upd, n_enter, n_exit, n_vec, n_both, secs in batches:
        w.advance(secs)
        live = w.index.ids()
        held, margin = held_ads(w), held_ads(w, margin_only=True)
        taken: set[int] = set()
        dels = np.concatenate(
            [pick(rng, margin, n_del // 3, taken), pick(rng, held, n_del // 3, taken)]
        )
        dels = np.concatenate([dels, pick(rng, live, n_del - len(dels), taken)])
        upds = np.concatenate([pick(rng, margin, n_upd // 2, taken), pick(rng, live, 1, taken)])
        upds = np.concatenate([upds, pick(rng, held, n_upd - len(upds), taken)])
        both = pick(rng, live, n_both, taken)
        upd_vecs = np.array([w.ads[i] for i in upds.tolist()], dtype=np.float32).reshape(-1, d)
        nudge = rng.random(len(upds)) < 0.5  # same list, a slightly different score
        upd_vecs[nudge] += 0.01 * rng.standard_normal((int(nudge.sum()), d)).astype(np.float32)
        upd_vecs[~nudge] = rng.standard_normal((int((~nudge).sum()), d)).astype(np.float32)
        ins = np.arange(w.next_ad, w.next_ad + n_ins, dtype=np.int64)
        w.next_ad += n_ins
        ins_vecs = rng.standard_normal((n_ins, d)).astype(np.float32)
        copies = rng.random(n_ins) < 0.3
        if len(held) and copies.any():
            src = rng.choice(held, int(copies.sum()))
            ins_vecs[copies] = np.array([w.ads[i] for i in src.tolist()], dtype=np.float32)
        up_ids = np.concatenate([upds, ins, both]).astype(np.int64)
        up_vecs = np.concatenate(
            [upd_vecs, ins_vecs, rng.standard_normal((len(both), d)).astype(np.float32)]
        )
        ads = AdChanges(up_ids, up_vecs, np.concatenate([dels, both]).astype(np.int64))

        heads_now = np.array(sorted(w.queries), dtype=np.int64)
        exited = rng.choice(heads_now, min(n_exit, len(heads_now)), replace=False)
        for q in exited.tolist():
            del w.queries[q]
        stay = np.array(sorted(w.queries), dtype=np.int64)
        changed = rng.choice(stay, min(n_vec, len(stay)), replace=False)
        entered = [q for q in exited_before if q not in w.queries][: n_enter // 2]
        while len(entered) < n_enter:
            if w.rcfg.exclude_self:  # the query is an ad: its id and (nearly) its vector
                q = int(rng.choice(live))
                if q in w.queries or q in entered or q in exited.tolist():
                    break
            else:
                q, next_q = next_q, next_q + 1
            entered.append(q)
        for q in changed.tolist() + entered:
            v = rng.standard_normal(d).astype(np.float32)
            if w.rcfg.exclude_self and q in w.ads:
                v = w.ads[q] + 0.05 * v
            w.queries[int(q)] = v
        exited_before = [q for q in exited_before if q not in entered] + exited.tolist()
        w.step(
            ads,
            HeadChanges(
                entered=np.array(sorted(entered), dtype=np.int64),
                exited=np.sort(exited).astype(np.int64),
                vector_changed=np.sort(changed).astype(np.int64),
            ),
        )
        w.check()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    metric=st.sampled_from(["cosine", "ip", "l2"]),
    margin=st.integers(0, 3),
    nprobe=st.sampled_from([3, 8]),
    scan_k=st.sampled_from([1, 16]),
    exclude_self=st.booleans(),
    retired_ttl_s=st.sampled_from([None, 60]),
    batches=ops,
)
def test_refresher_whole_lists_match_search_and_brute_force_after_every_batch(
    seed: int,
    metric: str,
    margin: int,
    nprobe: int,
    scan_k: int,
    exclude_self: bool,
    retired_ttl_s: int | None,
    batches: list[tuple[int, ...]],
) -> None:
    w = World(
        metric=metric,
        margin=margin,
        seed=seed,
        n_ads=60,
        nprobe=nprobe,
        scan_k=scan_k,
        exclude_self=exclude_self,
        retired_ttl_s=retired_ttl_s,
    )
    run_batches(w, batches)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    metric=st.sampled_from(["cosine", "ip", "l2"]),
    nprobe=st.sampled_from([3, 8]),
    batches=ops,
)
def test_refresher_whole_lists_at_dim_384(
    seed: int, metric: str, nprobe: int, batches: list[tuple[int, ...]]
) -> None:
    w = World(
        metric=metric,
        margin=3,
        seed=seed,
        n_ads=120,
        dim=384,
        nprobe=nprobe,
        retired_ttl_s=60,
        scan_k=2,
    )
    run_batches(w, batches)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    metric=st.sampled_from(["cosine", "ip", "l2"]),
    dim=st.sampled_from([8, 384]),
    batches=ops,
)
def test_refresher_ivfpq_whole_lists_match_search(
    seed: int, metric: str, dim: int, batches: list[tuple[int, ...]]
) -> None:
    """IVFPQ: candidates are scored from the decoded codes, after the add."""
    w = World(metric=metric, margin=2, seed=seed, n_ads=80, dim=dim, kind="ivfpq", retired_ttl_s=60)
    run_batches(w, batches)


# ---- regressions and single paths ----------------------------------------------------------


def entered(w: World, n: int) -> RefreshResult:
    w.queries = {i: w.rng.standard_normal(w.dim).astype(np.float32) for i in range(n)}
    return w.step(heads=HeadChanges(entered=np.arange(n, dtype=np.int64)))


def test_refresher_emits_a_list_whose_margin_lost_a_deleted_ad() -> None:
    """Issue 11 item 8: the stored margin kept deleted ads (only top K changes were written)."""
    w = World(margin=3, n_ads=300)
    entered(w, 40)
    _, ids = w.refresher.topk(np.arange(40))
    gone = np.unique(ids[:, K:][ids[:, K:] >= 0])[:10]
    res = w.step(AdChanges(np.empty(0, np.int64), np.empty((0, DIM), np.float32), gone))
    hit = np.flatnonzero(np.isin(ids, gone).any(axis=1))
    assert len(hit) and set(hit.tolist()) <= set(res.query_ids.tolist())
    assert not np.isin(res.ids, gone).any()
    w.check()


def test_refresher_emits_the_new_score_of_a_re_embedded_ad_in_place() -> None:
    """Issue 11 item 9: a re-embedded ad that kept its place kept its old score in the store."""
    w = World(margin=3, n_ads=300, nprobe=8)
    entered(w, 1)
    scores, ids = w.refresher.topk(np.array([0]))
    ad = int(ids[0, 1])
    # move the ad by a hair: same list, same place, a different score
    vec = w.ads[ad] + 1e-3 * w.rng.standard_normal(DIM).astype(np.float32)
    res = w.step(AdChanges(np.array([ad]), vec[None, :]))
    assert res.query_ids.tolist() == [0]
    after_s, after_i = w.refresher.topk(np.array([0]))
    assert after_i[0, 1] == ad and after_s[0, 1] != scores[0, 1]
    np.testing.assert_array_equal(res.scores[0], after_s[0])
    w.check()


def test_refresher_emits_only_lists_that_changed() -> None:
    w = World()
    res = entered(w, 40)
    assert res.query_ids.tolist() == list(range(40))
    assert res.ids.shape == (40, K + 2) and res.version == 1
    before_s, before = w.refresher.topk(np.arange(40))
    vec = w.queries[3] * 10  # closer to query 3 than anything: changes query 3 for sure
    res = w.step(AdChanges(np.array([10_000]), vec[None, :], np.empty(0, np.int64)))
    assert 3 in res.query_ids.tolist()
    after_s, after = w.refresher.topk(np.arange(40))
    changed = np.flatnonzero(np.any((before != after) | (before_s != after_s), axis=1))
    assert res.query_ids.tolist() == changed.tolist()
    assert res.ids[res.query_ids.tolist().index(3), 0] == 10_000
    w.check()
    res = w.step()
    assert len(res.query_ids) == 0 and res.stats["changed"] == 0
    # an update to the very same vector: only the lists where it was the last valid entry
    # change (it leaves, and does not beat the new last one)
    before_s, before = after_s, after
    res = w.step(AdChanges(np.array([10_000]), vec[None, :]))
    after_s, after = w.refresher.topk(np.arange(40))
    changed = np.flatnonzero(np.any((before != after) | (before_s != after_s), axis=1))
    assert res.query_ids.tolist() == changed.tolist()
    assert before[3, 0] == 10_000 and 3 not in changed.tolist()
    w.check()


def test_refresher_deletes_refill_from_margin_then_research() -> None:
    w = World(margin=3)
    entered(w, 1)
    for _ in range(3):  # three deletes of the current best: margin absorbs, then re-search
        _, ids = w.refresher.topk(np.array([0]))
        res = w.step(AdChanges(np.empty(0, np.int64), np.empty((0, DIM), np.float32), ids[0, :1]))
        assert res.query_ids.tolist() == [0]
        assert ids[0, 0] not in res.ids[0]
        w.check()
    # an unknown id deleted and an update of an ad change nothing wrong
    w.step(
        AdChanges(
            np.array([5]), w.rng.standard_normal((1, DIM)).astype(np.float32), np.array([99_999])
        )
    )
    w.check()


def test_refresher_scan_k_overflow_searches_the_row_again() -> None:
    """More qualifying new ads than scan_k for one query: the row gets a full search."""
    w = World(margin=3, scan_k=2, nprobe=8)
    entered(w, 3)
    near = w.queries[1][None, :] * np.linspace(2.0, 3.0, 5, dtype=np.float32)[:, None]
    ids = np.arange(w.next_ad, w.next_ad + 5, dtype=np.int64)
    w.next_ad += 5
    res = w.step(AdChanges(ids, near + 0.01 * w.rng.standard_normal(near.shape).astype("f")))
    assert res.stats["overflow_searches"] >= 1 and res.stats["re_searched"] >= 1
    assert 1 in res.query_ids.tolist()
    assert set(ids.tolist()) <= set(w.refresher.topk(np.array([1]))[1][0].tolist())
    w.check()


@pytest.mark.parametrize("kind", ["ivfflat", "ivfpq"])
@pytest.mark.parametrize("dim", [8, 384])
def test_refresher_ivf_kinds_keep_scores_fresh_through_every_update_path(
    kind: str, dim: int
) -> None:
    """Updates in the same list, to another list, updated + deleted, held only in the margin."""
    w = World(margin=4, n_ads=200, dim=dim, kind=kind, nprobe=8, retired_ttl_s=600)
    entered(w, 20)
    qids = np.arange(20, dtype=np.int64)
    for round_ in range(4):
        _, ids = w.refresher.topk(qids)
        top, margin = np.unique(ids[:, :K]), np.unique(ids[:, K:][ids[:, K:] >= 0])
        margin = margin[~np.isin(margin, top)]
        same = w.rng.choice(top, 3, replace=False)
        other = w.rng.choice(top[~np.isin(top, same)], 2, replace=False)
        in_margin = w.rng.choice(margin, min(2, len(margin)), replace=False)
        both = w.rng.choice(w.index.ids()[~np.isin(w.index.ids(), ids)], 1)
        nudged = np.array([w.ads[i] for i in same.tolist() + in_margin.tolist()], np.float32)
        nudged += 1e-3 * w.rng.standard_normal(nudged.shape).astype(np.float32)
        vecs = np.concatenate(
            [
                nudged[:3],
                w.rng.standard_normal((2, dim)).astype(np.float32),
                nudged[3:],
                w.rng.standard_normal((1, dim)).astype(np.float32),
            ]
        )
        up = np.concatenate([same, other, in_margin, both]).astype(np.int64)
        if round_ == 1:  # one query leaves: its retired list loses the updated ads
            del w.queries[19]
            qids = qids[:-1]
            w.step(AdChanges(up, vecs, both), HeadChanges(exited=np.array([19])))
        else:
            w.step(AdChanges(up, vecs, both))
        w.check(exact=kind == "ivfflat" and w.refresher.nprobe >= w.cfg.nlist)


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_refresher_orders_equal_scores_like_the_index_search(metric: str) -> None:
    """Copies of held ads tie exactly; the lists keep the search's order (ties by id)."""
    w = World(metric=metric, margin=3, n_ads=200)
    qids = np.arange(30, dtype=np.int64)
    entered(w, 30)
    for _ in range(3):
        _, held = w.refresher.topk(qids)
        src = np.unique(held[:, : K + 3])
        src = w.rng.choice(src[src >= 0], 12, replace=False)
        vecs = w.index.vectors(src)
        new = np.arange(w.next_ad, w.next_ad + 2 * len(src), dtype=np.int64)
        w.next_ad += len(new)
        gone = w.rng.choice(src, 3, replace=False)
        w.step(AdChanges(new, np.concatenate([vecs, vecs]), gone))
        # at its last place a search keeps the tied ad it met first, so compare with a
        # search wider than the lists, over the valid prefix
        want_s, want_i = w.index.search(w.lookup(qids), K + 3 + 8)
        got_s, got_i = w.refresher.topk(qids)
        for row in range(len(qids)):
            m = int((got_i[row] >= 0).sum())
            np.testing.assert_array_equal(got_i[row, :m], want_i[row, :m])
            np.testing.assert_array_equal(got_s[row, :m], want_s[row, :m])
        w.check()


def test_refresher_exclude_self_leaves_the_query_out_of_its_list() -> None:
    """Issue 12: similar items, the query is itself an ad (its own id would come first)."""
    w = World(margin=2, n_ads=200, exclude_self=True, nprobe=8)
    qids = np.array([3, 50, 120], dtype=np.int64)
    w.queries = {int(q): w.ads[int(q)].copy() for q in qids}
    res = w.step(heads=HeadChanges(entered=qids))
    assert not (res.ids == qids[:, None]).any()
    w.check()
    # a copy of query 50's ad arrives (it belongs in the list) and query 3's ad is
    # re-embedded onto query 3's vector (it must stay out)
    res = w.step(AdChanges(np.array([999, 3]), np.stack([w.ads[50], w.queries[3]])))
    _, ids = w.refresher.topk(qids)
    assert ids[1, 0] == 999 and not (ids == qids[:, None]).any()
    w.check()
    plain = World(margin=2, n_ads=200, nprobe=8)
    plain.queries = {3: plain.ads[3].copy()}
    plain.step(heads=HeadChanges(entered=np.array([3])))
    assert plain.refresher.topk(np.array([3]))[1][0, 0] == 3


def test_refresher_head_exit_forgets_and_vector_change_researches() -> None:
    w = World()
    entered(w, 5)
    del w.queries[2]
    w.queries[4] = w.rng.standard_normal(DIM).astype(np.float32)
    res = w.step(heads=HeadChanges(exited=np.array([2]), vector_changed=np.array([4])))
    assert res.query_ids.tolist() == [4] and len(res.retired) == 0
    assert w.refresher.head_ids().tolist() == [0, 1, 3, 4]
    scores, ids = w.refresher.topk(np.array([2]))
    assert ids.tolist() == [[-1] * (K + 2)] and np.all(np.isneginf(scores))
    assert len(w.refresher.retired_lists()) == 0  # exited lists are deleted: nothing kept
    w.check()


# ---- retired lists -------------------------------------------------------------------------


def test_retired_lists_lose_deleted_ads_until_they_expire() -> None:
    """Issue 11 item 8: exited lists stayed readable and served ads deleted later."""
    w = World(margin=3, n_ads=300, retired_ttl_s=100)
    entered(w, 10)
    _, before = w.refresher.topk(np.array([4, 7]))
    for q in (4, 7):
        del w.queries[q]
    res = w.step(heads=HeadChanges(exited=np.array([4, 7])))
    assert len(res.retired) == 0 and res.stats["retired"] == 2
    kept = w.refresher.retired_lists()
    assert kept.query_ids.tolist() == [4, 7] and kept.ttl_s.tolist() == [100, 100]
    np.testing.assert_array_equal(kept.ids, before)
    assert w.refresher.retired_bytes == 2 * (16 + 12 * (K + 3))
    w.advance(30.5)
    gone = np.array([before[0, 0], before[0, K + 1], before[1, 2]])
    res = w.step(AdChanges(np.empty(0, np.int64), np.empty((0, DIM), np.float32), gone))
    r = res.retired
    assert r.query_ids.tolist() == [4, 7]
    assert r.ttl_s.tolist() == [70, 70]  # remaining, rounded up
    assert r.expires_at_ms.tolist() == [int((w.now_s - 30.5) * 1000) + 100_000] * 2
    assert not np.isin(r.ids, gone).any()
    for row in range(2):  # no refill: the list only gets shorter
        left = before[row][~np.isin(before[row], gone)]
        np.testing.assert_array_equal(r.ids[row, : len(left)], left)
        assert (r.ids[row, len(left) :] == -1).all()
    w.check()
    # re-embedded ads leave them too (the removal half only)
    ad = int(r.ids[1, 0])
    res = w.step(AdChanges(np.array([ad]), w.ads[ad][None, :] * 1.0001))
    assert 7 in res.retired.query_ids.tolist() and not (res.retired.ids == ad).any()
    w.check()
    # expired (plus the grace period): forgotten
    w.advance(100 + RETIRED_GRACE_S)
    res = w.step()
    assert res.stats["retired"] == 0 and res.stats["retired_expired"] == 2
    assert len(w.refresher.retired_lists()) == 0
    w.check()


def test_retired_list_of_a_query_that_re_enters_is_live_again() -> None:
    w = World(retired_ttl_s=100)
    entered(w, 3)
    del w.queries[1]
    w.step(heads=HeadChanges(exited=np.array([1])))
    assert w.refresher.retired_lists().query_ids.tolist() == [1]
    w.queries[1] = w.rng.standard_normal(DIM).astype(np.float32)
    res = w.step(heads=HeadChanges(entered=np.array([1])))
    assert res.query_ids.tolist() == [1] and len(w.refresher.retired_lists()) == 0
    w.check()
    # dropped (partition moved) head queries are not retired: their list has a new owner
    w.queries.pop(2)
    w.store.pop(2)
    w.step(heads=HeadChanges(dropped=np.array([2])))
    assert len(w.refresher.retired_lists()) == 0
    assert w.refresher.forget_retired(np.array([5])) == 0
    w.check()


def test_a_query_that_enters_again_is_emitted_even_when_its_list_is_unchanged() -> None:
    """A restored head may hold an expiring record (its exit was stored, its changelog record
    lost): entering again must rewrite it as live, so no entry is skipped as 'unchanged'."""
    w = World(retired_ttl_s=100)
    entered(w, 3)
    vector = w.queries.pop(1)
    _, before = w.refresher.topk(np.array([1]))
    w.step(heads=HeadChanges(exited=np.array([1])))
    w.queries[1] = vector
    res = w.step(heads=HeadChanges(entered=np.array([1])))
    assert res.query_ids.tolist() == [1]
    np.testing.assert_array_equal(res.ids, before)
    w.check()


def test_retired_lists_over_the_memory_budget_are_rewritten_empty() -> None:
    w = World(margin=3, retired_ttl_s=100)
    row_bytes = 16 + 12 * (K + 3)
    w.refresher._retired.max_rows = 3  # type: ignore[union-attr]  # 1 MiB holds thousands
    entered(w, 6)
    for q in range(5):
        del w.queries[q]
    w.advance(1)
    res = w.step(heads=HeadChanges(exited=np.array([0, 1])))
    w.advance(1)
    res = w.step(heads=HeadChanges(exited=np.array([2, 3, 4])))
    # the two expiring first are emptied for their remaining TTL, then forgotten
    assert res.retired.query_ids.tolist() == [0, 1] and (res.retired.ids == -1).all()
    assert res.retired.ttl_s.tolist() == [99, 99] and res.stats["retired_evicted"] == 2
    assert w.refresher.retired_lists().query_ids.tolist() == [2, 3, 4]
    assert w.refresher.retired_bytes == 3 * row_bytes
    w.check()


def test_retired_lists_load_back_after_a_restart() -> None:
    """Ids/scores/expiry read from the store; ads deleted while down leave, and are rewritten."""
    w = World(margin=3, n_ads=300, retired_ttl_s=100)
    entered(w, 8)
    for q in (5, 6, 7):
        del w.queries[q]
    w.step(heads=HeadChanges(exited=np.array([5, 6, 7])))
    stored = {q: w.store[q] for q in (5, 6, 7)}
    # a restart: a new refresher over the same index, head queries 0-4 back
    w.refresher = Refresher(w.index, w.rcfg, retired_ttl_s=100, clock=lambda: w.now_s)
    w.store = {q: v for q, v in w.store.items() if q < 5}
    w.step(heads=HeadChanges(entered=np.arange(5, dtype=np.int64)))
    w.advance(10)
    # deleted before the retired lists are back (e.g. replayed ad events)
    gone = np.unique([stored[5][0][0], stored[6][0][K + 1]])
    w.step(AdChanges(np.empty(0, np.int64), np.empty((0, DIM), np.float32), gone))
    exp = np.array([stored[q][2] for q in (5, 6, 7)] + [-1, int(w.now_s * 1000) - 1])
    qids = np.array([5, 6, 7, 8, 0])  # 8: no expiry on record; 0: a head query now
    rows_i = np.stack([stored[q][0] for q in (5, 6, 7)] + [stored[7][0], stored[7][0]])
    rows_s = np.stack([stored[q][1] for q in (5, 6, 7)] + [stored[7][1], stored[7][1]])
    out = w.refresher.load_retired(qids, rows_i, rows_s, exp)
    assert isinstance(out, RetiredLists)
    hit = [q for q in (5, 6, 7) if np.isin(stored[q][0], gone).any()]
    assert out.query_ids.tolist() == [*hit, 8] and 5 in hit and 6 in hit
    assert not np.isin(out.ids, gone).any() and out.ttl_s.tolist() == [90] * len(hit) + [100]
    assert w.refresher.retired_lists().query_ids.tolist() == [5, 6, 7, 8]
    w.store.update({q: stored[q] for q in (5, 6, 7)})
    for q, ids, scores, ttl in zip(
        out.query_ids.tolist(), out.ids, out.scores, out.ttl_s.tolist(), strict=True
    ):
        w.store[q] = (ids, scores, int(w.now_s * 1000) + 1000 * ttl)
    w.check()
    with pytest.raises(ValueError, match="shape"):
        w.refresher.load_retired(qids, rows_i[:2], rows_s, exp)
    # what the head-state changelog carries per query, and the lists of some of them
    assert w.refresher.retired_expiry(np.array([7, 0, 5, 42])).tolist() == [
        stored[7][2],
        -1,
        stored[5][2],
        -1,
    ]
    assert w.refresher.retired_lists(np.array([8, 6, 42])).query_ids.tolist() == [6, 8]


def test_refresher_recomputes_everything_after_retrain_rate_limited() -> None:
    w = World(n_ads=200, full_recompute_per_batch=7, retired_ttl_s=100)
    entered(w, 20)
    new_index = w.index.retrained(w.rng.standard_normal((400, DIM)).astype(np.float32))
    assert new_index.version == w.index.version + 1
    w.index = new_index
    w.refresher.swap_index(new_index)
    seen = []
    for _ in range(3):
        # pending lists lose deleted ads at once too
        _, ids = w.refresher.topk(np.arange(20))
        gone = np.unique(ids[ids >= 0])[:2]
        res = w.step(
            AdChanges(
                np.array([w.next_ad]), w.rng.standard_normal((1, DIM)).astype(np.float32), gone
            )
        )
        w.next_ad += 1
        seen.append(res.stats["pending_full"])
        assert not np.isin(w.refresher.topk(np.arange(20))[1], gone).any()
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
    with pytest.raises(ValueError, match="retired_max_mb"):
        Refresher(w.index, RefreshConfig(retired_max_mb=0))


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


def test_refresher_bad_ad_vectors_raise_before_anything_changes() -> None:
    w = World()
    entered(w, 5)
    before = w.refresher.topk(np.arange(5))
    n_ads = w.index.ntotal
    bad = np.full((1, DIM), np.nan, dtype=np.float32)
    with pytest.raises(Exception, match="NaN"):
        w.refresher.apply(
            AdChanges(np.array([w.next_ad]), bad, w.index.ids()[:3]),
            HeadChanges(),
            w.lookup,
            w.version + 1,
        )
    assert w.index.ntotal == n_ads
    after = w.refresher.topk(np.arange(5))
    np.testing.assert_array_equal(after[1], before[1])
    w.check()
    # a head vector lookup of the wrong shape: raised before any head query moved
    with pytest.raises(ValueError, match="head_vectors_lookup"):
        w.refresher.apply(
            AdChanges.empty(DIM),
            HeadChanges(entered=np.array([7]), exited=np.array([1])),
            lambda q: np.zeros((len(q), DIM + 1), np.float32),
            w.version + 1,
        )
    assert w.refresher.head_ids().tolist() == [0, 1, 2, 3, 4]
    w.check()


# ---- retrain backlog, memory, IVFPQ candidates ---------------------------------------------


def test_heads_waiting_for_their_recompute_get_inserts_and_deletes() -> None:
    """Issue 13: after a retrain the waiting heads got no inserts for the whole recompute."""
    w = World(n_ads=300, nprobe=3, full_recompute_per_batch=2)
    entered(w, 12)
    new_index = w.index.retrained(w.rng.standard_normal((400, DIM)).astype(np.float32))
    w.index = new_index
    w.refresher.swap_index(new_index)
    w.step()  # two recomputed; ten still waiting
    assert w.refresher.pending_full == 10
    waiting = int(w.refresher._pending[-1])  # a slot recomputed last
    q = int(w.refresher._qid[waiting])
    ad = w.next_ad
    w.next_ad += 1
    _, before = w.refresher.topk(np.array([q]))
    gone = before[0, :1]
    res = w.step(AdChanges(np.array([ad]), 10 * w.queries[q][None, :], gone))
    _, after = w.refresher.topk(np.array([q]))
    assert w.refresher.pending_full > 0 and waiting in w.refresher._pending.tolist()
    assert after[0, 0] == ad and gone[0] not in after[0].tolist()
    assert q in res.query_ids.tolist()
    while w.refresher.pending_full:
        w.step()
    w.check()


def test_slots_are_reused_and_memory_shrinks_when_heads_leave() -> None:
    w = World(n_ads=200, nprobe=3)
    per_slot = w.refresher.nbytes / w.refresher.capacity
    entered(w, 3000)
    assert w.refresher.capacity >= 3000
    for round_ in range(3):  # churn: exits and entries reuse the freed slots
        gone = np.arange(round_ * 500, round_ * 500 + 500, dtype=np.int64)
        for q in gone.tolist():
            del w.queries[q]
        new = np.arange(10_000 + round_ * 500, 10_500 + round_ * 500, dtype=np.int64)
        for q in new.tolist():
            w.queries[q] = w.rng.standard_normal(DIM).astype(np.float32)
        w.step(heads=HeadChanges(entered=new, exited=gone))
    assert w.refresher.capacity <= 4096
    w.check()
    keep = sorted(w.queries)[:100]
    out = np.array(sorted(set(w.queries) - set(keep)), dtype=np.int64)
    w.queries = {q: w.queries[q] for q in keep}
    w.step(heads=HeadChanges(exited=out))
    assert w.refresher.capacity == 1024
    assert w.refresher.nbytes <= 1024 * per_slot + 64 * 1024
    # a retrain recomputes in place: no new slots
    new_index = w.index.retrained(w.rng.standard_normal((400, DIM)).astype(np.float32))
    w.index = new_index
    w.refresher.swap_index(new_index)
    w.step()
    assert w.refresher.capacity == 1024
    w.check()


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_ivfpq_candidates_match_a_numpy_scan_of_the_decoded_codes(metric: str) -> None:
    """The IVFPQ branch: new ads scored from the codes the index holds, routed by list."""
    w = World(metric=metric, n_ads=300, dim=16, kind="ivfpq", nprobe=3, margin=3)
    entered(w, 40)
    r = w.refresher
    ids = np.arange(w.next_ad, w.next_ad + 60, dtype=np.int64)
    vecs = w.rng.standard_normal((60, 16)).astype(np.float32)
    thr = r._threshold()
    plan = r._plan_ads(AdChanges(ids, vecs))
    plan.lists = w.index.assign_lists(plan.x, prepared=True)
    w.index.apply(plan.ids, plan.x, plan.lists, plan.delete_ids)
    decoded = w.index.ivf.reconstruct_batch(ids).astype(np.float32)
    screen = r._screen(decoded, plan.lists, thr)
    screen.run()
    slots, got_ids, got_scores = r._candidates(screen, ids, thr)
    live = r._key_slots
    q = r._q[live].astype(np.float64)
    d64 = decoded.astype(np.float64)
    score = -((q[:, None, :] - d64[None]) ** 2).sum(axis=2) if metric == "l2" else q @ d64.T
    routed = np.array([[plan.lists[j] in r._probe[s] for j in range(60)] for s in live])
    t = thr[live][:, None].astype(np.float64)
    tol = 1e-4 * (1 + np.abs(score).max())
    must = routed & (score >= t + tol)
    may = routed & (score >= t - tol)
    got = set(zip(slots.tolist(), got_ids.tolist(), strict=True))
    want = {(int(live[a]), int(ids[b])) for a, b in zip(*np.nonzero(must), strict=True)}
    assert want <= got
    pos = {int(s): i for i, s in enumerate(live.tolist())}
    assert all(may[pos[s], int(a - ids[0])] for s, a in got)
    np.testing.assert_allclose(
        got_scores,
        [score[pos[s], a - ids[0]] for s, a in zip(slots, got_ids, strict=True)],
        atol=tol,
    )


def test_micro_batcher_grows_the_batch_with_the_lag() -> None:
    """Issue 13: catching up, a list was rewritten once per 5,000 ads; batch by the lag."""
    mb = MicroBatcher(RefreshConfig(batch_ms=100, batch_events=10), now_ms=0, catch_up_events=50)
    mb.add(10)
    assert mb.due(1) and mb.due(1, lag=5)
    assert not mb.due(1, lag=1_000)  # far behind: keep polling
    mb.add(30)
    assert not mb.due(500, lag=1_000) and mb.due(500, lag=0)
    mb.add(10)
    assert mb.due(500, lag=1_000)  # catch_up_events reached
    mb.reset(0)
    mb.add(20)
    assert not mb.due(9_000, lag=1_000) and mb.due(10_000, lag=1_000)  # catch_up_ms
