"""Small numeric functions around Faiss IVF indexes: arrays in, arrays out, shapes checked first.

Scores follow one convention everywhere in annstream: higher is better. Under `cosine` and
`ip` a score is an inner product; under `l2` it is the negative squared L2 distance.
"""

from __future__ import annotations

import faiss
import numpy as np
import numpy.typing as npt

from annstream.errors import IndexStateError

__all__ = [
    "KINDS",
    "METRICS",
    "build_ivf",
    "faiss_metric",
    "knn_exact",
    "min_train_size",
    "normalize",
    "recall_at_k",
    "train_ivf",
]

METRICS = ("cosine", "ip", "l2")
KINDS = ("ivfflat", "ivfpq")

_UNIT_TOL = 1e-5
_BLOCK_SCORES = 1 << 24

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


def faiss_metric(metric: str) -> int:
    """The Faiss metric constant for an annstream metric name."""
    if metric in ("cosine", "ip"):
        return int(faiss.METRIC_INNER_PRODUCT)
    if metric == "l2":
        return int(faiss.METRIC_L2)
    raise IndexStateError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")


def _as_matrix(x: npt.ArrayLike, name: str, d: int | None = None) -> F32:
    a = np.ascontiguousarray(x, dtype="float32")
    if a.ndim != 2:
        raise IndexStateError(f"{name} must be a 2-D array (n, d), got shape {a.shape}")
    if d is not None and a.shape[1] != d:
        raise IndexStateError(
            f"{name} have dimension {a.shape[1]} but the index has {d}: "
            "check index.dim in the config against the embedding model"
        )
    return a


def normalize(x: npt.ArrayLike) -> F32:
    """Rows scaled to unit L2 norm (zero rows stay zero); rows already unit are left bit-exact."""
    a = _as_matrix(x, "vectors")
    norms = np.sqrt(np.einsum("ij,ij->i", a, a, dtype="float64"))
    scale = np.ones_like(norms)
    rescale = (np.abs(norms - 1.0) > _UNIT_TOL) & (norms > 0)
    scale[rescale] = norms[rescale]
    if not rescale.any():
        return a.copy()
    return np.ascontiguousarray(a / scale[:, None].astype("float32"), dtype="float32")


def build_ivf(
    dim: int,
    metric: str,
    kind: str = "ivfflat",
    nlist: int = 1024,
    pq_m: int = 10,
    pq_nbits: int = 8,
) -> faiss.IndexIVF:
    """An untrained IVF index (IVFFlat, or IVFPQ with `pq_m` sub-quantizers of `pq_nbits`)."""
    if dim <= 0:
        raise IndexStateError(f"index dimension must be positive, got {dim}")
    if nlist <= 0:
        raise IndexStateError(f"nlist must be positive, got {nlist}")
    fm = faiss_metric(metric)
    quantizer = (
        faiss.IndexFlatIP(dim) if fm == faiss.METRIC_INNER_PRODUCT else faiss.IndexFlatL2(dim)
    )
    if kind == "ivfflat":
        return faiss.IndexIVFFlat(quantizer, dim, nlist, fm)
    if kind == "ivfpq":
        if pq_m <= 0 or dim % pq_m != 0:
            raise IndexStateError(
                f"index.pq_m={pq_m} must be a positive divisor of index.dim={dim}"
            )
        return faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, pq_nbits, fm)
    raise IndexStateError(f"unknown index kind {kind!r}: use one of {', '.join(KINDS)}")


def min_train_size(index: faiss.IndexIVF) -> int:
    """Fewest training vectors Faiss accepts for this index."""
    n = int(index.nlist)
    pq = getattr(index, "pq", None)
    if pq is not None:
        n = max(n, 1 << int(pq.nbits))
    return n


def train_ivf(index: faiss.IndexIVF, vectors: npt.ArrayLike) -> None:
    """Train the coarse quantizer (and PQ codebooks) on `vectors`, already prepared."""
    x = _as_matrix(vectors, "training vectors", int(index.d))
    n = x.shape[0]
    need = min_train_size(index)
    if n < need:
        raise IndexStateError(
            f"{n} training vectors are too few for this index (need at least {need}): "
            "use more vectors or a smaller index.nlist"
        )
    index.train(x)


def knn_exact(
    xb: npt.ArrayLike, ids: npt.ArrayLike, xq: npt.ArrayLike, k: int, metric: str
) -> tuple[F32, I64]:
    """Brute-force top-k of `xq` over `xb` (labelled by `ids`), block by block of queries."""
    b = _as_matrix(xb, "database vectors")
    nb, d = b.shape
    q = _as_matrix(xq, "query vectors", d)
    nq = q.shape[0]
    labels = np.ascontiguousarray(ids, dtype="int64")
    if labels.shape != (nb,):
        raise IndexStateError(f"ids must have shape ({nb},), got {labels.shape}")
    if k <= 0:
        raise IndexStateError(f"k must be positive, got {k}")
    faiss_metric(metric)
    scores = np.full((nq, k), -np.inf, dtype="float32")
    out = np.full((nq, k), -1, dtype="int64")
    if nb == 0 or nq == 0:
        return scores, out
    kk = min(k, nb)
    bnorm = (b * b).sum(axis=1) if metric == "l2" else None
    step = max(1, _BLOCK_SCORES // nb)
    for i0 in range(0, nq, step):
        block = q[i0 : i0 + step]
        s = block @ b.T
        if bnorm is not None:
            s = 2.0 * s - bnorm[None, :] - (block * block).sum(axis=1)[:, None]
        if kk < nb:
            part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        else:
            part = np.broadcast_to(np.arange(nb), (s.shape[0], nb))
        top = np.take_along_axis(s, part, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        scores[i0 : i0 + step, :kk] = np.take_along_axis(top, order, axis=1)
        out[i0 : i0 + step, :kk] = labels[np.take_along_axis(part, order, axis=1)]
    return scores, out


def recall_at_k(found_ids: npt.ArrayLike, true_ids: npt.ArrayLike, k: int) -> float:
    """Mean fraction of each query's true top-k (ignoring -1) that appears in its found top-k."""
    found = np.asarray(found_ids, dtype="int64")
    true = np.asarray(true_ids, dtype="int64")
    if found.ndim != 2 or true.ndim != 2 or found.shape[0] != true.shape[0]:
        raise IndexStateError(
            f"found_ids {found.shape} and true_ids {true.shape} must be (n, k) with the same n"
        )
    if k <= 0:
        raise IndexStateError(f"k must be positive, got {k}")
    f = found[:, :k]
    t = true[:, :k]
    valid = t >= 0
    hit = (t[:, :, None] == f[:, None, :]).any(axis=2) & valid
    per_query = valid.sum(axis=1)
    rows = per_query > 0
    if not rows.any():
        return 1.0
    return float((hit.sum(axis=1)[rows] / per_query[rows]).mean())
