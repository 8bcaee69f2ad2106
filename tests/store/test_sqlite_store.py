"""SQLite-only behaviour: database errors become store errors, readers never create a file."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from annstream.cli import main
from annstream.config import StoreConfig
from annstream.errors import StoreError, StoreUnavailableError
from annstream.serving import NeighbourReader
from annstream.store import NeighbourLists, open_store
from annstream.store import sqlite as sqlite_store
from annstream.store.sqlite import SqliteStore

Factory = Callable[..., NeighbourLists]


class FailingConnection:
    """The store's connection, except that one statement fails like a broken disk would."""

    def __init__(self, db: sqlite3.Connection, statement: str, error: sqlite3.Error) -> None:
        self._db, self._statement, self._error = db, statement, error

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.strip().upper() == self._statement:
            raise self._error
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


@pytest.mark.parametrize(
    "error", [sqlite3.OperationalError("disk I/O error"), sqlite3.OperationalError("locked")]
)
def test_sqlite_commit_failure_is_unavailable_and_rolled_back(
    tmp_path: Path, lists_factory: Factory, error: sqlite3.Error
) -> None:
    store = SqliteStore(tmp_path / "s.db")
    healthy = store._db
    store._db = FailingConnection(healthy, "COMMIT", error)  # type: ignore[assignment]
    lists = lists_factory([1, 2], version=3)
    with pytest.raises(StoreUnavailableError, match=re.escape(str(error))):
        store.upsert(lists)
    with pytest.raises(StoreUnavailableError):
        store.expire(np.array([1]), ttl_s=60)
    with pytest.raises(StoreUnavailableError):
        store.remove(np.array([1]))
    assert not healthy.in_transaction
    store._db = healthy
    assert not store.lookup(lists.query_ids).found.any()  # nothing half-written
    assert store.upsert(lists).stored.all()  # and the store works once the disk does
    store.close()


def test_sqlite_corrupt_file_mid_run_is_a_store_error_not_a_refused_row(
    tmp_path: Path, lists_factory: Factory
) -> None:
    store = SqliteStore(tmp_path / "s.db")
    healthy = store._db

    class Corrupt(FailingConnection):
        def execute(self, sql: str, *args: Any) -> Any:
            if sql.lstrip().startswith("INSERT"):
                raise sqlite3.DatabaseError("database disk image is malformed")
            return super().execute(sql, *args)

    store._db = Corrupt(healthy, "", sqlite3.DatabaseError())  # type: ignore[assignment]
    with pytest.raises(StoreError, match="malformed") as info:
        store.upsert(lists_factory([1, 2], version=1))
    assert not isinstance(info.value, StoreUnavailableError)
    assert not healthy.in_transaction
    store._db = healthy
    store.close()


def test_sqlite_locked_database_is_unavailable(tmp_path: Path, lists_factory: Factory) -> None:
    path = tmp_path / "s.db"
    store = SqliteStore(path, StoreConfig(timeout_ms=100))
    store.upsert(lists_factory([1], version=1))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another writer holds the lock past timeout_ms
    try:
        with pytest.raises(StoreUnavailableError, match="database is locked"):
            store.upsert(lists_factory([2], version=1))
        with pytest.raises(StoreUnavailableError, match="database is locked"):
            store.remove(np.array([1]))
        assert store.lookup(np.array([1])).found.all()  # WAL: readers go on
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.upsert(lists_factory([2], version=1)).stored.all()
    store.close()


def test_sqlite_lookup_error_is_unavailable(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    store.lookup(np.array([1]))  # opens this thread's read connection
    own = store._local.own
    healthy = own.db

    class Broken(FailingConnection):
        def execute(self, sql: str, *args: Any) -> Any:
            raise sqlite3.OperationalError("disk I/O error")

    own.db = Broken(healthy, "", sqlite3.OperationalError())
    with pytest.raises(StoreUnavailableError, match="disk I/O error"):
        store.lookup(np.array([1]))
    own.db = healthy
    store.close()


def test_sqlite_lookup_does_not_wait_for_a_write_in_progress(
    tmp_path: Path, lists_factory: Factory
) -> None:
    """The service's own thread reads (recall sample, verifier) while its writer thread holds
    the store's write lock: the read goes through the thread's read connection."""
    store = SqliteStore(tmp_path / "s.db")
    store.upsert(lists_factory([1, 2], version=1))
    with store._lock:  # a write in progress on another thread
        got = store.lookup(np.array([1, 2]))
        one = store.lookup_one(1)
    assert got.found.all() and one.found
    store.close()


def test_sqlite_store_over_a_file_that_is_not_a_database_is_a_store_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database" * 100)
    for create in (True, False):
        with pytest.raises(StoreError, match=r"garbage\.db") as info:
            SqliteStore(path, create=create)
        assert not isinstance(info.value, StoreUnavailableError)


# ---- readers never create a database --------------------------------------------------


def test_reader_open_of_a_missing_file_names_the_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError, match=re.escape(str(tmp_path / "var" / "nothing.db"))) as info:
        open_store("sqlite:///var/nothing.db", create=False)
    assert "sqlite:////absolute/path" in str(info.value)
    assert not (tmp_path / "var").exists()


def test_reader_reads_an_existing_store_and_cannot_write(
    tmp_path: Path, lists_factory: Factory
) -> None:
    path = tmp_path / "s.db"
    writer = SqliteStore(path)
    lists = lists_factory([1, 2], version=1)
    writer.upsert(lists)
    reader = open_store(f"sqlite:///{path}", create=False)
    np.testing.assert_array_equal(reader.lookup(np.array([1, 2])).ids, lists.ids)
    assert writer.upsert(lists_factory([1], version=2, seed=5)).stored.all()
    assert reader.lookup(np.array([1])).versions.tolist() == [2]  # sees the writer's commits
    with pytest.raises(StoreError, match="read-only"):
        reader.upsert(lists)
    reader.close()
    writer.close()


def test_serving_reader_never_creates_a_database(tmp_path: Path, lists_factory: Factory) -> None:
    path = tmp_path / "serving" / "s.db"
    with pytest.raises(StoreError, match="does not exist"):
        NeighbourReader.open(f"sqlite:///{path}")
    assert not path.parent.exists()
    writer = SqliteStore(path)
    writer.upsert(lists_factory([1], version=1))
    reader = NeighbourReader.open(f"sqlite:///{path}", k=2)
    assert reader.lookup(np.array([1])).counts.tolist() == [2]
    reader.close()
    writer.close()


def test_reader_refuses_a_database_that_is_not_a_store(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="not an annstream store"):
        open_store(f"sqlite:///{path}", create=False)


def test_cli_lookup_of_a_missing_store_fails_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["lookup", "1", "--store", "sqlite:///data/neighbours.db"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "data" / "neighbours.db") in err and "does not exist" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_lookup_help_explains_relative_and_absolute_sqlite_urls(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["lookup", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "sqlite:////absolute/path.db (four slashes)" in out
    assert "sqlite:///relative/path.db" in out


def test_sqlite_upsert_outcomes_across_statements_duplicates_and_kept_ttls(
    tmp_path: Path, lists_factory: Factory
) -> None:
    """What each row's upsert statement returned decides stored / stale, with no read back:
    1,500 rows span two statements, a duplicate query id is written in order, TTL -2 keeps
    the stored expiry in the same call as rows that set one."""
    clock = [1_000.0]
    store = SqliteStore(tmp_path / "s.db", StoreConfig(ttl_s=60), clock=lambda: clock[0])
    qids = np.arange(1_500)
    assert store.upsert(lists_factory(qids, version=5)).stored.all()
    newer = np.isin(qids, np.arange(0, 1_500, 3))
    mixed = lists_factory(qids, version=5, seed=1)
    mixed.versions[newer] = 6
    result = store.upsert(mixed)
    assert result.stored.tolist() == newer.tolist() and (result.stale == ~newer).all()
    dup = lists_factory([7, 7, 8, 9], version=8, seed=2)
    dup.versions[:] = [8, 9, 8, 8]
    ttl = np.array([60, 60, -2, 120])
    clock[0] += 30
    result = store.upsert(dup, ttl_s=ttl)
    assert result.stored.tolist() == [True, True, True, True]
    got = store.lookup(np.array([7, 8, 9]))
    np.testing.assert_array_equal(got.versions, [9, 8, 8])
    clock[0] += 45  # 8 kept its first expiry (1,060 s): gone; 9 was given 120 s more
    assert store.lookup(np.array([8, 9])).found.tolist() == [False, True]
    store.close()


def test_sqlite_statements_come_in_a_few_sizes_whatever_the_batch_sizes(
    tmp_path: Path, lists_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each distinct SQL text stays prepared in the connection's statement cache (128 of them,
    ~1 MB for a 1,024-row upsert): upserts and lookups sized by every call's count held
    +140 MB after 128 micro-batches of varying size. Statements now come in powers of two."""
    rows: set[int] = set()
    keys: set[int] = set()
    upsert_sql, marks = sqlite_store._upsert_sql, sqlite_store._marks
    monkeypatch.setattr(
        sqlite_store, "_upsert_sql", lambda n, keep: rows.add(n) or upsert_sql(n, keep)
    )
    monkeypatch.setattr(sqlite_store, "_marks", lambda n: keys.add(n) or marks(n))
    store = SqliteStore(tmp_path / "s.db")
    rng = np.random.default_rng(0)
    for n in [*rng.integers(1, 3_000, 40), 1, 1_024, 2_048, 1_023]:
        qids = rng.choice(5_000, int(n), replace=False)
        result = store.upsert(lists_factory(qids, version=int(n)))
        assert result.stored.sum() + result.stale.sum() == n
        got = store.lookup(qids)
        assert got.found.all() and sorted(got.query_ids.tolist()) == sorted(qids.tolist())
    for n in range(2, 700, 7):
        assert store.lookup(np.arange(n)).found.sum() == n
    assert rows <= {1 << b for b in range(11)}, sorted(rows)
    assert keys <= {1 << b for b in range(10)}, sorted(keys)
    store.close()
