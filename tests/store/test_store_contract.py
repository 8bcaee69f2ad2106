"""One contract, every store: SQLite and Aerospike (the real client against the project's test
server, or a real server when ANNSTREAM_TEST_AEROSPIKE is set)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pytest

from annstream.errors import StoreConfigError, StoreUnavailableError
from annstream.store import NeighbourLists, UpsertResult
from tests.store.conftest import NEEDS_TEST_SERVER

if TYPE_CHECKING:
    from tests.store.conftest import Backend

Factory = Callable[..., NeighbourLists]


def test_store_upsert_then_lookup_round_trips_arrays(
    backend: Backend, lists_factory: Factory
) -> None:
    lists = lists_factory([10, 11, 12], version=5, with_campaigns=True)
    result = backend.store.upsert(lists)
    assert result.stored.all() and not result.stale.any() and not result.failed.any()
    got = backend.store.lookup(np.array([12, 99, 10], dtype=np.int64))
    assert got.found.tolist() == [True, False, True]
    assert got.missing.tolist() == [99]
    np.testing.assert_array_equal(got.ids[[0, 2]], lists.ids[[2, 0]])
    np.testing.assert_array_equal(got.scores[[0, 2]], lists.scores[[2, 0]])
    assert got.scores.dtype == np.float32 and got.ids.dtype == np.int64
    assert got.versions.tolist() == [5, 0, 5]
    assert got.k.tolist() == [3, 0, 3]
    assert got.computed_at_ms[0] == lists.computed_at_ms[2]
    assert got.ids[1].tolist() == [-1] * 5 and np.isneginf(got.scores[1]).all()
    assert got.campaign_ids is not None and got.advertiser_ids is not None
    np.testing.assert_array_equal(got.campaign_ids[2], lists.campaign_ids[0])  # type: ignore[index]
    np.testing.assert_array_equal(got.advertiser_ids[0], lists.advertiser_ids[2])  # type: ignore[index]


def test_store_lookup_of_nothing_and_of_unknown_ids(backend: Backend) -> None:
    empty = backend.store.lookup(np.array([], dtype=np.int64))
    assert empty.found.shape == (0,) and empty.ids.shape[0] == 0
    none = backend.store.lookup(np.array([1, 2], dtype=np.int64))
    assert not none.found.any() and none.missing.tolist() == [1, 2]
    assert none.campaign_ids is None


def test_store_stale_write_is_a_noop(backend: Backend, lists_factory: Factory) -> None:
    new = lists_factory([1, 2], version=7, seed=1)
    old = lists_factory([1, 2], version=6, seed=2)
    assert backend.store.upsert(new).stored.all()
    replay = backend.store.upsert(new)
    assert replay.stale.all() and replay.done.all() and not replay.stored.any()
    reordered = backend.store.upsert(old)
    assert reordered.stale.all() and not reordered.failed.any()
    got = backend.store.lookup(new.query_ids)
    np.testing.assert_array_equal(got.ids, new.ids)
    assert got.versions.tolist() == [7, 7]


def test_store_mixed_batch_stores_newer_and_skips_older(
    backend: Backend, lists_factory: Factory
) -> None:
    backend.store.upsert(lists_factory([1], version=5))
    batch = lists_factory([1, 2], version=4, seed=3)
    batch = NeighbourLists(
        query_ids=batch.query_ids, ids=batch.ids, scores=batch.scores,
        versions=np.array([4, 4], dtype=np.int64), computed_at_ms=batch.computed_at_ms, k=batch.k,
    )  # fmt: skip
    result = backend.store.upsert(batch)
    assert result.stale.tolist() == [True, False]
    assert result.stored.tolist() == [False, True]
    newer = lists_factory([1], version=6, seed=4)
    assert backend.store.upsert(newer).stored.all()
    np.testing.assert_array_equal(backend.store.lookup(np.array([1])).ids[0], newer.ids[0])


def test_store_rewrite_drops_optional_campaign_arrays(
    backend: Backend, lists_factory: Factory
) -> None:
    backend.store.upsert(lists_factory([1], version=1, with_campaigns=True))
    backend.store.upsert(lists_factory([1], version=2))
    assert backend.store.lookup(np.array([1])).campaign_ids is None


def test_store_ttl_expires_records_and_never_keeps_them(
    backend: Backend, lists_factory: Factory
) -> None:
    # Short TTLs so that a real server's own clock can run past them in a test.
    backend.store.upsert(lists_factory([1, 2], version=1), ttl_s=3)
    backend.store.upsert(lists_factory([3], version=1), ttl_s=-1)
    assert backend.store.lookup(np.array([1, 2, 3])).found.all()
    backend.clock.advance(4.2)
    assert backend.store.lookup(np.array([1, 2, 3])).found.tolist() == [False, False, True]
    # An expired record is gone: any version may be written again.
    assert backend.store.upsert(lists_factory([1], version=1)).stored.all()


def test_store_head_exit_expire_and_delete(backend: Backend, lists_factory: Factory) -> None:
    backend.store.upsert(lists_factory([1, 2, 3], version=1))
    backend.store.expire(np.array([1, 404]), ttl_s=3)
    backend.store.remove(np.array([2, 405]))
    assert backend.store.lookup(np.array([1, 2, 3])).found.tolist() == [True, False, True]
    backend.clock.advance(4.2)
    assert backend.store.lookup(np.array([1, 2, 3])).found.tolist() == [False, False, True]


def test_store_per_row_ttl(backend: Backend, lists_factory: Factory) -> None:
    # e.g. lists of queries that left the head set, rewritten with their remaining exit TTL
    backend.store.upsert(lists_factory([4], version=1), ttl_s=3)
    ttls = np.array([3, -1, 0, -2], dtype=np.int64)
    result = backend.store.upsert(lists_factory([1, 2, 3, 4], version=2), ttl_s=ttls)
    assert result.stored.all()
    assert backend.store.lookup(np.array([1, 2, 3, 4])).found.all()
    backend.clock.advance(4.2)
    # 1 had 3 s; 2 never expires; 3 got the namespace default (never, here); 4 kept its 3 s
    assert backend.store.lookup(np.array([1, 2, 3, 4])).found.tolist() == [
        False, True, True, False,
    ]  # fmt: skip


def test_store_refuses_bad_ttls_before_writing(backend: Backend, lists_factory: Factory) -> None:
    lists = lists_factory([1, 2], version=1)
    for bad in (315_360_001, -3):
        with pytest.raises(ValueError, match="315,360,000"):
            backend.store.upsert(lists, ttl_s=bad)
        with pytest.raises(ValueError, match="315,360,000"):
            backend.store.expire(np.array([1]), ttl_s=bad)
    with pytest.raises(ValueError, match=r"ttl_s\[1\] = 315360001"):
        backend.store.upsert(lists, ttl_s=np.array([60, 315_360_001]))
    with pytest.raises(ValueError, match="shape"):
        backend.store.upsert(lists, ttl_s=np.array([60]))
    assert not backend.store.lookup(lists.query_ids).found.any()
    assert backend.store.upsert(lists, ttl_s=315_360_000).stored.all()  # 10 years is accepted


def test_store_ttl_refusal_raises_store_config_error(
    backend: Backend, lists_factory: Factory
) -> None:
    if backend.refuse_ttl is None:
        pytest.skip(
            "only Aerospike namespaces refuse TTLs (no nsup-period)"
            if backend.name == "sqlite"
            else NEEDS_TEST_SERVER
        )
    backend.refuse_ttl()
    with pytest.raises(StoreConfigError, match="nsup-period"):
        backend.store.upsert(lists_factory([1]), ttl_s=60)
    # ttl 0 (namespace default) and -1 (never) are accepted by such a namespace.
    assert backend.store.upsert(lists_factory([1]), ttl_s=0).stored.all()
    assert backend.store.upsert(lists_factory([2]), ttl_s=-1).stored.all()
    with pytest.raises(StoreConfigError, match="ttl_s = 0"):
        backend.store.expire(np.array([1]), ttl_s=60)


def _outcomes(result: UpsertResult) -> list[str]:
    names = ("stored", "stale", "failed", "permanent")
    return [
        next(name for name in names if getattr(result, name)[row])
        for row in range(len(result.stored))
    ]


def test_store_permanent_row_failure_does_not_block_the_others(
    backend: Backend, lists_factory: Factory
) -> None:
    lists = lists_factory([1, 2, 3, 4], version=2)
    backend.refuse(np.array([2, 4]))
    result = backend.store.upsert(lists)
    assert _outcomes(result) == ["stored", "permanent", "stored", "permanent"]
    assert sorted(result.errors) == [1, 3]
    assert result.settled.all() and result.done.tolist() == [True, False, True, False]
    if backend.name == "aerospike":
        assert all("result 4 " in e and "permanent" in e for e in result.errors.values())
    # The same write is refused again (a caller must not retry it) ...
    assert _outcomes(backend.store.upsert(lists.take(np.array([1])))) == ["permanent"]
    # ... and the refused key does not fail a batch lookup of the others.
    got = backend.store.lookup(np.array([1, 2, 3, 99]))
    assert got.found.tolist() == [True, False, True, False]
    np.testing.assert_array_equal(got.ids[[0, 2]], lists.ids[[0, 2]])
    if backend.reads_refused:
        assert sorted(got.errors) == [1] and "result 4 " in got.errors[1]
    # Head exits of a batch holding a refused key apply to the others.
    backend.store.expire(np.array([1, 2]), ttl_s=-1)
    backend.store.remove(np.array([3, 4]))
    assert backend.store.lookup(np.array([1, 3])).found.tolist() == [True, False]
    backend.heal()
    assert backend.store.upsert(lists.take(result.permanent)).stored.all()


def test_store_retryable_row_failure_is_reported_row_by_row(
    backend: Backend, lists_factory: Factory
) -> None:
    if backend.fail is None:
        pytest.skip(
            "SQLite fails whole transactions (StoreUnavailableError), never single rows retryably"
            if backend.name == "sqlite"
            else NEEDS_TEST_SERVER
        )
    lists = lists_factory([1, 2, 3, 4], version=2)
    backend.fail(np.array([2, 4]))
    result = backend.store.upsert(lists)
    assert _outcomes(result) == ["stored", "failed", "stored", "failed"]
    assert sorted(result.errors) == [1, 3] and all("retryable" in e for e in result.errors.values())
    assert backend.store.lookup(lists.query_ids).found.tolist() == [True, False, True, False]
    backend.heal()
    retry = backend.store.upsert(lists.take(result.failed))
    assert retry.stored.all()
    assert backend.store.lookup(lists.query_ids).found.all()


def test_store_full_raises_unavailable_and_recovers(
    backend: Backend, lists_factory: Factory
) -> None:
    if backend.fill is None:
        pytest.skip(NEEDS_TEST_SERVER)
    backend.store.upsert(lists_factory([1], version=1))
    backend.fill()
    big = lists_factory(np.arange(10, 2_010), version=1, k=100, margin=20)
    with pytest.raises(StoreUnavailableError) as info:
        backend.store.upsert(big)
    assert info.value.retry_after > 0
    assert backend.store.lookup(np.array([1])).found.all()  # reads go on
    backend.heal()
    assert backend.store.upsert(big).stored.all()


def test_store_upsert_of_empty_batch(backend: Backend, lists_factory: Factory) -> None:
    result = backend.store.upsert(lists_factory([], version=1))
    assert result.done.shape == (0,) and result.permanent.shape == (0,)
    result = backend.store.upsert(lists_factory([], version=1), ttl_s=np.array([], np.int64))
    assert result.done.shape == (0,)
