"""One contract, two stores: SQLite and Aerospike (real client against the test server)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pytest

from annstream.errors import StoreConfigError
from annstream.store import NeighbourLists

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
    backend.store.upsert(lists_factory([1, 2], version=1), ttl_s=60)
    backend.store.upsert(lists_factory([3], version=1), ttl_s=-1)
    backend.clock.advance(30)
    assert backend.store.lookup(np.array([1, 2, 3])).found.all()
    backend.clock.advance(31)
    assert backend.store.lookup(np.array([1, 2, 3])).found.tolist() == [False, False, True]
    # An expired record is gone: any version may be written again.
    assert backend.store.upsert(lists_factory([1], version=1)).stored.all()


def test_store_head_exit_expire_and_delete(backend: Backend, lists_factory: Factory) -> None:
    backend.store.upsert(lists_factory([1, 2, 3], version=1))
    backend.store.expire(np.array([1, 404]), ttl_s=10)
    backend.store.remove(np.array([2, 405]))
    assert backend.store.lookup(np.array([1, 2, 3])).found.tolist() == [True, False, True]
    backend.clock.advance(11)
    assert backend.store.lookup(np.array([1, 2, 3])).found.tolist() == [False, False, True]


def test_store_ttl_refusal_raises_store_config_error(
    backend: Backend, lists_factory: Factory
) -> None:
    if backend.refuse_ttl is None:
        pytest.skip("only Aerospike namespaces refuse TTLs (no nsup-period)")
    backend.refuse_ttl()
    with pytest.raises(StoreConfigError, match="nsup-period"):
        backend.store.upsert(lists_factory([1]), ttl_s=60)
    # ttl 0 (namespace default) and -1 (never) are accepted by such a namespace.
    assert backend.store.upsert(lists_factory([1]), ttl_s=0).stored.all()
    assert backend.store.upsert(lists_factory([2]), ttl_s=-1).stored.all()
    with pytest.raises(StoreConfigError, match="ttl_s = 0"):
        backend.store.expire(np.array([1]), ttl_s=60)


def test_store_partial_failure_is_reported_row_by_row(
    backend: Backend, lists_factory: Factory
) -> None:
    lists = lists_factory([1, 2, 3, 4], version=2)
    backend.fail(np.array([2, 4]))
    result = backend.store.upsert(lists)
    assert result.stored.tolist() == [True, False, True, False]
    assert result.failed.tolist() == [False, True, False, True]
    assert sorted(result.errors) == [1, 3] and all(result.errors.values())
    assert backend.store.lookup(lists.query_ids).found.tolist() == [True, False, True, False]
    backend.heal()
    retry = backend.store.upsert(lists.take(result.failed))
    assert retry.stored.all()
    assert backend.store.lookup(lists.query_ids).found.all()


def test_store_upsert_of_empty_batch(backend: Backend, lists_factory: Factory) -> None:
    result = backend.store.upsert(lists_factory([], version=1))
    assert result.done.shape == (0,)
