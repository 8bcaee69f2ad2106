"""IdMap: int64 ad id -> a row of int64 values, an open-addressing hash table in numpy arrays.

The live index (id -> IVF list) and the ad metadata (id -> advertiser, campaign) look up,
insert and remove a whole micro-batch of ids at a time. A sorted id array made every change
O(catalogue) (`np.insert` reallocated the whole array per micro-batch); here a change costs
O(batch), lookups are O(1) per id, and the table grows to half full when it reaches 70% (amortised)
and shrinks when mostly empty. Linear probing over any capacity (the hash is scaled to it, so
`compact()` can size the table to 70% full: 8 + 8 * width bytes per slot); removed ids leave
tombstones, cleared when the table is rebuilt.
The loops are compiled with numba (`cache=True`: compiled once per machine, then loaded).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from annstream.jit import jit

__all__ = ["IdMap", "warm_up"]

I64 = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

_EMPTY = np.iinfo(np.int64).min
_TOMB = _EMPTY + 1
_MAX_LOAD = 0.7
_GROWN_LOAD = 0.5
_MIN_CAP = 64
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@jit
def _home(key: np.int64, cap: np.uint64) -> np.int64:
    """Fibonacci hashing (the top 32 bits of key * 2^64 / phi) scaled to [0, cap)."""
    h = (np.uint64(key) * _GOLDEN) >> np.uint64(32)
    return np.int64((h * cap) >> np.uint64(32))


@jit
def _slot_of(tab: I64, key: np.int64, ucap: np.uint64) -> np.int64:
    """The slot holding `key`, or -1."""
    cap = np.int64(len(tab))
    h = _home(key, ucap)
    while True:
        k = tab[h, 0]
        if k == key:
            return h
        if k == _EMPTY:
            return np.int64(-1)
        h = h + 1 if h + 1 < cap else np.int64(0)


@jit
def _lookup(tab: I64, ucap: np.uint64, query: I64, out: I64) -> BoolArray:
    """`out[i]` gets the values of `query[i]` where found."""
    found = np.zeros(len(query), dtype=np.bool_)
    w = tab.shape[1] - 1
    for i in range(len(query)):
        s = _slot_of(tab, query[i], ucap)
        if s >= 0:
            found[i] = True
            for c in range(w):
                out[i, c] = tab[s, c + 1]
    return found


@jit
def _put(tab: I64, ucap: np.uint64, new_keys: I64, new_vals: I64) -> I64:
    """Insert or overwrite; returns [new keys, tombstones reused]."""
    cap = np.int64(len(tab))
    w = tab.shape[1] - 1
    added = 0
    reused = 0
    for i in range(len(new_keys)):
        key = new_keys[i]
        h = _home(key, ucap)
        tomb = np.int64(-1)
        while True:
            k = tab[h, 0]
            if k == key:
                break
            if k == _EMPTY:
                if tomb >= 0:
                    h = tomb
                    reused += 1
                tab[h, 0] = key
                added += 1
                break
            if k == _TOMB and tomb < 0:
                tomb = h
            h = h + 1 if h + 1 < cap else np.int64(0)
        for c in range(w):
            tab[h, c + 1] = new_vals[i, c]
    out = np.empty(2, dtype=np.int64)
    out[0] = added
    out[1] = reused
    return out


@jit
def _remove(tab: I64, ucap: np.uint64, query: I64, out: I64) -> BoolArray:
    """Remove ids; `out[i]` gets the values `query[i]` had."""
    found = np.zeros(len(query), dtype=np.bool_)
    w = tab.shape[1] - 1
    for i in range(len(query)):
        s = _slot_of(tab, query[i], ucap)
        if s >= 0:
            found[i] = True
            for c in range(w):
                out[i, c] = tab[s, c + 1]
            tab[s, 0] = _TOMB
    return found


@jit
def _live_slots(tab: I64) -> I64:
    n = 0
    for s in range(len(tab)):
        k = tab[s, 0]
        if k != _EMPTY and k != _TOMB:
            n += 1
    out = np.empty(n, dtype=np.int64)
    j = 0
    for s in range(len(tab)):
        k = tab[s, 0]
        if k != _EMPTY and k != _TOMB:
            out[j] = s
            j += 1
    return out


class IdMap:
    """int64 ids (any value but the two lowest int64s) -> `width` int64 values each (0: a set).

    One row per slot (the id, then its values) so a lookup touches one cache line.
    """

    def __init__(self, width: int = 1, capacity: int = 0) -> None:
        if width < 0:
            raise ValueError(f"IdMap width must be >= 0, got {width}")
        self.width = width
        self._n = 0
        self._tombs = 0
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        cap = 0 if capacity <= 0 else max(_MIN_CAP, int(capacity))
        self._tab: I64 = np.zeros((cap, 1 + self.width), dtype=np.int64)
        self._tab[:, 0] = _EMPTY
        self._sh = np.uint64(cap)
        self._tombs = 0

    def __len__(self) -> int:
        return self._n

    @property
    def capacity(self) -> int:
        return len(self._tab)

    @property
    def nbytes(self) -> int:
        return int(self._tab.nbytes)

    @staticmethod
    def _ids(ids: npt.ArrayLike) -> I64:
        a = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if a.size and int(a.min()) <= _TOMB:
            raise ValueError(f"ids must be above {_TOMB} (the two lowest int64s are reserved)")
        return a

    def _rebuild(self, need: int, load: float = _GROWN_LOAD) -> None:
        """Rehash the live entries into a table `load` full with `need` of them."""
        rows = self._tab[_live_slots(self._tab)]
        self._alloc(int(need / load) + 1 if need else 0)
        _put(
            self._tab, self._sh, np.ascontiguousarray(rows[:, 0]), np.ascontiguousarray(rows[:, 1:])
        )

    def get(self, ids: npt.ArrayLike, default: int = -1) -> tuple[BoolArray, I64]:
        """(found, values[n, width]); `default` where not found."""
        q = self._ids(ids)
        out = np.full((len(q), self.width), default, dtype=np.int64)
        if self._n == 0:
            return np.zeros(len(q), dtype=bool), out
        return _lookup(self._tab, self._sh, q, out), out

    def contains(self, ids: npt.ArrayLike) -> BoolArray:
        q = self._ids(ids)
        if self._n == 0:
            return np.zeros(len(q), dtype=bool)
        return _lookup(self._tab, self._sh, q, np.empty((len(q), self.width), np.int64))

    def put(self, ids: npt.ArrayLike, values: npt.ArrayLike = 0) -> int:
        """Insert or overwrite `ids` (unique) with `values` ([n, width], [n] or a scalar); returns
        how many were new."""
        keys = self._ids(ids)
        v = np.asarray(values, dtype=np.int64)
        v = v[:, None] if v.ndim == 1 and self.width else v
        vals = np.ascontiguousarray(np.broadcast_to(v, (len(keys), self.width)))
        if not len(keys):
            return 0
        if self._n + self._tombs + len(keys) > _MAX_LOAD * self.capacity:
            self._rebuild(self._n + len(keys))
        added, reused = (int(v) for v in _put(self._tab, self._sh, keys, vals))
        self._n += added
        self._tombs -= reused
        return added

    def remove(self, ids: npt.ArrayLike) -> tuple[BoolArray, I64]:
        """Remove `ids` (unique); (found, the values they had [n, width])."""
        q = self._ids(ids)
        out = np.full((len(q), self.width), -1, dtype=np.int64)
        if self._n == 0:
            return np.zeros(len(q), dtype=bool), out
        found = _remove(self._tab, self._sh, q, out)
        gone = int(found.sum())
        self._n -= gone
        self._tombs += gone
        if self.capacity > _MIN_CAP and self._n < self.capacity * _MAX_LOAD / 4:
            self._rebuild(self._n)
        return found, out

    def ids(self) -> I64:
        """Every id held, sorted."""
        return np.sort(self._tab[_live_slots(self._tab), 0])

    def items(self) -> tuple[I64, I64]:
        """(ids sorted, values[n, width])."""
        rows = self._tab[_live_slots(self._tab)]
        rows = rows[np.argsort(rows[:, 0], kind="stable")]
        return np.ascontiguousarray(rows[:, 0]), np.ascontiguousarray(rows[:, 1:])

    def compact(self) -> None:
        """Rebuild at the most compact size (the load limit), dropping tombstones."""
        self._rebuild(self._n, _MAX_LOAD)


def warm_up() -> None:
    """Load (or compile, once per machine) every kernel, so the first micro-batch is not slow."""
    IdMap(0).put(np.arange(3))
    m = IdMap(2)
    m.put(np.arange(3), np.zeros((3, 2), np.int64))
    m.get(np.arange(4))
    m.contains(np.arange(2))
    m.remove(np.arange(2))
    m.items()
