"""LiveIvfIndex: the sole owner of the live Faiss IVF index of ads.

Not thread-safe by design: one thread applies the updates of a micro-batch (one remove call and
one add call), then searches, then the next micro-batch (Faiss crashes when a search overlaps an
add or remove). Ids are removed in O(1) through a Hashtable direct map; a hash set beside it
(`IdMap`) answers presence checks in O(batch) per micro-batch.

Two ways in: `upsert`/`delete` take anything (duplicates, raw vectors, unknown ids) and sort it
out; `apply` takes a micro-batch already netted and prepared (`AdChanges` + `prepare` +
`assign_lists`), as the refresher does, and trusts it.

Exact vectors: under IVFFlat the inverted lists hold the prepared vectors themselves, so
`vectors()`, `retrained()` and exact search read them back through the direct map at no extra
memory. IVFPQ codes are lossy, so an IVFPQ index keeps a side store: a one-list IVFFlat with its
own Hashtable direct map (4d + 8 bytes per ad plus the map), updated in the same calls.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import faiss
import numpy as np
import numpy.typing as npt
from faiss.contrib.ivf_tools import add_preassigned

from annstream.ann import (
    KINDS,
    METRICS,
    build_ivf,
    faiss_metric,
    normalize,
    train_ivf,
)
from annstream.config import IndexConfig
from annstream.errors import IndexStateError
from annstream.heap import trim_heap
from annstream.idmap import IdMap

__all__ = ["LiveIvfIndex"]

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

Op = tuple[Literal["upsert"], I64, F32] | tuple[Literal["delete"], I64, None]

_CHUNK = 65_536
_HASHTABLE = int(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
# An unordered_map node (next pointer + key + value, rounded by malloc) plus its bucket slot.
_HASHTABLE_BYTES_PER_ID = 40


def _as_prepared(vectors: npt.ArrayLike, dim: int) -> F32:
    x = np.ascontiguousarray(vectors, dtype="float32")
    if x.ndim != 2 or x.shape[1] != dim:
        raise IndexStateError(f"vectors must have shape (n, {dim}), got {x.shape}")
    return x


def _as_ids(ids: npt.ArrayLike) -> I64:
    a = np.ascontiguousarray(ids, dtype="int64")
    if a.ndim != 1:
        raise IndexStateError(f"ids must be a 1-D array of int64, got shape {a.shape}")
    return a


def _selector(ids: I64) -> faiss.IDSelectorArray:
    # Hashtable removal accepts only IDSelectorArray: a plain array silently removes nothing.
    return faiss.IDSelectorArray(ids.size, faiss.swig_ptr(ids))


def _empty_store(dim: int, metric: str) -> faiss.IndexIVFFlat:
    """A one-list IVFFlat holding exact vectors by id (the side store of IVFPQ)."""
    fm = faiss_metric(metric)
    quantizer = (
        faiss.IndexFlatIP(dim) if fm == faiss.METRIC_INNER_PRODUCT else faiss.IndexFlatL2(dim)
    )
    quantizer.add(np.zeros((1, dim), dtype="float32"))
    store = faiss.IndexIVFFlat(quantizer, dim, 1, fm)
    store.is_trained = True
    store.set_direct_map_type(_HASHTABLE)
    return store


def _invlists(ivf: faiss.IndexIVF) -> faiss.InvertedLists:
    if ivf.invlists is None:
        raise IndexStateError("the Faiss index has no inverted lists: rebuild it")
    return ivf.invlists


def _as_ivf(index: faiss.Index) -> faiss.IndexIVF:
    if not isinstance(index, faiss.IndexIVF):
        raise IndexStateError(
            f"expected a Faiss IVF index, got {type(index).__name__}: rebuild the index"
        )
    return index


def _id_set(ivf: faiss.IndexIVF) -> IdMap:
    """Every id of the index (a hash set)."""
    invlists = _invlists(ivf)
    out = IdMap(0, capacity=2 * int(ivf.ntotal))
    for list_no in range(int(ivf.nlist)):
        size = int(invlists.list_size(list_no))
        if size:
            out.put(faiss.rev_swig_ptr(invlists.get_ids(list_no), size).astype("int64"))
    out.compact()
    return out


def _kind_of(ivf: faiss.IndexIVF) -> str:
    if isinstance(ivf, faiss.IndexIVFPQ):
        return "ivfpq"
    if isinstance(ivf, faiss.IndexIVFFlat):
        return "ivfflat"
    raise IndexStateError(
        f"unsupported Faiss index {type(ivf).__name__}: use IndexIVFFlat or IndexIVFPQ"
    )


class LiveIvfIndex:
    """The live ad index: upsert/delete by id, search with higher-is-better scores."""

    def __init__(
        self,
        cfg: IndexConfig,
        ivf: faiss.IndexIVF | None = None,
        *,
        version: int = 0,
        store: faiss.IndexIVF | None = None,
    ) -> None:
        if cfg.metric not in METRICS:
            raise IndexStateError(
                f"index.metric={cfg.metric!r} is unknown: use one of {', '.join(METRICS)}"
            )
        if cfg.kind not in KINDS:
            raise IndexStateError(
                f"index.kind={cfg.kind!r} is unknown: use one of {', '.join(KINDS)}"
            )
        if ivf is None:
            ivf = build_ivf(cfg.dim, cfg.metric, cfg.kind, cfg.nlist, cfg.pq_m, cfg.pq_nbits)
        if int(ivf.d) != cfg.dim:
            raise IndexStateError(
                f"the Faiss index has dimension {ivf.d} but index.dim={cfg.dim}: "
                "fix the config or rebuild the index"
            )
        if int(ivf.metric_type) != faiss_metric(cfg.metric):
            raise IndexStateError(
                f"the Faiss index metric does not match index.metric={cfg.metric!r}: "
                "fix the config or rebuild the index"
            )
        kind = _kind_of(ivf)
        pq = getattr(ivf, "pq", None)
        self.cfg = dataclasses.replace(
            cfg,
            kind=kind,
            nlist=int(ivf.nlist),
            pq_m=int(pq.M) if pq is not None else cfg.pq_m,
            pq_nbits=int(pq.nbits) if pq is not None else cfg.pq_nbits,
        )
        if ivf.direct_map.type != _HASHTABLE:
            ivf.set_direct_map_type(_HASHTABLE)
        if kind == "ivfpq":
            if store is None:
                if ivf.ntotal:
                    raise IndexStateError(
                        "a non-empty IVFPQ index needs its exact vector store: "
                        "load both from the same snapshot"
                    )
                store = _empty_store(cfg.dim, cfg.metric)
            if int(store.ntotal) != int(ivf.ntotal):
                raise IndexStateError(
                    f"the IVFPQ vector store holds {store.ntotal} ads but the index "
                    f"{ivf.ntotal}: load both from the same snapshot"
                )
        else:
            store = None
        self._ivf = ivf
        self._store = store
        self._live = _id_set(ivf)
        self._centroids: F32 | None = None
        self._journal: list[Op] | None = None
        self.dim: int = cfg.dim
        self.metric: str = cfg.metric
        self.nprobe: int = cfg.nprobe
        self.version: int = version

    @classmethod
    def train(cls, cfg: IndexConfig, vectors: npt.ArrayLike) -> LiveIvfIndex:
        """A trained, empty index whose quantizer is learnt from `vectors` (raw ad vectors)."""
        out = cls(cfg)
        train_ivf(out._ivf, out.prepare(vectors))
        return out

    @classmethod
    def rebuild(
        cls,
        cfg: IndexConfig,
        sample: npt.ArrayLike,
        ids: npt.ArrayLike,
        vectors: npt.ArrayLike,
        *,
        version: int,
    ) -> LiveIvfIndex:
        """Train a new index on `sample` and add `ids`/`vectors`; touches no other index."""
        out = cls.train(cfg, sample)
        out.version = version
        out._add_new(_as_ids(ids), out.prepare(vectors))
        return out

    @property
    def ivf(self) -> faiss.IndexIVF:
        """The current Faiss index: read its quantizer or lists, never mutate it."""
        return self._ivf

    @property
    def is_trained(self) -> bool:
        return bool(self._ivf.is_trained)

    @property
    def ntotal(self) -> int:
        return int(self._ivf.ntotal)

    def prepare(self, vectors: npt.ArrayLike, *, checked: bool = False) -> F32:
        """Vectors as the index stores them: float32, C-contiguous, unit norm under cosine.

        `checked`: the vectors are known finite (an `AdChanges` checked them): not scanned again.
        """
        x = np.ascontiguousarray(vectors, dtype="float32")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise IndexStateError(
                f"vectors must have shape (n, {self.dim}), got {x.shape}: "
                "check index.dim in the config against the embedding model"
            )
        if not checked and not np.isfinite(x).all():
            bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
            raise IndexStateError(
                f"vectors at rows {bad[:10].tolist()} contain NaN or inf: drop those ads first"
            )
        if self.metric == "cosine":
            return normalize(x)
        return x

    def _require_trained(self) -> None:
        if not self._ivf.is_trained:
            raise IndexStateError(
                "the index is not trained: build it with LiveIvfIndex.train(cfg, vectors) "
                "or load a snapshot"
            )

    def _present(self, ids: I64) -> npt.NDArray[np.bool_]:
        return self._live.contains(ids)

    def _remove(self, ids: I64) -> None:
        """Remove ids known to be present (unique)."""
        self._ivf.remove_ids(_selector(ids))
        if self._store is not None:
            self._store.remove_ids(_selector(ids))
        self._live.remove(ids)

    def _add(self, ids: I64, x: F32, lists: I64) -> None:
        """Add new ids (unique, absent) with prepared vectors at their assigned lists."""
        for i0 in range(0, ids.size, _CHUNK):
            sl = slice(i0, i0 + _CHUNK)
            add_preassigned(self._ivf, x[sl], lists[sl], ids[sl])  # type: ignore[no-untyped-call]
            if self._store is not None:
                add_preassigned(  # type: ignore[no-untyped-call]
                    self._store, x[sl], np.zeros_like(lists[sl]), ids[sl]
                )
        self._live.put(ids)

    def _add_new(self, ids: I64, x: F32) -> None:
        self._add(ids, x, self.assign_lists(x, prepared=True))

    def apply(self, ids: I64, x: F32, lists: I64, delete_ids: I64) -> I64:
        """Apply one netted micro-batch; returns the ids that were live and left or changed.

        Trusted input, checked by the caller: `ids` unique, `x` their prepared vectors
        (`prepare`), `lists` their lists (`assign_lists` of `x`), `delete_ids` unique and
        disjoint from `ids` (unknown ids are ignored). One remove call, one add call.
        """
        self._require_trained()
        touched = np.concatenate([ids, delete_ids]) if len(delete_ids) else ids
        old = touched[self._present(touched)] if len(touched) else touched
        if len(old):
            self._remove(np.ascontiguousarray(old))
        if len(ids):
            self._add(ids, x, lists)
        if self._journal is not None:
            if len(delete_ids):
                self._journal.append(("delete", delete_ids.copy(), None))
            if len(ids):
                self._journal.append(("upsert", ids.copy(), x.copy()))
        return np.sort(old)

    def upsert(self, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Insert or replace ads; within the batch the last occurrence of an id wins."""
        self._require_trained()
        keys = _as_ids(ids)
        x = self.prepare(vectors)
        if x.shape[0] != keys.size:
            raise IndexStateError(
                f"upsert got {keys.size} ids but {x.shape[0]} vectors: pass one vector per id"
            )
        if keys.size == 0:
            return
        _, last = np.unique(keys[::-1], return_index=True)
        keep = np.sort(keys.size - 1 - last)
        if keep.size != keys.size:
            keys, x = keys[keep], np.ascontiguousarray(x[keep])
        self.apply(keys, x, self.assign_lists(x, prepared=True), keys[:0])

    def delete(self, ids: npt.ArrayLike) -> I64:
        """Remove ads by id; returns the ids actually removed (sorted); unknown ids are ignored."""
        keys = np.unique(_as_ids(ids))
        empty = keys[:0]
        return self.apply(empty, np.empty((0, self.dim), "float32"), empty, keys)

    def search(
        self,
        vectors: npt.ArrayLike,
        k: int,
        nprobe: int | None = None,
        *,
        prepared: bool = False,
    ) -> tuple[F32, I64]:
        """Top-k ads per query: (scores float32[n,k], ids int64[n,k]); missing: -inf and -1.

        `prepared`: the vectors already went through `prepare` (float32, C order, normalised
        under cosine): searched as they are, with the same results.
        """
        self._require_trained()
        x = _as_prepared(vectors, self.dim) if prepared else self.prepare(vectors)
        return self._search(self._ivf, x, k, nprobe or self.nprobe)

    def search_exact(self, vectors: npt.ArrayLike, k: int) -> tuple[F32, I64]:
        """Exact top-k over every live ad (all lists scanned; the exact store under IVFPQ)."""
        self._require_trained()
        target = self._store if self._store is not None else self._ivf
        return self._search(target, self.prepare(vectors), k, int(target.nlist))

    def _search(self, index: faiss.IndexIVF, x: F32, k: int, nprobe: int) -> tuple[F32, I64]:
        if k <= 0:
            raise IndexStateError(f"k must be positive, got {k}")
        if nprobe <= 0:
            raise IndexStateError(f"nprobe must be positive, got {nprobe}")
        params = faiss.SearchParametersIVF()
        params.nprobe = min(nprobe, int(index.nlist))
        dist, labels = index.search(x, k, params=params)
        scores = np.ascontiguousarray(dist, dtype="float32")
        if self.metric == "l2":
            np.negative(scores, out=scores)
        scores[labels < 0] = -np.inf
        return scores, np.ascontiguousarray(labels, dtype="int64")

    def contains(self, ids: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """bool[n]: which ids are live."""
        return self._present(_as_ids(ids))

    def vectors(self, ids: npt.ArrayLike) -> F32:
        """The stored (prepared) vectors of live ads, float32[n, d]."""
        keys = _as_ids(ids)
        missing = keys[~self._present(keys)]
        if missing.size:
            raise IndexStateError(
                f"{missing.size} ids are not in the index (first: {missing[:10].tolist()}): "
                "check contains() before asking for vectors"
            )
        source = self._store if self._store is not None else self._ivf
        out = np.empty((keys.size, self.dim), dtype="float32")
        for i0 in range(0, keys.size, _CHUNK):
            out[i0 : i0 + _CHUNK] = source.reconstruct_batch(keys[i0 : i0 + _CHUNK])
        return out

    def ids(self) -> I64:
        """All live ids, sorted."""
        return self._live.ids()

    def export(self) -> tuple[I64, F32]:
        """(ids, prepared vectors) of every live ad: a copy owned by the caller."""
        keys = self.ids()
        return keys, self.vectors(keys)

    def assign_lists(self, vectors: npt.ArrayLike, *, prepared: bool = False) -> I64:
        """int64[n]: the coarse list each vector is added to (vectors as passed to upsert).

        Under a flat quantizer, a brute-force top-1 over the centroids (`faiss.knn`: one
        matrix product, several times cheaper than a search of the quantizer index at
        micro-batch sizes); the index adds each ad where this says, so searches and routing
        agree by construction.
        """
        self._require_trained()
        x = _as_prepared(vectors, self.dim) if prepared else self.prepare(vectors)
        cent = self._centroid_table()
        if cent is None or x.shape[0] == 0:
            return self.probe_lists(x, 1, prepared=True)[:, 0].copy()
        _, lists = faiss.knn(x, cent, 1, faiss_metric(self.metric))
        return np.ascontiguousarray(lists[:, 0], dtype="int64")

    def _centroid_table(self) -> F32 | None:
        """The centroids of a flat quantizer (cached), or None for another quantizer."""
        if self._centroids is None:
            q = faiss.downcast_index(self._ivf.quantizer)
            if not isinstance(q, faiss.IndexFlat) or int(q.ntotal) != int(self._ivf.nlist):
                return None
            self._centroids = np.ascontiguousarray(q.reconstruct_n(0, int(q.ntotal)), "float32")
        return self._centroids

    def probe_lists(
        self, vectors: npt.ArrayLike, nprobe: int | None = None, *, prepared: bool = False
    ) -> I64:
        """int64[n, nprobe]: the lists a search of each vector scans (as passed to search)."""
        self._require_trained()
        p = min(nprobe or self.nprobe, int(self._ivf.nlist))
        if p <= 0:
            raise IndexStateError(f"nprobe must be positive, got {p}")
        x = _as_prepared(vectors, self.dim) if prepared else self.prepare(vectors)
        _, lists = self._ivf.quantizer.search(x, p)
        return np.ascontiguousarray(lists, dtype="int64")

    def list_sizes(self) -> I64:
        """int64[nlist]: ads per inverted list."""
        invlists = _invlists(self._ivf)
        return np.array([invlists.list_size(i) for i in range(int(self._ivf.nlist))], dtype="int64")

    def imbalance(self) -> float:
        """nlist * sum(size^2) / ntotal^2: 1.0 when lists are even, higher when skewed."""
        sizes = self.list_sizes().astype("float64")
        total = sizes.sum()
        if total == 0:
            return 1.0
        return float(sizes.size * (sizes * sizes).sum() / (total * total))

    def retrained(self, vectors_sample: npt.ArrayLike) -> LiveIvfIndex:
        """A new index trained on `vectors_sample` holding the same ads; version + 1."""
        keys, x = self.export()
        out = LiveIvfIndex.rebuild(self.cfg, vectors_sample, keys, x, version=self.version + 1)
        out.nprobe = self.nprobe
        return out

    def compact(self) -> None:
        """Return the memory kept by removed ads (Faiss keeps vector capacity) by a round trip."""
        self._ivf = _as_ivf(faiss.deserialize_index(faiss.serialize_index(self._ivf)))
        if self._store is not None:
            self._store = _as_ivf(faiss.deserialize_index(faiss.serialize_index(self._store)))
        self._live.compact()
        trim_heap()

    def serialize(self) -> tuple[U8, U8 | None]:
        """(index bytes, exact store bytes or None) for a snapshot."""
        index_bytes = faiss.serialize_index(self._ivf)
        store_bytes = None if self._store is None else faiss.serialize_index(self._store)
        return index_bytes, store_bytes

    @classmethod
    def deserialize(
        cls,
        cfg: IndexConfig,
        index_bytes: npt.ArrayLike,
        store_bytes: npt.ArrayLike | None = None,
        *,
        version: int = 0,
    ) -> LiveIvfIndex:
        """The inverse of `serialize()`."""
        ivf = _as_ivf(faiss.deserialize_index(np.asarray(index_bytes, dtype="uint8")))
        store = None
        if store_bytes is not None:
            store = _as_ivf(faiss.deserialize_index(np.asarray(store_bytes, dtype="uint8")))
        return cls(cfg, ivf, version=version, store=store)

    def memory_bytes(self) -> int:
        """Estimated bytes held: list codes and ids, direct map, quantizer, id set, store."""

        def one(ivf: faiss.IndexIVF) -> int:
            n = int(ivf.ntotal)
            per = int(ivf.code_size) + 8 + _HASHTABLE_BYTES_PER_ID
            return n * per + int(ivf.quantizer.ntotal) * int(ivf.d) * 4

        total = one(self._ivf) + self._live.nbytes
        if self._store is not None:
            total += one(self._store)
        return total

    def begin_journal(self) -> None:
        """Record every later upsert/delete so they can be replayed onto a rebuilt index."""
        self._journal = []

    def end_journal(self) -> list[Op]:
        """Stop recording; the updates recorded since `begin_journal()`, in order."""
        ops, self._journal = self._journal or [], None
        return ops

    def replay(self, ops: list[Op]) -> None:
        """Apply recorded updates in order (each op already deduplicated and prepared)."""
        for op in ops:
            if op[0] == "upsert":
                self.upsert(op[1], op[2])
            else:
                self.delete(op[1])
