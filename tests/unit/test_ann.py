"""Differential tests of the numeric helpers against plain Faiss on seeded data."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from annstream.ann import build_ivf, knn_exact, normalize, recall_at_k, train_ivf
from annstream.errors import IndexStateError


def _data(n: int, d: int = 16, seed: int = 1338) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype("float32")


def test_normalize_unit_rows_zero_rows_and_idempotent() -> None:
    x = _data(50)
    x[3] = 0.0
    y = normalize(x)
    norms = np.linalg.norm(y, axis=1)
    assert y.dtype == np.float32 and y.flags.c_contiguous
    assert np.allclose(np.delete(norms, 3), 1.0, atol=1e-6)
    assert norms[3] == 0.0
    assert np.array_equal(normalize(y), y)


def test_normalize_rejects_non_matrix() -> None:
    with pytest.raises(IndexStateError, match="2-D"):
        normalize(np.ones(4, dtype="float32"))


@pytest.mark.parametrize(
    ("metric", "kind", "cls", "fm"),
    [
        ("cosine", "ivfflat", faiss.IndexIVFFlat, faiss.METRIC_INNER_PRODUCT),
        ("ip", "ivfflat", faiss.IndexIVFFlat, faiss.METRIC_INNER_PRODUCT),
        ("l2", "ivfpq", faiss.IndexIVFPQ, faiss.METRIC_L2),
    ],
)
def test_build_ivf_kind_and_metric(metric: str, kind: str, cls: type, fm: int) -> None:
    index = build_ivf(16, metric, kind, nlist=8, pq_m=4, pq_nbits=4)
    assert isinstance(index, cls)
    assert index.metric_type == fm
    assert not index.is_trained


def test_build_ivf_rejects_bad_settings() -> None:
    with pytest.raises(IndexStateError, match="kind"):
        build_ivf(16, "cosine", "hnsw", nlist=8)
    with pytest.raises(IndexStateError, match="metric"):
        build_ivf(16, "hamming", "ivfflat", nlist=8)
    with pytest.raises(IndexStateError, match="pq_m"):
        build_ivf(16, "l2", "ivfpq", nlist=8, pq_m=5)


def test_train_ivf_checks_size_and_dimension() -> None:
    index = build_ivf(16, "l2", "ivfflat", nlist=32)
    with pytest.raises(IndexStateError, match="too few"):
        train_ivf(index, _data(10))
    with pytest.raises(IndexStateError, match="dimension"):
        train_ivf(index, _data(100, d=8))
    train_ivf(index, _data(2000))
    assert index.is_trained


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_knn_exact_matches_faiss_flat(metric: str) -> None:
    xb, xq = _data(3000), _data(40, seed=7)
    ids = np.arange(3000, dtype="int64") * 5 + 1
    flat = faiss.IndexFlatIP(16) if metric == "ip" else faiss.IndexFlatL2(16)
    flat.add(xb)
    dist, ref = flat.search(xq, 10)
    scores, found = knn_exact(xb, ids, xq, 10, metric)
    assert np.array_equal(found, ids[ref])
    expected = dist if metric == "ip" else -dist
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-3)


def test_knn_exact_pads_missing_slots() -> None:
    scores, found = knn_exact(_data(3), np.arange(3), _data(2, seed=2), 5, "ip")
    assert (found[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert (found[:, :3] >= 0).all()


def test_recall_at_k() -> None:
    true = np.array([[1, 2, 3, 4], [5, 6, -1, -1]])
    assert recall_at_k(true, true, 4) == 1.0
    found = np.array([[1, 9, 3, 8], [6, 7, 8, 9]])
    assert recall_at_k(found, true, 4) == pytest.approx((0.5 + 0.5) / 2)
    assert recall_at_k(found[:, :2], true[:, :2], 2) == pytest.approx((0.5 + 0.5) / 2)
    with pytest.raises(IndexStateError):
        recall_at_k(found, true[:1], 4)
