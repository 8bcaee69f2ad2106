"""Stored recall against an independent numpy brute force, on a small index and a SQLite store."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from annstream.config import IndexConfig, ServiceConfig
from annstream.index import LiveIvfIndex
from annstream.recall import RecallMonitor, stored_recall
from annstream.store import NeighbourLists
from annstream.store.sqlite import SqliteStore

DIM, N_ADS, N_QUERIES, K, MARGIN = 16, 3_000, 60, 10, 5
ICFG = IndexConfig(dim=DIM, metric="cosine", nlist=32, nprobe=2)

World = tuple[LiveIvfIndex, SqliteStore, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype("float64")
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    """An index of random ads, and a store holding approximate (nprobe 2) lists of the queries,
    except the last query (never stored) and query 0 (stored with garbage)."""
    rng = np.random.default_rng(5)
    ads = rng.standard_normal((N_ADS, DIM)).astype("float32")
    ad_ids = rng.choice(10**9, N_ADS, replace=False).astype("int64")
    index = LiveIvfIndex.train(ICFG, ads)
    index.upsert(ad_ids, ads)
    qids = np.arange(100, 100 + N_QUERIES, dtype="int64")
    queries = rng.standard_normal((N_QUERIES, DIM)).astype("float32")
    scores, ids = index.search(queries, K + MARGIN, nprobe=2)
    ids[0] = ad_ids[: K + MARGIN]
    n = N_QUERIES - 1
    store = SqliteStore(tmp_path / "n.db")
    store.upsert(
        NeighbourLists(
            query_ids=qids[:n],
            ids=ids[:n],
            scores=scores[:n],
            versions=np.ones(n, "int64"),
            computed_at_ms=np.zeros(n, "int64"),
            k=K,
        )
    )
    yield index, store, ad_ids, ads, qids, queries
    store.close()


def _expected(
    store: SqliteStore, ad_ids: np.ndarray, ads: np.ndarray, qids: np.ndarray, queries: np.ndarray
) -> float:
    truth = np.argsort(-(_unit(queries) @ _unit(ads).T), axis=1)[:, :K]
    got = store.lookup(qids)
    per_query = []
    for row in range(len(qids)):
        stored = set(got.ids[row, :K].tolist()) if got.found[row] else set()
        per_query.append(len(stored & set(ad_ids[truth[row]].tolist())) / K)
    return float(np.mean(per_query))


def test_stored_recall_equals_numpy_brute_force(world: World) -> None:
    index, store, ad_ids, ads, qids, queries = world
    got = stored_recall(store, index, qids, queries, K)
    want = _expected(store, ad_ids, ads, qids, queries)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0.3 < got < 0.99  # approximate lists, one missing, one wrong: not trivially 0 or 1


def test_stored_recall_of_exact_lists_is_one(world: World) -> None:
    index, store, _, _, qids, queries = world
    _, exact = index.search_exact(queries[1:-1], K + MARGIN)
    n = len(qids) - 2
    store.upsert(
        NeighbourLists(qids[1:-1], exact, np.zeros(exact.shape, "float32"),
                       np.full(n, 2, "int64"), np.zeros(n, "int64"), K)
    )  # fmt: skip
    assert stored_recall(store, index, qids[1:-1], queries[1:-1], K) == 1.0
    assert math.isnan(stored_recall(store, index, qids[:0], queries[:0], K))


def test_stored_recall_rejects_mismatched_vectors(world: World) -> None:
    index, store, _, _, qids, queries = world
    with pytest.raises(ValueError, match="one row per query id"):
        stored_recall(store, index, qids, queries[:3], K)


def test_monitor_measures_every_n_batches_and_warns(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    index, store, _, _, qids, queries = world
    by_id = dict(zip(qids.tolist(), queries, strict=True))

    def vectors(ids: np.ndarray) -> np.ndarray:
        return np.stack([by_id[int(q)] for q in ids])

    cfg = ServiceConfig(recall_every_batches=3, recall_sample=N_QUERIES, recall_warn_below=0.99)
    monitor = RecallMonitor.from_config(cfg, k=K)
    monitor.slice_s = 60.0  # whole sweeps: one call measures, however loaded the machine
    with caplog.at_level(logging.WARNING, logger="annstream.recall"):
        results = [monitor.after_batch(store, index, qids, vectors) for _ in range(6)]
    assert results[0] is None and results[1] is None and results[3] is None
    assert results[2] == results[5] == stored_recall(store, index, qids, queries, K)
    assert monitor.last == results[5]
    assert sum("stored recall@10" in r.message for r in caplog.records) == 2


def test_monitor_samples_a_subset_and_skips_nothing_to_sample(world: World) -> None:
    index, store, _, _, qids, queries = world
    seen: list[np.ndarray] = []

    def vectors(ids: np.ndarray) -> np.ndarray:
        seen.append(ids)
        return queries[ids - 100]

    monitor = RecallMonitor(every_batches=1, sample=7, k=K, warn_below=0.0, slice_s=60.0)
    r = monitor.after_batch(store, index, qids, vectors)
    assert r is not None and len(seen[0]) == 7 and len(set(seen[0].tolist())) == 7
    assert monitor.after_batch(store, index, qids[:0], vectors) is None
    with pytest.raises(ValueError, match="warn_below"):
        RecallMonitor(every_batches=1, sample=7, k=K, warn_below=2.0)


def test_monitor_sweeps_the_exact_side_a_slice_per_batch_and_measures_when_asked(
    world: World,
) -> None:
    """The exact side no longer scans every list at once on the owner thread: with a zero
    time slice it takes one slice of lists (16 of 32) per stored micro-batch; the figure
    equals the one-shot measurement. `request()` starts one whatever every_batches says."""
    index, store, _, _, qids, queries = world

    def vectors(ids: np.ndarray) -> np.ndarray:
        return queries[ids - 100]

    monitor = RecallMonitor(every_batches=0, sample=N_QUERIES, k=K, warn_below=0.0, slice_s=0.0)
    assert monitor.after_batch(store, index, qids, vectors) is None and not monitor.measuring
    monitor.request()
    assert monitor.measuring
    assert monitor.after_batch(store, index, qids, vectors) is None and monitor.measuring
    got = monitor.after_batch(store, index, qids, vectors)
    assert got is not None and not monitor.measuring
    assert got == pytest.approx(stored_recall(store, index, qids, queries, K), abs=1e-12)
    # head queries that left during the sweep are not counted (their lists may be gone)
    monitor.request()
    assert monitor.after_batch(store, index, qids, vectors) is None
    got = monitor.after_batch(store, index, qids[10:], vectors)
    want = stored_recall(store, index, qids[10:], queries[10:], K)
    assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_exact_sweep_under_ivfpq_reads_the_exact_store_in_id_chunks(metric: str) -> None:
    """IVFPQ keeps its exact vectors in one list: the sweep goes by chunks of the ids live at
    its start instead (ads deleted meanwhile dropped), and equals the one-shot exact search."""
    from annstream import recall

    rng = np.random.default_rng(8)
    ads = rng.standard_normal((20_000, DIM)).astype("float32")
    cfg = IndexConfig(dim=DIM, metric=metric, kind="ivfpq", nlist=32, nprobe=2, pq_m=4)
    index = LiveIvfIndex.train(cfg, ads[:5_000])
    index.upsert(np.arange(20_000), ads)
    queries = rng.standard_normal((20, DIM)).astype("float32")
    sweep = recall.ExactSweep(index, queries, K)
    steps = 1
    while not sweep.step(0.0):
        steps += 1
        if steps == 2:
            index.delete(np.arange(0, 20_000, 7))
    assert steps == -(-20_000 // recall._ID_CHUNK) == 2
    _, want = index.search_exact(queries, K)
    np.testing.assert_array_equal(np.sort(sweep.exact_ids(), axis=1), np.sort(want, axis=1))
