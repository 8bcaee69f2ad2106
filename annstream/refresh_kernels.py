"""The refresher's kernels: arrays in, arrays out, one pass over the rows they touch.

A neighbour list is a row of K + margin entries (ids int64, scores float32) in the index's
search order (score descending, equal scores by id: larger first under inner product, smaller
first under L2), with a valid-prefix length `c`: the first `c` entries are exactly the best
`c` ads of the query's probe lists; a -1 / -inf entry inside the prefix means "no more ads"
(the row is complete); entries past it are -1 / -inf padding.

Every kernel has a plain numpy reference in tests/unit/test_refresh_kernels.py. They are
compiled with numba (`cache=True`, so a machine compiles them once; `warm_up()` loads them
before the first micro-batch) and release the GIL, so the refresher runs one of them next to
a Faiss call in another thread.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from annstream.jit import jit, jit_reassoc

__all__ = [
    "NEEDS_SEARCH",
    "ROW_CHANGED",
    "ROW_OVERFLOW",
    "ROW_SKIPPED",
    "ROW_UNCHANGED",
    "ROW_UNDERFLOW",
    "build_routes",
    "compact_rows",
    "drop_entries",
    "group_rows",
    "held_entries",
    "rows_holding",
    "route_candidates",
    "update_rows",
    "warm_up",
]

I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]
I8 = npt.NDArray[np.int8]
F32 = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

ROW_UNCHANGED = 0
ROW_CHANGED = 1
ROW_UNDERFLOW = 2
ROW_OVERFLOW = 3
ROW_SKIPPED = 4
NEEDS_SEARCH = (ROW_UNDERFLOW, ROW_OVERFLOW, ROW_SKIPPED)

_BITS = 20
_LOW = (1 << _BITS) - 1


@jit
def _bitmap(removed: I64) -> npt.NDArray[np.uint64]:
    """One bit per value of the low `_BITS` bits of the removed ids: a cheap first screen."""
    bm = np.zeros(1 << (_BITS - 6), dtype=np.uint64)
    for v in removed:
        b = v & _LOW
        bm[b >> 6] |= np.uint64(1) << np.uint64(b & 63)
    return bm


@jit
def _is_removed(v: np.int64, bm: npt.NDArray[np.uint64], removed: I64) -> bool:
    if v < 0:
        return False
    b = v & _LOW
    if not (bm[b >> 6] >> np.uint64(b & 63)) & np.uint64(1):
        return False
    at = np.searchsorted(removed, v)
    return bool(at < len(removed) and removed[at] == v)


@jit
def _held(ids: npt.NDArray[np.int64], removed: I64) -> tuple[I64, I64]:
    n, w = ids.shape
    bm = _bitmap(removed)
    count = 0
    for r in range(n):
        for j in range(w):
            if _is_removed(ids[r, j], bm, removed):
                count += 1
    rows = np.empty(count, dtype=np.int64)
    cols = np.empty(count, dtype=np.int64)
    m = 0
    for r in range(n):
        for j in range(w):
            if _is_removed(ids[r, j], bm, removed):
                rows[m] = r
                cols[m] = j
                m += 1
    return rows, cols


def held_entries(ids: npt.NDArray[np.int64], removed: I64) -> tuple[I64, I64]:
    """(rows, columns) of the entries of `ids` (rows of ad ids) holding an id of `removed`.

    `removed` is sorted and unique. A bitmap on the low id bits screens each entry; only the
    few it lets through are looked up exactly (binary search). Padding (-1) never matches.
    """
    if ids.shape[0] == 0 or ids.shape[1] == 0 or len(removed) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return _held(np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(removed))


@jit
def _rows_holding(ids: npt.NDArray[np.int64], c: I32, removed: I64) -> BoolArray:
    n, w = ids.shape
    bm = _bitmap(removed)
    out = np.zeros(n, dtype=np.bool_)
    for r in range(n):
        for j in range(min(w, max(c[r], 0))):
            if _is_removed(ids[r, j], bm, removed):
                out[r] = True
                break
    return out


def rows_holding(ids: npt.NDArray[np.int64], c: I32, removed: I64) -> BoolArray:
    """bool[n]: which rows hold an id of `removed` (sorted, unique) in their first `c` entries."""
    if len(removed) == 0 or ids.shape[0] == 0:
        return np.zeros(ids.shape[0], dtype=bool)
    return _rows_holding(
        np.ascontiguousarray(ids, dtype=np.int64),
        np.ascontiguousarray(c, dtype=np.int32),
        np.ascontiguousarray(removed),
    )


def compact_rows(ids: I64, scores: F32) -> tuple[I64, F32]:
    """Rows with holes (id -1) as lists: the other entries first, in order, then -1 / -inf."""
    keep = ids != -1
    fill = np.arange(ids.shape[1])[None, :] < keep.sum(axis=1)[:, None]
    out_i = np.full(ids.shape, -1, dtype=np.int64)
    out_s = np.full(scores.shape, -np.inf, dtype=np.float32)
    out_i[fill] = ids[keep]
    out_s[fill] = scores[keep]
    return out_i, out_s


def drop_entries(ids: I64, scores: F32, rows: I64, cols: I64) -> tuple[I64, I64, I64, F32]:
    """Remove the entries (rows, cols) from their rows; the rest move up, -1 / -inf pad.

    Returns the distinct rows hit, how many entries each lost and their new ids and scores.
    """
    hit, inv, gone_n = np.unique(rows, return_inverse=True, return_counts=True)
    sub_i, sub_s = ids[hit], scores[hit]
    sub_i[inv.reshape(-1), cols] = -1
    out_i, out_s = compact_rows(sub_i, sub_s)
    return hit, gone_n.astype(np.int64), out_i, out_s


@jit
def _build_routes(probe: I32, slots: I64, nlist: int) -> tuple[I64, I32]:
    p = probe.shape[1]
    start = np.zeros(nlist + 1, dtype=np.int64)
    for s in slots:
        for j in range(p):
            lst = probe[s, j]
            if lst >= 0:
                start[lst + 1] += 1
    for i in range(nlist):
        start[i + 1] += start[i]
    fill = start[:-1].copy()
    out = np.empty(start[nlist], dtype=np.int32)
    for s in slots:
        for j in range(p):
            lst = probe[s, j]
            if lst >= 0:
                out[fill[lst]] = s
                fill[lst] += 1
    return start, out


def build_routes(probe: I32, slots: I64, nlist: int) -> tuple[I64, I32]:
    """The head queries probing each IVF list: (start[nlist + 1], slots), a CSR by list.

    `probe[s]` are slot s's probe lists (-1: none); only `slots` (ascending) are routed, so
    each list's slots come out ascending.
    """
    return _build_routes(
        np.ascontiguousarray(probe, dtype=np.int32), np.ascontiguousarray(slots, np.int64), nlist
    )


@jit
def _pairs_bound(lists: I64, start: I64) -> int:
    """How many (ad, routed slot) pairs there are: the most a screen can return."""
    total = 0
    for lst in lists:
        if lst >= 0:
            total += start[lst + 1] - start[lst]
    return total


@jit_reassoc
def _route_ip(q: F32, lim: F32, vecs: F32, lists: I64, start: I64, route: I32) -> tuple[I64, I64]:
    d = q.shape[1]
    bound = _pairs_bound(lists, start)
    out_s = np.empty(bound, dtype=np.int64)
    out_a = np.empty(bound, dtype=np.int64)
    m = 0
    for a in range(len(vecs)):
        lst = lists[a]
        if lst < 0:
            continue
        for j in range(start[lst], start[lst + 1]):
            s = route[j]
            acc = np.float32(0.0)
            for x in range(d):
                acc += q[s, x] * vecs[a, x]
            if acc >= lim[s]:
                out_s[m] = s
                out_a[m] = a
                m += 1
    return out_s[:m].copy(), out_a[:m].copy()


@jit_reassoc
def _route_l2(q: F32, lim: F32, vecs: F32, lists: I64, start: I64, route: I32) -> tuple[I64, I64]:
    d = q.shape[1]
    bound = _pairs_bound(lists, start)
    out_s = np.empty(bound, dtype=np.int64)
    out_a = np.empty(bound, dtype=np.int64)
    m = 0
    for a in range(len(vecs)):
        lst = lists[a]
        if lst < 0:
            continue
        for j in range(start[lst], start[lst + 1]):
            s = route[j]
            acc = np.float32(0.0)
            for x in range(d):
                diff = q[s, x] - vecs[a, x]
                acc += diff * diff
            if -acc >= lim[s]:
                out_s[m] = s
                out_a[m] = a
                m += 1
    return out_s[:m].copy(), out_a[:m].copy()


def route_candidates(
    q: F32,
    thr: F32,
    vecs: F32,
    lists: I64,
    start: I64,
    route: I32,
    *,
    l2: bool,
    tol: float,
) -> tuple[I64, I64]:
    """(slot, row of `vecs`) pairs where a new ad may beat the slot's threshold.

    Ad `a` lies in IVF list `lists[a]` and is scored (float32, any summation order) only
    against the slots probing that list (`start`/`route` from `build_routes`); a pair comes
    back when its score reaches `thr[slot] - tol` (thr inf: the slot takes nothing). A
    superset of the qualifying pairs, to be scored again exactly.
    """
    lim = np.asarray(thr, dtype=np.float32) - np.float32(tol)  # inf stays inf: never reached
    kernel = _route_l2 if l2 else _route_ip
    return kernel(
        np.ascontiguousarray(q, dtype=np.float32),
        lim,
        np.ascontiguousarray(vecs, dtype=np.float32),
        np.ascontiguousarray(lists, dtype=np.int64),
        start,
        route,
    )


@jit
def _before(s1: np.float32, i1: np.int64, s2: np.float32, i2: np.int64, larger: bool) -> bool:
    """Entry 1 comes before entry 2 in the index's search order."""
    if s1 != s2:
        return bool(s1 > s2)
    return bool(i1 > i2) if larger else bool(i1 < i2)


@jit
def _sort_entries(cs: F32, ci: I64, n: int, larger: bool) -> None:
    """The first `n` entries (scores, ids) in search order, in place: insertion sort for the
    few candidates a row usually gets, two stable sorts for many (catch-up batches)."""
    if n <= 32:
        for a in range(1, n):
            s, i = cs[a], ci[a]
            p = a
            while p > 0 and _before(s, i, cs[p - 1], ci[p - 1], larger):
                cs[p] = cs[p - 1]
                ci[p] = ci[p - 1]
                p -= 1
            cs[p] = s
            ci[p] = i
        return
    by_id = np.argsort(-ci[:n] if larger else ci[:n], kind="mergesort")
    s1, i1 = cs[:n][by_id], ci[:n][by_id]
    by_score = np.argsort(-s1, kind="mergesort")
    cs[:n] = s1[by_score]
    ci[:n] = i1[by_score]


@jit
def _update_rows(
    ids: I64,
    scores: F32,
    c: I32,
    rows: I64,
    holds: BoolArray,
    skip: BoolArray,
    removed: I64,
    cand_start: I64,
    cand_ids: I64,
    cand_scores: F32,
    k: int,
    scan_k: int,
    larger: bool,
) -> tuple[I8, I32, I32]:
    w = ids.shape[1]
    bm = _bitmap(removed)
    status = np.zeros(len(rows), dtype=np.int8)
    lost = np.zeros(len(rows), dtype=np.int32)
    added = np.zeros(len(rows), dtype=np.int32)
    keep_i = np.empty(w, dtype=np.int64)
    keep_s = np.empty(w, dtype=np.float32)
    new_i = np.empty(w, dtype=np.int64)
    new_s = np.empty(w, dtype=np.float32)
    ci = np.empty(16, dtype=np.int64)
    cs = np.empty(16, dtype=np.float32)
    for x in range(len(rows)):
        r = rows[x]
        if skip[r]:
            status[x] = ROW_SKIPPED
            continue
        cr = c[r]
        complete = cr > 0 and scores[r, cr - 1] == -np.inf
        # 1. the removed ads leave (holes close up): `first` is the first entry that moves
        m = 0
        first = w
        if holds[r]:
            for j in range(w):
                v = ids[r, j]
                if j < cr and _is_removed(v, bm, removed):
                    if first == w:
                        first = j
                    continue
                keep_i[m] = v
                keep_s[m] = scores[r, j]
                m += 1
        gone = w - m if holds[r] else 0
        lost[x] = gone
        if gone:
            for j in range(m, w):
                keep_i[j] = -1
                keep_s[j] = -np.inf
        else:
            for j in range(w):
                keep_i[j] = ids[r, j]
                keep_s[j] = scores[r, j]
        c_new = cr if complete else cr - gone
        if c_new < k:
            status[x] = ROW_UNDERFLOW
            continue
        # 2. the candidates that come before the last valid entry, sorted in search order
        a0, a1 = cand_start[x], cand_start[x + 1]
        last_s, last_i = keep_s[c_new - 1], keep_i[c_new - 1]
        n_c = 0
        if a1 - a0 > len(ci):
            ci = np.empty(2 * (a1 - a0), dtype=np.int64)
            cs = np.empty(2 * (a1 - a0), dtype=np.float32)
        for j in range(a0, a1):
            sj, ij = cand_scores[j], cand_ids[j]
            if last_i >= 0 and not _before(sj, ij, last_s, last_i, larger):
                continue
            cs[n_c] = sj
            ci[n_c] = ij
            n_c += 1
        _sort_entries(cs, ci, n_c, larger)
        if n_c > scan_k:
            status[x] = ROW_OVERFLOW
            continue
        added[x] = n_c
        c[r] = w if complete else min(c_new + n_c, w)
        if gone == 0 and n_c == 0:
            continue
        # 3. merge from where the best candidate lands (entries before it stay), cut at w
        lo, hi = 0, c_new
        if n_c:
            while lo < hi:
                mid = (lo + hi) >> 1
                if _before(keep_s[mid], keep_i[mid], cs[0], ci[0], larger):
                    lo = mid + 1
                else:
                    hi = mid
        else:
            lo = c_new
        start = min(first, lo)
        a = lo
        b = 0
        for j in range(lo, w):
            if a < c_new and (b >= n_c or _before(keep_s[a], keep_i[a], cs[b], ci[b], larger)):
                new_i[j] = keep_i[a]
                new_s[j] = keep_s[a]
                a += 1
            elif b < n_c:
                new_i[j] = ci[b]
                new_s[j] = cs[b]
                b += 1
            else:
                new_i[j] = -1
                new_s[j] = -np.inf
        for j in range(start, lo):
            new_i[j] = keep_i[j]
            new_s[j] = keep_s[j]
        # a removed ad coming back where it was (the same vector upserted) changes nothing
        changed = gone == 0 or n_c == 0
        if not changed:
            for j in range(start, w):
                if new_i[j] != ids[r, j] or new_s[j] != scores[r, j]:
                    changed = True
                    break
        if changed:
            for j in range(start, w):
                ids[r, j] = new_i[j]
                scores[r, j] = new_s[j]
            status[x] = ROW_CHANGED
    return status, lost, added


def update_rows(
    ids: I64,
    scores: F32,
    c: I32,
    rows: I64,
    holds: BoolArray,
    skip: BoolArray,
    removed: I64,
    cand_start: I64,
    cand_ids: I64,
    cand_scores: F32,
    *,
    k: int,
    scan_k: int,
    larger_first: bool,
) -> tuple[I8, I32, I32]:
    """Apply one micro-batch to `rows` of the lists (ids, scores, c), in place.

    Per row: the entries of `removed` (sorted, unique) leave (looked for only in rows where
    `holds[row]`); the candidates `cand_ids/scores[cand_start[x]:cand_start[x + 1]]` of
    `rows[x]` (any order) that come before the row's last valid entry after the removals are
    merged in, in search order, up to the width. A row is left as it was, with a status
    saying it needs a full search, when its valid prefix falls below `k` (ROW_UNDERFLOW), when
    more than `scan_k` candidates qualify (ROW_OVERFLOW) or when `skip[row]` (ROW_SKIPPED).
    Otherwise its status is ROW_CHANGED when any entry (id or score) differs, else
    ROW_UNCHANGED.

    Returns (status int8, entries lost, candidates merged) per row of `rows`.
    """
    return _update_rows(
        ids,
        scores,
        c,
        np.ascontiguousarray(rows, dtype=np.int64),
        holds,
        skip,
        np.ascontiguousarray(removed, dtype=np.int64),
        np.ascontiguousarray(cand_start, dtype=np.int64),
        np.ascontiguousarray(cand_ids, dtype=np.int64),
        np.ascontiguousarray(cand_scores, dtype=np.float32),
        k,
        scan_k,
        larger_first,
    )


@jit
def _group(hit: BoolArray, slots: I64) -> tuple[I64, I64, I64]:
    n = len(hit)
    counts = np.zeros(n + 1, dtype=np.int64)
    for s in slots:
        counts[s + 1] += 1
    n_rows = 0
    for r in range(n):
        if hit[r] or counts[r + 1]:
            n_rows += 1
    rows = np.empty(n_rows, dtype=np.int64)
    start = np.zeros(n_rows + 1, dtype=np.int64)
    x = 0
    for r in range(n):
        if hit[r] or counts[r + 1]:
            rows[x] = r
            start[x + 1] = start[x] + counts[r + 1]
            x += 1
    for r in range(n):
        counts[r + 1] += counts[r]
    order = np.empty(len(slots), dtype=np.int64)
    for j in range(len(slots)):
        s = slots[j]
        order[counts[s]] = j
        counts[s] += 1
    return rows, start, order


def group_rows(hit: BoolArray, slots: I64) -> tuple[I64, I64, I64]:
    """The rows a micro-batch touches and their candidates, grouped (a counting sort).

    `hit[r]`: row r holds a removed ad; `slots[j]`: the row of candidate j. Returns
    (rows: ascending, every row hit or with a candidate; start: candidates of rows[x] are
    order[start[x]:start[x + 1]]; order: candidate indices grouped by row, stable).
    """
    return _group(np.ascontiguousarray(hit, dtype=bool), np.ascontiguousarray(slots, np.int64))


def warm_up() -> None:
    """Load (or compile, once per machine) every kernel before the first micro-batch."""
    ids = np.array([[1, 2, -1]], dtype=np.int64)
    scores = np.array([[0.5, 0.25, -np.inf]], dtype=np.float32)
    c = np.array([3], dtype=np.int32)
    removed = np.array([2], dtype=np.int64)
    held_entries(ids, removed)
    rows_holding(ids, c, removed)
    probe = np.zeros((1, 1), dtype=np.int32)
    start, route = build_routes(probe, np.zeros(1, np.int64), 1)
    q = np.zeros((1, 2), dtype=np.float32)
    for l2 in (False, True):
        route_candidates(
            q, np.zeros(1, np.float32), q, np.zeros(1, np.int64), start, route, l2=l2, tol=1e-4
        )
    rows, _, _ = group_rows(np.ones(1, bool), np.zeros(1, np.int64))
    update_rows(
        ids,
        scores,
        c,
        rows,
        np.ones(1, bool),
        np.zeros(1, bool),
        removed,
        np.array([0, 1], np.int64),
        np.array([3], np.int64),
        np.array([0.3], np.float32),
        k=1,
        scan_k=4,
        larger_first=True,
    )
