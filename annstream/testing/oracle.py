"""An exact oracle for what the service stored, independent of the code that stored it.

It shares nothing with the index, the head tracker, the refresher or the sink: it replays the
published events itself (the last event of an ad in publish order wins; engagement scores are
sums of `weight * 2 ** -((clock - event_time) / half_life)` at the decay clock, the latest
engagement event time), searches every live ad by numpy brute force and compares what the
store returns through its public reading API. Comparisons are tie-aware: an entry is right when
its true score ties the true score at the cut (K-th or the list's width) within `TIE_EPS`.

What a query must be at the end follows from the hysteresis alone: a decayed score >= enter
must be a head query (with a live list), < exit must not be (its list, if still readable,
expires), anything between may be either. Named checks (`CHECKS`), each with how many items
were checked and how many failed:
- `head_missing`: a query that must be a head query has no live list;
- `list_exact`: a live list's valid entries are not the exact best ads (the whole K + margin
  prefix it holds, at least K of them, in score order, ties allowed at its last place);
- `score_stale`: a stored score differs from the true score of that ad for that query;
- `deleted_ad_live` / `deleted_ad_expiring`: a deleted ad in a live list / in the list of a
  query that left the head set and is still readable until its exit TTL;
- `orphan_live_list`: a live list of a query that is not a head query;
- `version_backwards`: a list's version went down between two reads of the store;
- `index_count`: the service's count of indexed ads is not the number of live ads.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np
import numpy.typing as npt

__all__ = [
    "CHECKS",
    "TIE_EPS",
    "Check",
    "ExactOracle",
    "HeadRules",
    "OracleReport",
    "StoredView",
    "read_store",
]

TIE_EPS = 1e-4
"""Scores closer than this are a tie (float32 inner products at d = 384 round to ~1e-6)."""

CHECKS = (
    "head_missing",
    "list_exact",
    "score_stale",
    "deleted_ad_live",
    "deleted_ad_expiring",
    "orphan_live_list",
    "version_backwards",
    "index_count",
)
_EXAMPLES = 5
_BLOCK = 256

Int64Array = npt.NDArray[np.int64]
Float32Array = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class HeadRules:
    """The head-query settings the run used (heads.*, refresh.k / margin, index.metric)."""

    k: int
    margin: int
    enter_score: float
    exit_score: float
    half_life_s: float
    metric: str = "cosine"

    def __post_init__(self) -> None:
        if self.metric not in ("cosine", "ip"):
            raise ValueError(f"the oracle scores cosine or ip, not {self.metric!r}")
        if self.k <= 0 or self.margin < 0 or self.half_life_s <= 0:
            raise ValueError("k must be positive, margin >= 0 and half_life_s positive")

    @property
    def width(self) -> int:
        return self.k + self.margin


@dataclass
class Check:
    """One named check: items looked at, items wrong, a few of the wrong ones described."""

    checked: int = 0
    failed: int = 0
    examples: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        self.failed += 1
        if len(self.examples) < _EXAMPLES:
            self.examples.append(what)


@dataclass
class OracleReport:
    checks: dict[str, Check] = field(default_factory=lambda: {n: Check() for n in CHECKS})
    heads_required: int = 0
    heads_optional: int = 0
    live_lists: int = 0
    expiring_lists: int = 0
    live_ads: int = 0

    def failed(self, names: tuple[str, ...] | None = None) -> dict[str, int]:
        """Failure counts of the checks that failed (all checks, or those `names`)."""
        picked = CHECKS if names is None else names
        return {n: self.checks[n].failed for n in picked if self.checks[n].failed}

    def ok(self, names: tuple[str, ...] | None = None) -> bool:
        return not self.failed(names)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok(),
            "heads_required": self.heads_required,
            "heads_optional": self.heads_optional,
            "live_lists": self.live_lists,
            "expiring_lists": self.expiring_lists,
            "live_ads": self.live_ads,
            "checks": {
                n: {"checked": c.checked, "failed": c.failed, "examples": c.examples}
                for n, c in self.checks.items()
            },
        }


@dataclass(frozen=True)
class StoredView:
    """What the store returned for some query ids: valid entries are ids >= 0; `expiring`
    marks lists with an expiry (queries that left the head set, readable until their TTL)."""

    query_ids: Int64Array
    ids: Int64Array
    scores: Float32Array
    versions: Int64Array
    expiring: BoolArray


class ExactOracle:
    """The published events, replayed by hand, and the checks of a store against them."""

    def __init__(self, rules: HeadRules, dim: int) -> None:
        self.rules, self.dim = rules, dim
        self._ads: dict[int, npt.NDArray[np.float32]] = {}
        self._eng_q: list[Int64Array] = []
        self._eng_w: list[npt.NDArray[np.float64]] = []
        self._eng_t: list[Int64Array] = []
        self._qvec: dict[int, npt.NDArray[np.float32]] = {}
        self._versions: dict[int, int] = {}
        self.version_checks = Check()

    # ---- what was published -----------------------------------------------------------

    def add_ads(
        self, ad_ids: npt.ArrayLike, deleted: npt.ArrayLike, vectors: npt.ArrayLike
    ) -> None:
        """Ad events in publish order (an ad's events go to one partition, so its last wins)."""
        ids = np.asarray(ad_ids, dtype=np.int64).reshape(-1)
        dels = np.asarray(deleted, dtype=bool).reshape(-1)
        vecs = np.asarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        for a, d, v in zip(ids.tolist(), dels.tolist(), vecs, strict=True):
            if d:
                self._ads.pop(a, None)
            else:
                self._ads[a] = v.copy()

    def add_engagements(
        self,
        query_ids: npt.ArrayLike,
        weights: npt.ArrayLike,
        event_time_ms: npt.ArrayLike,
        vectors: npt.ArrayLike,
        has_vector: npt.ArrayLike | None = None,
    ) -> None:
        """Engagement events the service accepted, in publish order (the last vector wins)."""
        q = np.asarray(query_ids, dtype=np.int64).reshape(-1)
        vecs = np.asarray(vectors, dtype=np.float32).reshape(len(q), self.dim)
        hv = np.ones(len(q), bool) if has_vector is None else np.asarray(has_vector, bool)
        self._eng_q.append(q.copy())
        self._eng_w.append(np.asarray(weights, dtype=np.float64).reshape(-1).copy())
        self._eng_t.append(np.asarray(event_time_ms, dtype=np.int64).reshape(-1).copy())
        for qid, v, h in zip(q.tolist(), vecs, hv.tolist(), strict=True):
            if h:
                self._qvec[qid] = v.copy()

    def add_batch(self, batch: Any) -> None:
        """An AdBatch or EngagementBatch (read by field name only)."""
        if hasattr(batch, "ad_ids"):
            self.add_ads(batch.ad_ids, np.asarray(batch.ops) != 0, batch.vectors)
        else:
            self.add_engagements(
                batch.query_ids,
                batch.weights,
                batch.event_time_ms,
                batch.vectors,
                batch.has_vector,
            )

    # ---- the truth -------------------------------------------------------------------------

    @property
    def live_ids(self) -> Int64Array:
        return np.array(sorted(self._ads), dtype=np.int64)

    def query_ids(self) -> Int64Array:
        """Every query that was engaged with, sorted."""
        if not self._eng_q:
            return np.empty(0, dtype=np.int64)
        return np.unique(np.concatenate(self._eng_q))

    def clock_ms(self) -> int:
        """The decay clock at the end: the latest engagement event time."""
        return max((int(t.max()) for t in self._eng_t if len(t)), default=0)

    def scores(self) -> tuple[Int64Array, npt.NDArray[np.float64]]:
        """(query ids, decayed engagement score at the clock), from the raw events."""
        if not self._eng_q:
            return np.empty(0, np.int64), np.empty(0, np.float64)
        q, w, t = (np.concatenate(x) for x in (self._eng_q, self._eng_w, self._eng_t))
        age = (self.clock_ms() - t).astype(np.float64)
        uq, inv = np.unique(q, return_inverse=True)
        half_life_ms = self.rules.half_life_s * 1000.0
        total = np.bincount(inv, weights=w * np.exp2(-age / half_life_ms), minlength=len(uq))
        return uq.astype(np.int64), total.astype(np.float64)

    def head_bounds(self) -> tuple[Int64Array, Int64Array]:
        """(queries that must be head queries, queries that may be): by score at the clock,
        with a margin of TIE_EPS at both thresholds; only queries with a vector qualify."""
        uq, s = self.scores()
        has = np.array([q in self._qvec for q in uq.tolist()], dtype=bool)
        must = has & (s >= self.rules.enter_score + TIE_EPS)
        may = has & (s >= self.rules.exit_score - TIE_EPS)
        return uq[must], uq[may]

    def _normalised(self, vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if self.rules.metric == "ip":
            return vectors
        norms = np.linalg.norm(vectors, axis=1, keepdims=True).astype(np.float32)
        return np.divide(vectors, np.where(norms > 0, norms, np.float32(1.0)), dtype=np.float32)

    # ---- the checks ------------------------------------------------------------------------

    def observe_versions(self, view: StoredView) -> None:
        """One read of the store during the run: versions must never go backwards."""
        c = self.version_checks
        for q, v in zip(view.query_ids.tolist(), view.versions.tolist(), strict=True):
            c.checked += 1
            before = self._versions.get(q)
            if before is not None and v < before:
                c.fail(f"query {q}: version {v} after {before}")
            self._versions[q] = max(v, before or v)

    def judge(self, view: StoredView, index_ads: int | None = None) -> OracleReport:
        """Every named check of `view` (the store read at the end) against the truth;
        `index_ads`: the service's count of indexed ads (from /status or its metrics)."""
        rep = OracleReport()
        self.observe_versions(view)
        rep.checks["version_backwards"] = self.version_checks
        live_ids = self.live_ids
        rep.live_ads = len(live_ids)
        if index_ads is not None:
            c = rep.checks["index_count"]
            c.checked = 1
            if index_ads != len(live_ids):
                c.fail(f"index holds {index_ads} ads, {len(live_ids)} live")
        must, may = self.head_bounds()
        uq, score = self.scores()
        at = dict(zip(uq.tolist(), score.tolist(), strict=True))
        rep.heads_required, rep.heads_optional = len(must), len(may) - len(must)
        live_rows = np.flatnonzero(~view.expiring)
        rep.live_lists, rep.expiring_lists = len(live_rows), int(view.expiring.sum())

        c = rep.checks["head_missing"]
        have = set(view.query_ids[live_rows].tolist())
        c.checked = len(must)
        for q in must.tolist():
            if q not in have:
                c.fail(f"query {q} must be a head query: no live list")

        c = rep.checks["orphan_live_list"]
        allowed = set(may.tolist())
        c.checked = len(live_rows)
        for r in live_rows.tolist():
            q = int(view.query_ids[r])
            if q not in allowed:
                c.fail(f"query {q}: live list, not a head query (score {at.get(q, 0.0):.3f})")

        alive = set(live_ids.tolist())
        for name, rows in (
            ("deleted_ad_live", live_rows),
            ("deleted_ad_expiring", np.flatnonzero(view.expiring)),
        ):
            c = rep.checks[name]
            for r in rows.tolist():
                ids = view.ids[r][view.ids[r] >= 0].tolist()
                c.checked += len(ids)
                gone = [a for a in ids if a not in alive]
                q = int(view.query_ids[r])
                for a in gone:
                    c.fail(f"query {q} (score {at.get(q, 0.0):.3f}): deleted ad {a}")

        judged = np.array(
            [r for r in live_rows.tolist() if int(view.query_ids[r]) in self._qvec], dtype=np.intp
        )
        self._judge_lists(view, judged, live_ids, rep)
        return rep

    def _judge_lists(
        self, view: StoredView, rows: npt.NDArray[np.intp], live_ids: Int64Array, rep: OracleReport
    ) -> None:
        exact, stale = rep.checks["list_exact"], rep.checks["score_stale"]
        if len(live_ids):
            ads = self._normalised(np.stack([self._ads[a] for a in live_ids.tolist()]))
        else:
            ads = np.zeros((0, self.dim), dtype=np.float32)
        position = {a: i for i, a in enumerate(live_ids.tolist())}
        k, width = self.rules.k, self.rules.width
        for start in range(0, len(rows), _BLOCK):
            block = rows[start : start + _BLOCK]
            qv = self._normalised(
                np.stack([self._qvec[int(view.query_ids[r])] for r in block.tolist()])
            )
            true = (qv.astype(np.float64) @ ads.T.astype(np.float64)).astype(np.float64)
            for j, r in enumerate(block.tolist()):
                exact.checked += 1
                row_ids = view.ids[r]
                got = row_ids[row_ids >= 0]
                got_scores = view.scores[r][row_ids >= 0].astype(np.float64)
                why = _list_problem(got, true[j], position, k, width)
                if why:
                    exact.fail(f"query {int(view.query_ids[r])}: {why}")
                for a, s in zip(got.tolist(), got_scores.tolist(), strict=True):
                    if a not in position:
                        continue
                    stale.checked += 1
                    want = float(true[j, position[a]])
                    if abs(s - want) > TIE_EPS:
                        stale.fail(
                            f"query {int(view.query_ids[r])} ad {a}: stored {s:.6f}, true {want:.6f}"
                        )


def _list_problem(
    got: Int64Array,
    true: npt.NDArray[np.float64],
    position: dict[int, int],
    k: int,
    width: int,
) -> str:
    """Why `got` is not the exact best len(got) ads (ties at its last place allowed); ''."""
    n = len(got)
    if n > width:
        return f"{n} entries, more than K + margin = {width}"
    if n < min(k, len(true)):
        return f"{n} entries, fewer than K = {k} with {len(true)} live ads"
    if len(set(got.tolist())) != n:
        return "an ad twice"
    if n == 0:
        return ""
    if any(a not in position for a in got.tolist()):
        return "holds a deleted ad"
    s = true[[position[a] for a in got.tolist()]]
    cut = float(np.partition(-true, n - 1)[n - 1]) * -1.0
    if float(s.min()) < cut - TIE_EPS:
        return f"holds an ad scoring {float(s.min()):.6f}, below the true cut {cut:.6f}"
    better = int(np.count_nonzero(true > cut + TIE_EPS))
    held = int(np.count_nonzero(s > cut + TIE_EPS))
    if held < better:
        return f"misses {better - held} ads scoring above the cut {cut:.6f}"
    if np.any(np.diff(s) > TIE_EPS):
        return "not in score order"
    return ""


# ---- reading the store ---------------------------------------------------------------------


def _expiring_sqlite(path: str, query_ids: list[int]) -> set[int]:
    out: set[int] = set()
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        for i in range(0, len(query_ids), 500):
            chunk = query_ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            rows = db.execute(
                "SELECT query_id FROM neighbour_lists WHERE expires_at_ms IS NOT NULL "
                f"AND query_id IN ({marks})",
                chunk,
            )
            out |= {int(r[0]) for r in rows}
    return out


def _expiring_aerospike(url: str, query_ids: list[int]) -> set[int]:
    import aerospike

    parts = urlparse(url)
    namespace, set_name = [*parts.path.strip("/").split("/"), ""][:2]
    client = aerospike.client({"hosts": [(parts.hostname, parts.port or 3000)]})
    out: set[int] = set()
    try:
        for i in range(0, len(query_ids), 500):
            chunk = query_ids[i : i + 500]
            batch = client.batch_read([(namespace, set_name, q) for q in chunk], [])
            for q, rec in zip(chunk, batch.batch_records, strict=True):
                meta = rec.record[1] if rec.result == 0 and rec.record else None
                ttl = None if not meta else meta.get("ttl")
                if ttl is not None and 0 < ttl < 0xFFFFFFFF:
                    out.add(q)
    finally:
        client.close()
    return out


def read_store(url: str, query_ids: npt.ArrayLike) -> StoredView:
    """The lists of `query_ids` the store returns (through its public lookup), and which of
    them carry an expiry (read from the backend directly: the lookup does not say)."""
    from annstream.store import open_store

    qids = np.asarray(query_ids, dtype=np.int64).reshape(-1)
    store = open_store(url)
    try:
        got = store.lookup(qids, metadata=False)
    finally:
        store.close()
    found = got.found
    ids = got.ids[found]
    q = got.query_ids[found]
    if url.startswith("sqlite:///"):
        expiring = _expiring_sqlite(url[len("sqlite:///") :], q.tolist())
    elif url.startswith("aerospike://"):
        expiring = _expiring_aerospike(url, q.tolist())
    else:
        raise ValueError(f"the oracle reads sqlite:/// or aerospike:// stores, not {url!r}")
    return StoredView(
        query_ids=q,
        ids=ids,
        scores=got.scores[found],
        versions=got.versions[found],
        expiring=np.isin(q, np.array(sorted(expiring), dtype=np.int64)),
    )
