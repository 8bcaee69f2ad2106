"""The serving reader and `annstream lookup`, over both stores."""

from __future__ import annotations

import asyncio
import gc
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from annstream.cli import main
from annstream.serving import (
    AsyncNeighbourReader,
    NeighbourReader,
    Neighbours,
    ServingResult,
    exclude,
)
from annstream.store import NeighbourLists
from annstream.store.memory import InMemoryStore, _Record
from annstream.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from tests.store.conftest import Backend

Factory = Callable[..., NeighbourLists]


def test_reader_returns_k_and_the_missing_keys(backend: Backend, lists_factory: Factory) -> None:
    lists = lists_factory([1, 2], version=1, k=3, margin=2)
    backend.store.upsert(lists)
    got = NeighbourReader(backend.store).lookup(np.array([2, 7, 1]))
    assert got.ids.shape == (3, 3) and got.missing.tolist() == [7]
    np.testing.assert_array_equal(got.ids[2], lists.ids[0, :3])
    assert got.counts.tolist() == [3, 0, 3] and got.filtered.tolist() == [0, 0, 0]
    assert got.ids[1].tolist() == [-1, -1, -1]


def test_reader_filters_with_the_surplus_and_counts_what_it_dropped(
    backend: Backend, lists_factory: Factory
) -> None:
    lists = lists_factory([1], version=1, k=3, margin=2, with_campaigns=True)
    backend.store.upsert(lists)
    assert lists.campaign_ids is not None
    row_ids, row_campaigns = lists.ids[0], lists.campaign_ids[0]
    dropped = {int(row_campaigns[0])}
    expected = [
        int(i) for i, c in zip(row_ids, row_campaigns, strict=True) if int(c) not in dropped
    ]
    got = NeighbourReader(backend.store).lookup(np.array([1]), predicate=exclude(campaigns=dropped))
    assert got.ids[0, : got.counts[0]].tolist() == expected[:3]
    assert got.filtered[0] == sum(1 for c in row_campaigns if int(c) in dropped)
    assert (np.diff(got.scores[0, : got.counts[0]]) <= 0).all()


def test_reader_returns_fewer_than_k_when_the_surplus_runs_out(
    backend: Backend, lists_factory: Factory
) -> None:
    lists = lists_factory([1, 2], version=1, k=3, margin=2)  # row 0 is not padded
    backend.store.upsert(lists)
    bad = lists.ids[0, :3].tolist()
    got = NeighbourReader(backend.store, k=3).lookup(np.array([1]), predicate=exclude(ids=bad))
    assert got.counts.tolist() == [2] and got.filtered.tolist() == [3]
    assert got.ids[0].tolist() == [*lists.ids[0, 3:].tolist(), -1]


def test_reader_refuses_campaign_filters_without_campaign_ids(
    backend: Backend, lists_factory: Factory
) -> None:
    backend.store.upsert(lists_factory([1], version=1))
    with pytest.raises(ValueError, match="no campaign ids"):
        NeighbourReader(backend.store).lookup(np.array([1]), predicate=exclude(campaigns=[1]))


def test_cli_lookup_prints_one_json_line_per_query(
    backend: Backend, lists_factory: Factory, capsys: pytest.CaptureFixture[str]
) -> None:
    if backend.name == "memory":
        pytest.skip("a store in process memory has no URL another reader can open")
    lists = lists_factory([5, 6], version=3)
    backend.store.upsert(lists)
    assert main(["lookup", "5", "8", "--store", backend.store.url]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["query_id"] for line in lines] == [5, 8]
    assert lines[0]["found"] and lines[0]["version"] == 3
    assert lines[0]["ids"] == lists.ids[0, :3].tolist()
    assert not lines[1]["found"] and lines[1]["ids"] == []


def test_cli_lookup_rejects_a_bad_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lookup", "1", "--store", "mysql://x"]) == 2
    assert "accepted forms" in capsys.readouterr().err


def test_cli_lookup_prints_the_others_when_one_key_is_refused(
    backend: Backend, lists_factory: Factory, capsys: pytest.CaptureFixture[str]
) -> None:
    if backend.name == "memory":
        pytest.skip("a store in process memory has no URL another reader can open")
    lists = lists_factory([5, 6], version=3)
    backend.store.upsert(lists)
    backend.refuse(np.array([7]))
    assert main(["lookup", "5", "7", "6", "--store", backend.store.url]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["found"] for line in lines] == [True, False, True]
    assert lines[2]["ids"] == lists.ids[1, :3].tolist()
    if backend.reads_refused:
        assert "result 4 " in lines[1]["error"]
    assert "error" not in lines[0] and "error" not in lines[2]


# --- the single-key fast path and the lean batch path (issue 14) ---------------------------


def _expected(lists: NeighbourLists, row: int, k: int, keep: np.ndarray | None = None) -> list[int]:
    """The oracle: the row's ids, padding and rejected ones dropped, the first k."""
    ids = lists.ids[row]
    ok = ids >= 0 if keep is None else (ids >= 0) & keep
    return [int(i) for i in ids[ok][:k]]


def test_lookup_one_returns_what_the_batch_lookup_returns(
    backend: Backend, lists_factory: Factory
) -> None:
    lists = lists_factory([3, 1, 2], version=5, k=100, margin=20, with_campaigns=True)
    lists.ids[1, 90:], lists.scores[1, 90:] = -1, -np.inf  # a short list: 90 neighbours
    backend.store.upsert(lists)
    reader = NeighbourReader(backend.store)
    for k in (None, 1, 89, 90, 100, 120, 150):
        batch = reader.lookup(lists.query_ids, k=k)
        for row, qid in enumerate(lists.query_ids.tolist()):
            want = _expected(lists, row, 100 if k is None else k)
            one = reader.lookup_one(qid, k=k)
            assert one.found and one.query_id == qid and one.error is None
            assert one.ids.tolist() == want, (k, row)
            np.testing.assert_array_equal(one.scores, lists.scores[row, : len(want)])
            assert (one.version, one.computed_at_ms, one.filtered) == (
                5,
                int(lists.computed_at_ms[row]),
                0,
            )
            assert batch.ids[row, : batch.counts[row]].tolist() == want
            assert batch.counts[row] == len(want)
            assert (batch.ids[row, batch.counts[row] :] == -1).all()


def test_lookup_one_of_a_missing_and_a_refused_key(
    backend: Backend, lists_factory: Factory
) -> None:
    backend.store.upsert(lists_factory([1], version=1))
    backend.refuse(np.array([7]))
    reader = NeighbourReader(backend.store)
    missing = reader.lookup_one(5)
    assert not missing.found and missing.ids.size == 0 and missing.error is None
    refused = reader.lookup_one(7)
    assert not refused.found and refused.ids.size == 0
    if backend.reads_refused:
        assert refused.error is not None and "result 4 " in refused.error
    assert reader.lookup_one(1).found  # the store still reads after a refused key
    one = reader.lookup(np.array([7]))  # a batch of one goes through the single-key path
    assert not one.found[0] and (0 in one.errors) == backend.reads_refused


def test_lookup_one_filters_like_the_batch_lookup(backend: Backend, lists_factory: Factory) -> None:
    lists = lists_factory([1, 2], version=1, k=100, margin=20, with_campaigns=True)
    backend.store.upsert(lists)
    assert lists.campaign_ids is not None and lists.advertiser_ids is not None
    predicate = exclude(campaigns=[0, 3], advertisers=[1], ids=[int(lists.ids[0, 0])])
    reader = NeighbourReader(backend.store, k=100)
    batch = reader.lookup(lists.query_ids, predicate=predicate)
    for row, qid in enumerate(lists.query_ids.tolist()):
        keep = (
            ~np.isin(lists.campaign_ids[row], [0, 3])
            & (lists.advertiser_ids[row] != 1)
            & (lists.ids[row] != lists.ids[0, 0])
        )
        want = _expected(lists, row, 100, keep)
        one = reader.lookup_one(qid, predicate=predicate)
        assert one.ids.tolist() == want and len(want) < 100  # the surplus ran out
        assert one.filtered == int(((lists.ids[row] >= 0) & ~keep).sum())
        assert batch.ids[row, : batch.counts[row]].tolist() == want
        assert batch.filtered[row] == one.filtered


def test_lookups_without_a_predicate_leave_the_metadata_unread(
    backend: Backend, lists_factory: Factory
) -> None:
    lists = lists_factory([1, 2], version=1, with_campaigns=True)
    backend.store.upsert(lists)
    lean = backend.store.lookup(lists.query_ids, metadata=False)
    assert lean.campaign_ids is None and lean.advertiser_ids is None
    np.testing.assert_array_equal(lean.ids, lists.ids)
    full = backend.store.lookup(lists.query_ids)
    np.testing.assert_array_equal(full.campaign_ids, lists.campaign_ids)
    np.testing.assert_array_equal(full.advertiser_ids, lists.advertiser_ids)
    one = backend.store.lookup_one(2, metadata=False)
    assert one.campaign_ids is None and one.advertiser_ids is None
    both = backend.store.lookup_one(2)
    assert lists.campaign_ids is not None and both.campaign_ids is not None
    np.testing.assert_array_equal(both.campaign_ids, lists.campaign_ids[1])


def test_lookup_one_refuses_query_ids_that_are_not_int64(backend: Backend) -> None:
    reader = NeighbourReader(backend.store)
    with pytest.raises(TypeError):
        reader.lookup_one(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="int64"):
        reader.lookup_one(2**63)
    with pytest.raises(ValueError, match="k must be >= 1"):
        reader.lookup_one(1, k=0)
    assert not reader.lookup_one(np.int64(4)).found  # type: ignore[arg-type]


def test_padding_and_holes_are_skipped_by_both_paths(
    backend: Backend, lists_factory: Factory
) -> None:
    lists = lists_factory([1, 2], version=1, k=3, margin=2)
    lists.ids[0, 1], lists.scores[0, 1] = -1, -np.inf  # a hole (not written by annstream)
    backend.store.upsert(lists)
    reader = NeighbourReader(backend.store)
    for row, qid in enumerate([1, 2]):
        for k in (1, 2, 3, 4, 5, 6):
            want = _expected(lists, row, k)
            assert reader.lookup_one(qid, k=k).ids.tolist() == want, (row, k)
            batch = reader.lookup(np.array([qid, 99]), k=k)
            assert batch.ids[0, : batch.counts[0]].tolist() == want, (row, k)


def test_a_batch_of_lists_of_several_widths(backend: Backend, lists_factory: Factory) -> None:
    narrow = lists_factory([1, 2], version=1, k=3, margin=2, seed=1)
    wide = lists_factory([3], version=1, k=6, margin=4, seed=2)
    backend.store.upsert(narrow)
    backend.store.upsert(wide)
    reader = NeighbourReader(backend.store)
    got = reader.lookup(np.array([3, 9, 1, 2]))
    assert got.ids.shape == (4, 6)  # the widest stored K
    assert got.counts.tolist() == [6, 0, 3, 3]
    assert got.ids[0].tolist() == _expected(wide, 0, 6)
    assert got.ids[2, :3].tolist() == _expected(narrow, 0, 3)
    raw = backend.store.lookup(np.array([3, 9, 1, 2]))
    assert raw.ids.shape == (4, 10) and raw.k.tolist() == [6, 0, 3, 3]
    assert raw.ids[2].tolist() == [*narrow.ids[0].tolist(), *[-1] * 5]
    assert np.isneginf(raw.scores[3, 4:]).all()  # the second narrow row is padded by one


def _write_bad_record(backend: Backend, request: pytest.FixtureRequest, qid: int) -> None:
    """A record of format 2 at `qid`, written behind the store's back."""
    url = backend.store.url
    if isinstance(backend.store, InMemoryStore):
        backend.store._records[qid] = _Record({"fmt": 2, "ids": b"\0" * 8}, None)
        return
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url[len("sqlite:///") :]) as db:
            db.execute(
                "INSERT INTO neighbour_lists (query_id, fmt, version, computed_at_ms, k, ids, "
                "scores) VALUES (?, 2, 1, 1, 1, ?, ?)",
                (qid, b"\0" * 8, b"\0" * 4),
            )
        return
    client = request.getfixturevalue("aerospike_client")
    _, ns, set_name = url.rsplit("/", 2)
    client.put((ns, set_name, qid), {"fmt": 2, "ids": b"\0" * 8})


def test_a_record_of_another_format_is_an_error_row_in_both_paths(
    backend: Backend, lists_factory: Factory, request: pytest.FixtureRequest
) -> None:
    lists = lists_factory([1, 2], version=1)
    backend.store.upsert(lists)
    _write_bad_record(backend, request, 5)
    reader = NeighbourReader(backend.store)
    one = reader.lookup_one(5)
    assert not one.found and one.error is not None and "format 2" in one.error
    got = reader.lookup(np.array([1, 5, 2]))
    assert got.found.tolist() == [True, False, True] and "format 2" in got.errors[1]
    assert got.ids[2, : got.counts[2]].tolist() == _expected(lists, 1, 3)


def test_one_reader_serves_many_threads_while_the_lists_are_rewritten(
    backend: Backend, lists_factory: Factory
) -> None:
    qids = list(range(1, 41))
    versions = [lists_factory(qids, version=v, k=100, margin=20, seed=v) for v in (1, 2, 3)]
    backend.store.upsert(versions[0])
    by_version = {v + 1: lists for v, lists in enumerate(versions)}
    reader = NeighbourReader(backend.store)
    stop = threading.Event()
    problems: list[str] = []

    def check(qid: int, version: int, ids: list[int]) -> None:
        want = _expected(by_version[version], qid - 1, 100)
        if ids != want:
            problems.append(f"query {qid} version {version}: a torn or wrong list")

    def serve(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                qid = int(rng.integers(1, 41))
                one = reader.lookup_one(qid)
                check(qid, one.version, one.ids.tolist())
                keys = rng.choice(qids, 10, replace=False)
                batch = reader.lookup(keys)
                for row, q in enumerate(keys.tolist()):
                    ids = batch.ids[row, : batch.counts[row]].tolist()
                    check(q, int(batch.versions[row]), ids)
        except Exception as exc:  # surfaced below with the thread's seed
            problems.append(f"thread {seed}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=serve, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    for lists in versions[1:]:
        time.sleep(0.2)
        assert backend.store.upsert(lists).stored.all()
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(10)
    assert not problems, problems[:5]
    assert reader.lookup(np.array(qids)).versions.tolist() == [3] * 40


def test_async_reader_answers_like_the_reader(backend: Backend, lists_factory: Factory) -> None:
    lists = lists_factory([1, 2, 3], version=2, k=10, margin=2, with_campaigns=True)
    backend.store.upsert(lists)
    reader = NeighbourReader(backend.store)
    predicate = exclude(campaigns=[1])

    async def main() -> tuple[list[Neighbours], ServingResult]:
        async_reader = AsyncNeighbourReader(reader)
        singles = await asyncio.gather(
            *(async_reader.lookup_one(q, predicate=predicate) for q in (1, 2, 3, 4))
        )
        return list(singles), await async_reader.lookup(np.array([3, 1]))

    singles, batch = asyncio.run(main())
    for one in singles:
        want = reader.lookup_one(one.query_id, predicate=predicate)
        assert one.ids.tolist() == want.ids.tolist() and one.filtered == want.filtered
    assert not singles[3].found
    np.testing.assert_array_equal(batch.ids, reader.lookup(np.array([3, 1])).ids)


def test_a_batch_where_only_some_lists_carry_campaign_ids(
    backend: Backend, lists_factory: Factory
) -> None:
    with_ids = lists_factory([1], version=1, with_campaigns=True)
    without = lists_factory([2], version=1, seed=3)
    backend.store.upsert(with_ids)
    backend.store.upsert(without)
    got = backend.store.lookup(np.array([2, 1, 3]))
    assert got.found.tolist() == [True, True, False] and not got.errors
    assert with_ids.campaign_ids is not None and got.campaign_ids is not None
    assert got.campaign_ids[1].tolist() == with_ids.campaign_ids[0].tolist()
    assert (got.campaign_ids[[0, 2]] == -1).all()
    np.testing.assert_array_equal(got.ids[0], without.ids[0])
    predicate = exclude(campaigns=[int(with_ids.campaign_ids[0, 0])])
    served = NeighbourReader(backend.store).lookup(np.array([2, 1]), predicate=predicate)
    assert served.filtered.tolist() == [
        0,
        int((with_ids.campaign_ids[0] == with_ids.campaign_ids[0, 0]).sum()),
    ]


def test_sqlite_serving_threads_do_not_wait_for_the_writer(
    tmp_path: Path, lists_factory: Factory
) -> None:
    store = SqliteStore(tmp_path / "store.db")
    lists = lists_factory([1, 2], version=1)
    store.upsert(lists)
    reader = NeighbourReader(store)
    got: list[Neighbours] = []
    with store._lock:  # a write in progress on the store's own connection
        worker = threading.Thread(target=lambda: got.append(reader.lookup_one(2)))
        worker.start()
        worker.join(5)
        assert not worker.is_alive(), "a serving thread waited for the writer's lock"
    assert got[0].ids.tolist() == _expected(lists, 1, 3)
    del worker
    gc.collect()
    assert not list(store._readers), "a finished thread's read connection stayed open"
    store.close()
