"""LiveIvfIndex: update semantics, and differential tests against a fresh Faiss index."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from annstream.ann import knn_exact
from annstream.config import IndexConfig
from annstream.errors import IndexStateError
from annstream.index import LiveIvfIndex

D = 16


def _data(n: int, seed: int = 1338) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype("float32")


def _cfg(metric: str = "cosine", kind: str = "ivfflat") -> IndexConfig:
    return IndexConfig(dim=D, metric=metric, kind=kind, nlist=16, nprobe=4, pq_m=4, pq_nbits=6)


@pytest.fixture(params=["cosine", "l2"])
def metric(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def index(metric: str) -> LiveIvfIndex:
    return LiveIvfIndex.train(_cfg(metric), _data(2000, seed=1))


def test_train_gives_empty_trained_index_at_version_0(index: LiveIvfIndex) -> None:
    assert index.is_trained and index.ntotal == 0 and index.version == 0
    assert index.nprobe == 4 and index.dim == D
    assert index.ids().size == 0


def test_upsert_unknown_id_is_an_insert_and_known_id_a_replace(index: LiveIvfIndex) -> None:
    x = _data(100)
    index.upsert(np.arange(100), x)
    assert index.ntotal == 100
    new = _data(10, seed=5)
    index.upsert(np.array([3, 4, 5, 6, 7, 200, 201, 202, 203, 204]), new)
    assert index.ntotal == 105
    np.testing.assert_array_equal(index.vectors([3, 200]), index.prepare(new[[0, 5]]))
    assert np.array_equal(index.ids(), np.r_[np.arange(100), np.arange(200, 205)])


def test_upsert_last_occurrence_wins_within_a_batch(index: LiveIvfIndex) -> None:
    x = _data(4)
    index.upsert(np.array([7, 8, 7, 7]), x)
    assert index.ntotal == 2
    np.testing.assert_array_equal(index.vectors([7, 8]), index.prepare(x[[3, 1]]))


def test_delete_returns_removed_ids_and_ignores_unknown(index: LiveIvfIndex) -> None:
    index.upsert(np.arange(50), _data(50))
    removed = index.delete(np.array([3, 3, 99, 10, -5]))
    assert removed.tolist() == [3, 10]
    assert index.ntotal == 48
    assert index.contains([3, 10, 11, 99]).tolist() == [False, False, True, False]
    assert index.delete(np.array([3])).size == 0
    with pytest.raises(IndexStateError, match="not in the index"):
        index.vectors([3])
    _, ids = index.search(_data(20, seed=9), 48, nprobe=16)
    assert not np.isin(ids, [3, 10]).any()


def test_search_equals_fresh_index_after_updates(metric: str) -> None:
    cfg = _cfg(metric)
    live = LiveIvfIndex.train(cfg, _data(2000, seed=1))
    fresh_ivf = faiss.clone_index(live.ivf)
    rng = np.random.default_rng(3)
    truth: dict[int, np.ndarray] = {}
    for step in range(6):
        ids = rng.integers(0, 800, size=300)
        x = _data(300, seed=100 + step)
        live.upsert(ids, x)
        truth.update(zip(ids.tolist(), x, strict=True))
        gone = rng.integers(0, 800, size=60)
        live.delete(gone)
        for i in gone.tolist():
            truth.pop(i, None)
    keys = np.array(sorted(truth), dtype="int64")
    fresh = LiveIvfIndex(cfg, fresh_ivf)
    fresh.upsert(keys, np.stack([truth[i] for i in keys.tolist()]))
    assert np.array_equal(live.ids(), keys) and live.ntotal == keys.size
    xq = _data(50, seed=11)
    s_live, i_live = live.search(xq, 10)
    s_fresh, i_fresh = fresh.search(xq, 10)
    assert np.array_equal(i_live, i_fresh)
    np.testing.assert_allclose(s_live, s_fresh, rtol=1e-5, atol=1e-5)
    s_exact, i_exact = knn_exact(fresh.vectors(keys), keys, fresh.prepare(xq), 10, metric)
    s_all, i_all = live.search(xq, 10, nprobe=16)
    assert np.array_equal(i_all, i_exact)
    np.testing.assert_allclose(s_all, s_exact, rtol=1e-4, atol=1e-4)
    _, i_ex = live.search_exact(xq, 10)
    assert np.array_equal(i_ex, i_exact)


def test_search_scores_higher_is_better_and_missing_slots(metric: str) -> None:
    index = LiveIvfIndex.train(_cfg(metric), _data(2000, seed=1))
    x = _data(3)
    index.upsert(np.array([1, 2, 3]), x)
    scores, ids = index.search(x[:1], 5, nprobe=16)
    assert ids[0, 0] == 1
    assert (ids[0, 3:] == -1).all() and np.isneginf(scores[0, 3:]).all()
    assert np.all(np.diff(scores[0, :3]) <= 0)
    if metric == "l2":
        assert scores[0, 0] == pytest.approx(0.0, abs=1e-4)
        expected = -((x[1] - x[0]) ** 2).sum()
        assert float(scores[0][ids[0] == 2][0]) == pytest.approx(expected, rel=1e-4)
    else:
        assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_search_does_not_change_index_nprobe(index: LiveIvfIndex) -> None:
    index.upsert(np.arange(100), _data(100))
    index.search(_data(2), 3, nprobe=16)
    assert index.ivf.nprobe == 1 and index.nprobe == 4


def test_wrong_dimension_and_untrained_raise_index_state_error() -> None:
    untrained = LiveIvfIndex(_cfg())
    with pytest.raises(IndexStateError, match="not trained"):
        untrained.upsert([1], _data(1))
    with pytest.raises(IndexStateError, match="not trained"):
        untrained.search(_data(1), 3)
    index = LiveIvfIndex.train(_cfg(), _data(2000))
    with pytest.raises(IndexStateError, match=r"shape \(n, 16\)"):
        index.upsert([1], np.ones((1, 8), dtype="float32"))
    with pytest.raises(IndexStateError, match="one vector per id"):
        index.upsert([1, 2], _data(1))
    with pytest.raises(IndexStateError, match="NaN"):
        index.upsert([1], np.full((1, D), np.nan, dtype="float32"))
    with pytest.raises(IndexStateError, match="dimension"):
        LiveIvfIndex(IndexConfig(dim=8), index.ivf)


def test_lists_probes_and_imbalance(index: LiveIvfIndex) -> None:
    x = _data(400)
    index.upsert(np.arange(400), x)
    probes = index.probe_lists(x[:5])
    assert probes.shape == (5, 4) and probes.dtype == np.int64
    assert np.array_equal(index.assign_lists(x[:5]), probes[:, 0])
    sizes = index.list_sizes()
    assert sizes.shape == (16,) and sizes.sum() == 400
    assigned = np.bincount(index.assign_lists(x), minlength=16)
    assert np.array_equal(assigned, sizes)
    assert index.imbalance() == pytest.approx(index.ivf.invlists.imbalance_factor())


def test_retrained_keeps_every_id_and_increments_version(index: LiveIvfIndex) -> None:
    x = _data(500)
    index.upsert(np.arange(1000, 1500), x)
    index.delete(np.arange(1000, 1010))
    new = index.retrained(_data(1000, seed=42) + 2.0)
    assert new.version == index.version + 1
    assert np.array_equal(new.ids(), index.ids())
    np.testing.assert_array_equal(new.vectors(new.ids()), index.vectors(index.ids()))
    assert new.ivf is not index.ivf and index.ntotal == 490


def test_compact_and_serialize_keep_search_results(index: LiveIvfIndex) -> None:
    index.upsert(np.arange(600), _data(600))
    index.delete(np.arange(0, 600, 2))
    xq = _data(20, seed=4)
    before = index.search(xq, 10)
    index.compact()
    after = index.search(xq, 10)
    assert np.array_equal(before[1], after[1])
    index.upsert([5000], _data(1, seed=8))
    assert index.delete([5000]).tolist() == [5000]
    blob, store = index.serialize()
    copy = LiveIvfIndex.deserialize(index.cfg, blob, store, version=3)
    assert copy.version == 3 and np.array_equal(copy.ids(), index.ids())
    assert np.array_equal(copy.search(xq, 10)[1], before[1])
    assert copy.delete([1]).tolist() == [1]
    assert index.memory_bytes() > 300 * (4 * D + 8)


def test_journal_replay_reproduces_updates(index: LiveIvfIndex) -> None:
    index.upsert(np.arange(100), _data(100))
    keys, vectors = index.export()
    index.begin_journal()
    index.upsert(np.array([1, 500, 1]), _data(3, seed=2))
    index.delete([2, 3, 999])
    ops = index.end_journal()
    other = LiveIvfIndex.rebuild(index.cfg, _data(2000, seed=5), keys, vectors, version=1)
    other.replay(ops)
    assert np.array_equal(other.ids(), index.ids())
    np.testing.assert_array_equal(other.vectors(other.ids()), index.vectors(index.ids()))


def test_ivfpq_option_keeps_exact_vectors() -> None:
    cfg = _cfg("l2", "ivfpq")
    index = LiveIvfIndex.train(cfg, _data(2000, seed=1))
    assert isinstance(index.ivf, faiss.IndexIVFPQ)
    x = _data(300)
    index.upsert(np.arange(300), x)
    index.upsert([5], _data(1, seed=3))
    assert index.delete([6, 7000]).tolist() == [6]
    np.testing.assert_array_equal(index.vectors([0, 5]), np.r_[x[:1], _data(1, seed=3)])
    _, ids = index.search(x[:20], 5, nprobe=16)
    assert (ids[:, 0] == np.arange(20)).mean() > 0.5
    _, exact = index.search_exact(x[:20], 1)
    keep = np.r_[0:5, 7:20]
    assert np.array_equal(exact[keep, 0], keep)
    new = index.retrained(_data(2000, seed=9))
    assert np.array_equal(new.ids(), index.ids()) and new.version == 1
    blob, store = new.serialize()
    assert store is not None
    copy = LiveIvfIndex.deserialize(cfg, blob, store)
    np.testing.assert_array_equal(copy.vectors([0]), x[:1])
    with pytest.raises(IndexStateError, match="vector store"):
        LiveIvfIndex(cfg, faiss.deserialize_index(blob))
