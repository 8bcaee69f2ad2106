"""The embedded neighbour store: one SQLite file in WAL mode, same semantics as Aerospike.

Rows hold the same bins as the Aerospike record (schemas/neighbour_record.md) as columns.
The stale-write guard is the upsert's `WHERE excluded.version > version` clause, so it holds
for any writer of the file, not only this process. Expired rows are invisible and are
overwritten by any version, as an expired Aerospike record is gone.

One attempt per call: a lock held past `timeout_ms`, an I/O error, a full disk (codes.py)
raise StoreUnavailableError and roll the transaction back; a corrupt file raises StoreError;
a row the database refuses (a constraint) is `permanent` and the other rows are written.
Readers open the file with `create=False`: read-only, and an error naming the absolute path
when it does not exist, so a mistyped URL never creates an empty store.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from annstream.config import StoreConfig
from annstream.errors import StoreError, StoreUnavailableError
from annstream.store.base import TtlArg, as_query_ids, check_ttl, row_ttls
from annstream.store.codes import sqlite_is_retryable
from annstream.store.record import (
    BIN_ADVERTISERS,
    BIN_AT,
    BIN_CAMPAIGNS,
    BIN_FORMAT,
    BIN_IDS,
    BIN_K,
    BIN_SCORES,
    BIN_VERSION,
    CORE_BINS,
    LookupResult,
    NeighbourLists,
    StoredList,
    UpsertResult,
    absent_list,
    lookup_result,
    lookup_result_of,
    pack_records,
    stored_list,
)

__all__ = ["SqliteStore"]

logger = logging.getLogger(__name__)

TABLE = "neighbour_lists"
_CHUNK = 512  # host parameters per IN (...) list, well under SQLite's limit

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    query_id INTEGER PRIMARY KEY,
    fmt INTEGER NOT NULL,
    version INTEGER NOT NULL,
    computed_at_ms INTEGER NOT NULL,
    k INTEGER NOT NULL,
    ids BLOB NOT NULL,
    scores BLOB NOT NULL,
    campaign_ids BLOB,
    advertiser_ids BLOB,
    expires_at_ms INTEGER
)
"""

_ROWS_PER_UPSERT = 1_024  # 10 parameters a row, well under SQLite's 32,766
_WRITE_COLUMNS = (
    "query_id, fmt, version, computed_at_ms, k, ids, scores, campaign_ids, advertiser_ids, "
    "expires_at_ms"
)


@functools.lru_cache(maxsize=32)
def _upsert_sql(rows: int, keep_ttl: bool) -> str:
    """A multi-row upsert that returns the query id of every row it wrote: a row whose stored
    version is newer (and not expired) is left alone and not returned (stale). The last
    parameter is now in ms. `keep_ttl` (store TTL -2): an overwritten row keeps its expiry."""
    now = f"?{rows * 10 + 1}"
    expired = f"(t.expires_at_ms IS NOT NULL AND t.expires_at_ms <= {now})"
    expiry = (
        f"CASE WHEN NOT {expired} THEN t.expires_at_ms ELSE excluded.expires_at_ms END"
        if keep_ttl
        else "excluded.expires_at_ms"
    )
    values = ",".join(["(?,?,?,?,?,?,?,?,?,?)"] * rows)
    return f"""
INSERT INTO {TABLE} AS t ({_WRITE_COLUMNS}) VALUES {values}
ON CONFLICT (query_id) DO UPDATE SET
    fmt = excluded.fmt, version = excluded.version, computed_at_ms = excluded.computed_at_ms,
    k = excluded.k, ids = excluded.ids, scores = excluded.scores,
    campaign_ids = excluded.campaign_ids, advertiser_ids = excluded.advertiser_ids,
    expires_at_ms = {expiry}
WHERE excluded.version > t.version OR {expired}
RETURNING query_id
"""


_LIVE = "(expires_at_ms IS NULL OR expires_at_ms > ?)"
# Columns in the order of the bins (record.CORE_BINS, then campaign / advertiser ids): the
# campaign and advertiser ids are read only when the caller filters by them.
_COLUMNS = {
    False: "fmt, version, computed_at_ms, k, ids, scores",
    True: "fmt, version, computed_at_ms, k, ids, scores, campaign_ids, advertiser_ids",
}
_ALL_BINS = (*CORE_BINS, BIN_CAMPAIGNS, BIN_ADVERTISERS)
_LOOKUP_ONE = {
    metadata: f"SELECT {columns} FROM {TABLE} WHERE query_id = ? AND {_LIVE}"
    for metadata, columns in _COLUMNS.items()
}
# What one row can cause (a constraint, a value out of range): that row is refused for good.
# Any other error is the whole file's: it fails the call (see codes.py).
_ROW_ERRORS = (sqlite3.IntegrityError, sqlite3.DataError)


# Every SQL text a connection runs stays prepared in its statement cache (128 statements), and a
# 1,024-row upsert is about 1 MB prepared: statements sized by each call's count filled that
# cache with a new size per micro-batch (+140 MB over the first 128 writes). So statements come
# in powers of two only: at most 11 upsert sizes and 10 IN (...) sizes per connection.


def _pieces(n: int, most: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive pieces of `n` rows: `most` rows each, then the powers of
    two of what is left (1,000 = 512 + 256 + 128 + 64 + 32 + 8)."""
    start = 0
    while n - start >= most:
        yield start, start + most
        start += most
    size = most
    while start < n:
        size //= 2
        if n - start >= size:
            yield start, start + size
            start += size


def _chunks(values: Sequence[int]) -> Iterator[Sequence[int]]:
    """Up to `_CHUNK` keys for one IN (...) list, padded with its last key to a power of two
    (a repeated key changes nothing an IN list selects)."""
    for start in range(0, len(values), _CHUNK):
        chunk = list(values[start : start + _CHUNK])
        width = 1 << (len(chunk) - 1).bit_length()
        yield chunk + chunk[-1:] * (width - len(chunk))


def _marks(n: int) -> str:
    return ",".join("?" * n)


class _ThreadConnection:
    """A thread's read connection, closed when the thread ends (its thread-local goes)."""

    __slots__ = ("__weakref__", "db")

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __del__(self) -> None:
        self.db.close()


class SqliteStore:
    """Neighbour lists in one SQLite table; safe to share between threads of one process.

    Writes go through one connection under a lock; lookups, from any thread, use a read-only
    connection of that thread (opened on first use, closed with the thread or the store), so
    they never wait for a write in progress (WAL: they read the last commit), e.g. the
    service's recall sample while its writer thread stores a micro-batch, and serving threads
    read in parallel (sqlite3 releases the GIL while it reads). An in-memory database has one
    connection for everything.

    `create=False` (readers: `annstream lookup`, the serving reader) opens an existing file
    read-only and never creates one.
    """

    def __init__(
        self,
        path: str | Path,
        cfg: StoreConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        create: bool = True,
    ) -> None:
        self.cfg = cfg or StoreConfig()
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self.clock = clock
        self.readonly = not create
        self._lock = threading.Lock()
        memory = str(self.path) == ":memory:"
        self._shared_reads = memory  # another connection would see another database
        self._local = threading.local()
        self._readers: weakref.WeakSet[_ThreadConnection] = weakref.WeakSet()
        self._readers_lock = threading.Lock()
        self._closed = False
        if self.readonly and not memory and not self.path.is_file():
            raise StoreError(
                f"SQLite store {self.path.resolve()} does not exist (store URL {self.url}): "
                "sqlite:///relative/path is relative to the working directory, "
                "sqlite:////absolute/path has four slashes; `annstream run` creates the store"
            )
        try:
            if create and not memory:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            target = f"file:{self.path.resolve()}?mode=ro" if self.readonly else str(self.path)
            self._db = sqlite3.connect(
                target,
                timeout=self.cfg.timeout_ms / 1000,
                isolation_level=None,
                check_same_thread=False,
                uri=self.readonly,
            )
            if self.readonly:
                self._check_table()
            else:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute(_SCHEMA)
        except sqlite3.Error as exc:
            raise self._error(f"cannot open SQLite store {self.path.resolve()}", exc) from exc
        except OSError as exc:
            raise StoreError(f"cannot open SQLite store {self.path.resolve()}: {exc}") from exc

    def _check_table(self) -> None:
        row = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)
        ).fetchone()
        if row is None:
            raise StoreError(
                f"SQLite file {self.path.resolve()} is not an annstream store "
                f"(no table {TABLE}): check the store URL"
            )

    def _error(self, what: str, exc: sqlite3.Error) -> StoreError:
        """StoreUnavailableError for what may pass (locked, I/O, full), StoreError otherwise."""
        message = f"{what}: {exc} ({getattr(exc, 'sqlite_errorname', type(exc).__name__)})"
        if sqlite_is_retryable(exc):
            return StoreUnavailableError(message, retry_after=max(self.cfg.retry_backoff_s, 0.1))
        return StoreError(message)

    def _writable(self, what: str) -> None:
        if self.readonly:
            raise StoreError(f"SQLite store {self.path} was opened read-only: cannot {what}")

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    @contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE waits up to timeout_ms for the lock).

        Every sqlite3 error inside, COMMIT included, rolls back and becomes a StoreError.
        """
        self._writable(what)
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._error(f"SQLite store {self.path}: {what}: BEGIN", exc) from exc
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException as exc:
            if self._db.in_transaction:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error as rollback_exc:
                    logger.warning("SQLite store %s: ROLLBACK failed: %s", self.path, rollback_exc)
            if isinstance(exc, sqlite3.Error):
                raise self._error(f"SQLite store {self.path}: {what}", exc) from exc
            raise

    def upsert(self, lists: NeighbourLists, ttl_s: TtlArg = None) -> UpsertResult:
        """One transaction of multi-row upserts; each says which rows it wrote (RETURNING), so
        no version is read back. Duplicate query ids in one call are written row by row, in
        order; a statement with a row the database refuses is redone row by row."""
        n = len(lists)
        ttls = row_ttls(ttl_s, self.cfg.ttl_s, n, "upsert")
        stored, stale, failed, permanent = (np.zeros(n, dtype=bool) for _ in range(4))
        errors: dict[int, str] = {}
        if n == 0:
            return UpsertResult(stored, stale, failed, errors, permanent)
        now = self._now_ms()
        expires = np.where(ttls > 0, now + ttls * 1000, -1).tolist()
        rows: list[tuple[Any, ...]] = [
            (
                b["qid"],
                b[BIN_FORMAT],
                b[BIN_VERSION],
                b[BIN_AT],
                b[BIN_K],
                b[BIN_IDS],
                b[BIN_SCORES],
                b.get(BIN_CAMPAIGNS),
                b.get(BIN_ADVERTISERS),
                None if exp < 0 else exp,
            )
            for b, exp in zip(pack_records(lists), expires, strict=True)
        ]
        most = _ROWS_PER_UPSERT if len(np.unique(lists.query_ids)) == n else 1
        keep = ttls == -2
        with self._lock, self._transaction("upsert") as db:
            for flag in (False, True):
                group = np.flatnonzero(keep == flag).tolist()
                for start, stop in _pieces(len(group), most):
                    self._write(db, rows, group[start:stop], flag, now, stored, permanent, errors)
        stale[:] = ~(stored | permanent)
        return UpsertResult(stored, stale, failed, errors, permanent)

    @staticmethod
    def _write(
        db: sqlite3.Connection,
        rows: list[tuple[Any, ...]],
        chunk: list[int],
        keep_ttl: bool,
        now: int,
        stored: npt.NDArray[np.bool_],
        permanent: npt.NDArray[np.bool_],
        errors: dict[int, str],
    ) -> None:
        """One upsert statement of `chunk` (distinct query ids); marks the rows it wrote."""
        params = [v for r in chunk for v in rows[r]]
        params.append(now)
        try:
            written = {q for (q,) in db.execute(_upsert_sql(len(chunk), keep_ttl), params)}
        except _ROW_ERRORS as exc:
            if len(chunk) == 1:
                permanent[chunk[0]] = True
                errors[chunk[0]] = f"sqlite (permanent): {exc}"
                return
            logger.warning("SQLite batch upsert refused a row (%s); writing row by row", exc)
            for r in chunk:
                SqliteStore._write(db, rows, [r], keep_ttl, now, stored, permanent, errors)
            return
        for r in chunk:
            if rows[r][0] in written:
                stored[r] = True

    def _reader(self) -> sqlite3.Connection:
        """This thread's own read-only connection, opened on first use."""
        own: _ThreadConnection | None = getattr(self._local, "own", None)
        if own is not None:
            return own.db
        try:
            db = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro",
                timeout=self.cfg.timeout_ms / 1000,
                isolation_level=None,
                check_same_thread=False,
                uri=True,
            )
        except sqlite3.Error as exc:
            raise self._error(f"cannot open SQLite store {self.path.resolve()}", exc) from exc
        own = _ThreadConnection(db)
        with self._readers_lock:  # not the writer's lock: a read never waits for a write
            if self._closed:
                db.close()
                raise StoreError(f"SQLite store {self.path} is closed")
            self._readers.add(own)
        self._local.own = own
        return db

    def _read(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """The rows of one query, through this thread's read connection (an in-memory
        database: the store's, under its lock)."""
        try:
            if self._shared_reads:
                with self._lock:
                    return self._db.execute(sql, params).fetchall()
            return self._reader().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise self._error(f"SQLite store {self.path}: lookup", exc) from exc

    def lookup_one(self, query_id: int, *, metadata: bool = True) -> StoredList:
        qid = int(query_id)
        names = _ALL_BINS if metadata else CORE_BINS
        rows = self._read(_LOOKUP_ONE[metadata], (qid, self._now_ms()))
        if not rows:
            return absent_list(qid)
        return stored_list(qid, dict(zip(names, rows[0], strict=True)), metadata=metadata)

    def lookup(self, query_ids: npt.ArrayLike, *, metadata: bool = True) -> LookupResult:
        qids = as_query_ids(query_ids)
        if qids.size == 1:
            return lookup_result_of(self.lookup_one(int(qids[0]), metadata=metadata))
        keys = qids.tolist()
        now = self._now_ms()
        names = _ALL_BINS if metadata else CORE_BINS
        columns = _COLUMNS[metadata]
        found: dict[int, dict[str, Any]] = {}
        for chunk in _chunks(keys):
            rows = self._read(
                f"SELECT query_id, {columns} FROM {TABLE} "
                f"WHERE query_id IN ({_marks(len(chunk))}) AND {_LIVE}",
                (*chunk, now),
            )
            found.update((row[0], dict(zip(names, row[1:], strict=True))) for row in rows)
        return lookup_result(qids, [found.get(q) for q in keys], metadata=metadata)

    def remove(self, query_ids: npt.ArrayLike) -> None:
        keys = as_query_ids(query_ids).tolist()
        with self._lock, self._transaction("remove") as db:
            for chunk in _chunks(keys):
                db.execute(f"DELETE FROM {TABLE} WHERE query_id IN ({_marks(len(chunk))})", chunk)

    def expire(self, query_ids: npt.ArrayLike, ttl_s: int) -> None:
        ttl = check_ttl(ttl_s, "expire")
        keys = as_query_ids(query_ids).tolist()
        now = self._now_ms()
        if ttl == -2:
            return
        expires_at = now + ttl * 1000 if ttl > 0 else None
        with self._lock, self._transaction("expire") as db:
            for chunk in _chunks(keys):
                db.execute(
                    f"UPDATE {TABLE} SET expires_at_ms = ? "
                    f"WHERE query_id IN ({_marks(len(chunk))}) AND {_LIVE}",
                    (expires_at, *chunk, now),
                )

    def purge_expired(self) -> int:
        """Delete expired rows (what nsup does on Aerospike); returns how many."""
        with self._lock, self._transaction("purge expired rows") as db:
            cur = db.execute(
                f"DELETE FROM {TABLE} WHERE expires_at_ms IS NOT NULL AND expires_at_ms <= ?",
                (self._now_ms(),),
            )
            return int(cur.rowcount)

    def close(self) -> None:
        with self._lock, self._readers_lock:
            self._closed = True
            self._db.close()
            for own in list(self._readers):
                own.db.close()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
