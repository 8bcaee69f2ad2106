"""The refresher's kernels against plain numpy references that share no code with them.

Rows are built in the index's search order with many tied scores (scores drawn from a few
values), complete rows (a -1 / -inf inside the valid prefix), short prefixes and padding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from annstream.refresh_kernels import (
    ROW_CHANGED,
    ROW_OVERFLOW,
    ROW_SKIPPED,
    ROW_UNCHANGED,
    ROW_UNDERFLOW,
    build_routes,
    group_rows,
    held_entries,
    route_candidates,
    rows_holding,
    update_rows,
)

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]


def order_key(score: float, ad: int, larger_first: bool) -> tuple[float, int]:
    """Sort key of the index's search order (ascending key = earlier)."""
    return (-score, -ad if larger_first else ad)


def make_rows(
    rng: np.random.Generator, n: int, w: int, k: int, larger_first: bool, n_ads: int = 400
) -> tuple[I64, F32, npt.NDArray[np.int32]]:
    """n rows in search order: full, short (valid prefix c < w) or complete (padding inside)."""
    ids = np.full((n, w), -1, dtype=np.int64)
    scores = np.full((n, w), -np.inf, dtype=np.float32)
    c = np.zeros(n, dtype=np.int32)
    values = np.linspace(-1, 1, 9).astype(np.float32)  # few values: many ties
    for r in range(n):
        kind = rng.integers(3)
        m = (
            w
            if kind == 0
            else int(rng.integers(k, w + 1))
            if kind == 1
            else int(rng.integers(0, w))
        )
        ads = rng.choice(n_ads, m, replace=False)
        sc = rng.choice(values, m)
        entries = sorted(
            zip(sc.tolist(), ads.tolist(), strict=True), key=lambda e: order_key(*e, larger_first)
        )
        ids[r, :m] = [a for _, a in entries]
        scores[r, :m] = [s for s, _ in entries]
        c[r] = w if kind == 2 else m  # complete rows: the padding is inside the prefix
    return ids, scores, c


def test_held_entries_and_rows_holding_match_isin() -> None:
    rng = np.random.default_rng(0)
    ids, _, c = make_rows(rng, 60, 12, 4, True, n_ads=3_000_000)
    ids[rng.random(ids.shape) < 0.05] += 1 << 21  # ids sharing low bits with removed ones
    removed = np.unique(rng.choice(ids[ids >= 0], 40))
    removed = np.unique(np.concatenate([removed, removed + (1 << 20), [-1]]))[1:]
    rows, cols = held_entries(ids, removed)
    want = np.isin(ids, removed) & (ids >= 0)
    got = np.zeros_like(want)
    got[rows, cols] = True
    np.testing.assert_array_equal(got, want)
    prefix = np.arange(ids.shape[1])[None, :] < c[:, None]
    np.testing.assert_array_equal(rows_holding(ids, c, removed), (want & prefix).any(axis=1))
    assert len(held_entries(ids, removed[:0])[0]) == 0


def test_build_routes_lists_each_probing_slot_once_ascending() -> None:
    rng = np.random.default_rng(1)
    nlist, p = 50, 6
    probe = np.stack([rng.choice(nlist, p, replace=False) for _ in range(80)]).astype(np.int32)
    probe[3] = -1
    slots = np.sort(rng.choice(80, 60, replace=False)).astype(np.int64)
    start, route = build_routes(probe, slots, nlist)
    for lst in range(nlist):
        want = [s for s in slots.tolist() if lst in probe[s].tolist()]
        assert route[start[lst] : start[lst + 1]].tolist() == want


@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("dim", [8, 384])
def test_route_candidates_is_a_superset_within_tolerance(l2: bool, dim: int) -> None:
    rng = np.random.default_rng(2)
    nlist, n_q, n_a, p = 20, 120, 90, 4
    q = rng.standard_normal((n_q, dim)).astype(np.float32)
    a = rng.standard_normal((n_a, dim)).astype(np.float32)
    a[:10] = q[:10]  # exact matches: scores at the top
    probe = np.stack([rng.choice(nlist, p, replace=False) for _ in range(n_q)]).astype(np.int32)
    lists = rng.integers(-1, nlist, n_a)  # -1: an ad routed nowhere
    exact = (
        -((q[:, None, :].astype(np.float64) - a[None, :, :]) ** 2).sum(axis=2)
        if l2
        else q.astype(np.float64) @ a.T.astype(np.float64)
    )
    thr = np.quantile(exact, 0.8, axis=1).astype(np.float32)
    thr[::7] = np.inf  # slots taking nothing
    thr[::11] = -np.inf  # complete rows: take every routed ad
    start, route = build_routes(probe, np.arange(n_q, dtype=np.int64), nlist)
    tol = 1e-3 * float(np.abs(exact).max())
    slots, rows = route_candidates(q, thr, a, lists, start, route, l2=l2, tol=tol)
    got = set(zip(slots.tolist(), rows.tolist(), strict=True))
    assert len(got) == len(slots)
    routed = np.array([[lists[j] in probe[i] for j in range(n_a)] for i in range(n_q)])
    must = routed & (exact >= thr[:, None])
    may = routed & (exact >= thr[:, None].astype(np.float64) - 2 * tol)
    assert {(int(i), int(j)) for i, j in zip(*np.nonzero(must), strict=True)} <= got
    assert all(may[i, j] for i, j in got)


def test_group_rows_counting_sort() -> None:
    rng = np.random.default_rng(3)
    n = 40
    hit = rng.random(n) < 0.3
    slots = rng.integers(0, n, 100)
    rows, start, order = group_rows(hit, slots)
    assert rows.tolist() == sorted(set(np.flatnonzero(hit).tolist()) | set(slots.tolist()))
    for x, r in enumerate(rows.tolist()):
        assert order[start[x] : start[x + 1]].tolist() == np.flatnonzero(slots == r).tolist()


def reference_update(
    ids: I64,
    scores: F32,
    c: npt.NDArray[np.int32],
    rows: I64,
    holds: npt.NDArray[np.bool_],
    skip: npt.NDArray[np.bool_],
    removed: I64,
    cands: list[list[tuple[float, int]]],
    k: int,
    scan_k: int,
    larger_first: bool,
) -> tuple[list[int], I64, F32, npt.NDArray[np.int32]]:
    """The specification, one row at a time with Python lists and sorted()."""
    ids, scores, c = ids.copy(), scores.copy(), c.copy()
    w = ids.shape[1]
    gone_set = set(removed.tolist())
    status = []
    for x, r in enumerate(rows.tolist()):
        if skip[r]:
            status.append(ROW_SKIPPED)
            continue
        cr = int(c[r])
        complete = cr > 0 and scores[r, cr - 1] == -np.inf
        entries = list(zip(scores[r, :cr].tolist(), ids[r, :cr].tolist(), strict=True))
        valid = [(s, a) for s, a in entries if a >= 0]
        kept = [(s, a) for s, a in valid if not (holds[r] and a in gone_set)]
        c_new = cr if complete else cr - (len(valid) - len(kept))
        if c_new < k:
            status.append(ROW_UNDERFLOW)
            continue
        last = None if complete else kept[c_new - 1]
        key = lambda e: order_key(e[0], e[1], larger_first)  # noqa: E731
        take = [e for e in cands[x] if last is None or key(e) < key(last)]
        if len(take) > scan_k:
            status.append(ROW_OVERFLOW)
            continue
        merged = sorted(kept + take, key=key)[:w]
        new_i = np.full(w, -1, dtype=np.int64)
        new_s = np.full(w, -np.inf, dtype=np.float32)
        new_i[: len(merged)] = [a for _, a in merged]
        new_s[: len(merged)] = [s for s, _ in merged]
        c[r] = w if complete else min(c_new + len(take), w)
        same = np.array_equal(new_i, ids[r]) and np.array_equal(new_s, scores[r])
        status.append(ROW_UNCHANGED if same else ROW_CHANGED)
        ids[r], scores[r] = new_i, new_s
    return status, ids, scores, c


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    larger_first=st.booleans(),
    scan_k=st.sampled_from([0, 1, 3, 50, 10_000]),
    w=st.sampled_from([1, 5, 12, 60]),
    most=st.sampled_from([5, 80]),
)
def test_update_rows_matches_the_reference(
    seed: int, larger_first: bool, scan_k: int, w: int, most: int
) -> None:
    rng = np.random.default_rng(seed)
    k = max(1, w - 3)
    n = 30
    ids, scores, c = make_rows(rng, n, w, k, larger_first)
    values = np.linspace(-1, 1, 9).astype(np.float32)
    held = np.unique(ids[ids >= 0])
    removed = np.unique(rng.choice(held, min(len(held), 15))) if len(held) else held
    holds = rows_holding(ids, c, removed)
    holds |= rng.random(n) < 0.1  # a row may be searched for nothing
    skip = rng.random(n) < 0.1
    rows = np.sort(rng.choice(n, 20, replace=False)).astype(np.int64)
    cands: list[list[tuple[float, int]]] = []
    next_ad = 10_000
    for r in rows.tolist():
        row: list[tuple[float, int]] = []
        for _ in range(int(rng.integers(0, most))):
            if rng.random() < 0.3 and len(removed):  # a removed ad coming back (re-embedded)
                ad = int(rng.choice(removed))
                pos = np.flatnonzero(ids[r] == ad)
                s = float(scores[r, pos[0]]) if len(pos) else float(rng.choice(values))
            else:
                ad, s = next_ad, float(rng.choice(values))  # ties with the row's scores
                next_ad += 1
            if ad not in [a for _, a in row]:
                row.append((s, ad))
        cands.append(row)
    start = np.concatenate([[0], np.cumsum([len(x) for x in cands])]).astype(np.int64)
    flat = [e for row in cands for e in row]
    cand_ids = np.array([a for _, a in flat], dtype=np.int64)
    cand_scores = np.array([s for s, _ in flat], dtype=np.float32)
    want = reference_update(
        ids, scores, c, rows, holds, skip, removed, cands, k, scan_k, larger_first
    )
    got_i, got_s, got_c = ids.copy(), scores.copy(), c.copy()
    status, _, added = update_rows(
        got_i,
        got_s,
        got_c,
        rows,
        holds,
        skip,
        removed,
        start,
        cand_ids,
        cand_scores,
        k=k,
        scan_k=scan_k,
        larger_first=larger_first,
    )
    assert status.tolist() == want[0]
    np.testing.assert_array_equal(got_i, want[1])
    np.testing.assert_array_equal(got_s, want[2])
    np.testing.assert_array_equal(got_c, want[3])
    assert (added[np.isin(status, [ROW_SKIPPED, ROW_UNDERFLOW, ROW_OVERFLOW])] == 0).all()


def test_update_rows_same_vector_back_in_place_is_unchanged() -> None:
    """An ad re-upserted with its vector: removed and merged back where it was."""
    ids = np.array([[9, 7, 5, -1]], dtype=np.int64)
    scores = np.array([[0.9, 0.5, 0.5, -np.inf]], dtype=np.float32)
    c = np.array([3], dtype=np.int32)
    args: dict[str, Any] = dict(k=2, scan_k=4, larger_first=True)
    status, lost, added = update_rows(
        ids,
        scores,
        c,
        np.array([0]),
        np.array([True]),
        np.array([False]),
        np.array([7]),
        np.array([0, 1]),
        np.array([7]),
        np.array([0.5], np.float32),
        **args,
    )
    assert status.tolist() == [ROW_UNCHANGED] and lost.tolist() == [1] and added.tolist() == [1]
    assert ids.tolist() == [[9, 7, 5, -1]] and c.tolist() == [3]
