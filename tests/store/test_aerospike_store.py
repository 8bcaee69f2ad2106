"""Aerospike-only behaviour: one attempt per call, result codes, in-doubt batches, an unreachable
cluster, URLs. Tests taking `store` also run against a real server (ANNSTREAM_TEST_AEROSPIKE)."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import aerospike
import numpy as np
import pytest

from annstream.config import StoreConfig
from annstream.errors import ConfigError, StoreUnavailableError
from annstream.store import NeighbourLists, open_store, parse_aerospike_url
from annstream.store.aerospike import AerospikeStore, stale_guard
from annstream.testing.aerospike_server import AerospikeTestServer, Fault

if TYPE_CHECKING:
    from tests.store.conftest import AerospikeTarget

NS, SET = "test", "neighbours"
Factory = Callable[..., NeighbourLists]


def _digests(*query_ids: int) -> frozenset[bytes]:
    return frozenset(bytes(aerospike.calc_digest(NS, SET, q)) for q in query_ids)


@pytest.fixture
def server(aerospike_server: AerospikeTestServer) -> Iterator[AerospikeTestServer]:
    aerospike_server.clear()
    yield aerospike_server
    aerospike_server.clear_faults()


@pytest.fixture
def store(
    aerospike_target: AerospikeTarget, set_name: str, store_cfg: StoreConfig
) -> Iterator[AerospikeStore]:
    """An Aerospike store on the test server or, when given, the real server."""
    s = open_store(aerospike_target.url(set_name), store_cfg)
    assert isinstance(s, AerospikeStore)
    yield s
    s.close()


def test_aerospike_store_makes_one_attempt_per_call(
    server: AerospikeTestServer, store_cfg: StoreConfig, lists_factory: Factory
) -> None:
    server.inject(Fault(_digests(2), result=14, times=1))  # KEY_BUSY once, then fine
    with open_store(f"aerospike://{server.url_host}/{NS}/{SET}", store_cfg) as store:  # type: ignore[attr-defined]
        before = server.requests
        result = store.upsert(lists_factory([1, 2, 3], version=1))
        assert server.requests - before == 1  # one batch, no retry inside the store
        assert result.stored.tolist() == [True, False, True]
        assert result.failed.tolist() == [False, True, False]
        assert "result 14 KEY_BUSY (retryable" in result.errors[1]
        # The caller retries the failed row; now it goes through.
        assert store.upsert(lists_factory([1, 2, 3], version=1).take(result.failed)).stored.all()


def test_aerospike_every_row_failing_retryably_is_unavailable(
    server: AerospikeTestServer, store_cfg: StoreConfig, lists_factory: Factory
) -> None:
    server.inject(Fault(_digests(1, 2), result=18))  # DEVICE_OVERLOAD, persistent
    store = open_store(f"aerospike://{server.url_host}/{NS}/{SET}", store_cfg)
    before = server.requests
    with pytest.raises(StoreUnavailableError, match="DEVICE_OVERLOAD") as info:
        store.upsert(lists_factory([1, 2], version=1))
    assert server.requests - before == 1
    assert info.value.retry_after > 0
    store.close()


def test_aerospike_stop_writes_is_unavailable_not_a_crash(
    server: AerospikeTestServer, store_cfg: StoreConfig, lists_factory: Factory
) -> None:
    store = open_store(f"aerospike://{server.url_host}/{NS}/{SET}", store_cfg)
    store.upsert(lists_factory([1], version=1))
    server.namespace(NS).stop_writes = True
    with pytest.raises(StoreUnavailableError, match=r"result 8 SERVER_FULL.*stop-writes"):
        store.upsert(lists_factory([1, 2], version=2))
    with pytest.raises(StoreUnavailableError, match="result 8"):
        store.expire(np.array([1]), ttl_s=60)
    assert store.lookup(np.array([1])).found.all()  # reads go on
    store.remove(np.array([1]))  # deletes go on: they free space
    server.namespace(NS).stop_writes = False
    assert store.upsert(lists_factory([1, 2], version=2)).stored.all()
    store.close()


def test_aerospike_in_doubt_batch_is_unavailable_and_the_replay_is_stale(
    server: AerospikeTestServer, store_cfg: StoreConfig, lists_factory: Factory
) -> None:
    # Record 2 is written but the whole batch reply is lost: the client cannot know what landed.
    server.inject(Fault(_digests(2), apply=True, drop=True, times=1))
    store = open_store(f"aerospike://{server.url_host}/{NS}/{SET}", store_cfg)
    lists = lists_factory([1, 2, 3], version=4)
    with pytest.raises(StoreUnavailableError):
        store.upsert(lists)
    result = store.upsert(lists)  # the caller's retry
    assert result.done.all() and not result.failed.any()
    assert result.stale[1]  # the replay of the write that did land was a no-op
    got = store.lookup(lists.query_ids)
    store.close()
    np.testing.assert_array_equal(got.ids, lists.ids)


def test_aerospike_record_over_max_record_size_is_permanent(
    store: AerospikeStore, lists_factory: Factory
) -> None:
    # 1 MiB is the default max-record-size: 100,000 neighbours of 12 bytes each exceed it.
    lists = lists_factory([1, 2, 3], version=1, k=100, margin=20)
    huge = lists_factory([2], version=1, k=50_000, margin=50_000)
    assert store.upsert(lists.take(np.array([0, 2]))).stored.all()
    result = store.upsert(huge)
    assert result.permanent.tolist() == [True] and not result.failed.any()
    assert "result 13 RECORD_TOO_BIG (permanent)" in result.errors[0]
    # just under the limit is stored (ids 8 + scores 4 bytes per neighbour)
    fits = lists_factory([2], version=1, k=80_000, margin=7_000)
    assert store.upsert(fits).stored.all()
    assert store.lookup(np.array([1, 2, 3])).found.all()


def test_aerospike_ttl_over_ten_years_never_reaches_the_server(
    store: AerospikeStore, lists_factory: Factory
) -> None:
    with pytest.raises(ValueError, match="315,360,000"):
        store.upsert(lists_factory([1], version=1), ttl_s=315_360_001)
    assert store.upsert(lists_factory([1], version=1), ttl_s=315_360_000).stored.all()


def test_aerospike_unreachable_store_raises_unavailable(
    store_cfg: StoreConfig, lists_factory: Factory
) -> None:
    server = AerospikeTestServer(namespaces=[NS]).start()
    store = open_store(f"aerospike://{server.url_host}/{NS}/{SET}", store_cfg)
    server.stop()
    with pytest.raises(StoreUnavailableError) as info:
        store.upsert(lists_factory([1], version=1))
    assert info.value.retry_after > 0
    with pytest.raises(StoreUnavailableError):
        store.lookup(np.array([1]))
    store.close()


def test_aerospike_connect_to_nothing_raises_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = StoreConfig(retries=0, timeout_ms=200)
    with pytest.raises(StoreUnavailableError, match="cannot connect"):
        open_store(f"aerospike://127.0.0.1:{port}/{NS}/{SET}", cfg)


def test_store_urls_are_parsed_or_refused_with_the_accepted_forms() -> None:
    assert parse_aerospike_url("aerospike://a:3000,b:4000/ns/set") == (
        [("a", 3000), ("b", 4000)],
        "ns",
        "set",
    )
    assert parse_aerospike_url("aerospike://a/ns/set")[0] == [("a", 3000)]
    for bad in ("aerospike://a:3000/ns", "redis://x", "sqlite://", "aerospike://a:x/ns/s"):
        with pytest.raises(ConfigError, match=r"aerospike://host:port/namespace/set|host:port"):
            open_store(bad)


def test_stale_guard_matches_the_expression_helpers() -> None:
    from aerospike_helpers import expressions as exp

    expected = exp.Or(exp.Not(exp.BinExists("v")), exp.LT(exp.IntBin("v"), 42)).compile()
    assert stale_guard(42) == expected


def test_aerospike_lookup_with_no_node_left_is_unavailable_not_missing(
    store_cfg: StoreConfig, lists_factory: Factory
) -> None:
    server = AerospikeTestServer(namespaces=[NS]).start()
    store = open_store(f"aerospike://{server.url_host}/{NS}/{SET}", store_cfg)
    assert store.upsert(lists_factory([1], version=1)).done.all()
    server.stop()
    client = store._client  # type: ignore[attr-defined]
    deadline = time.monotonic() + 20
    while client.get_nodes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not client.get_nodes(), "the client kept the stopped node"
    with pytest.raises(StoreUnavailableError):
        store.lookup(np.array([1]))
    store.close()


def test_aerospike_upsert_is_split_into_batches_and_a_failed_batch_fails_only_its_rows(
    server: AerospikeTestServer, store_cfg: StoreConfig, lists_factory: Factory
) -> None:
    cfg = dataclasses.replace(store_cfg, write_batch=2, write_threads=2)
    # Query 3's batch (rows 2-3) loses its reply: in doubt, those two rows are failed.
    server.inject(Fault(_digests(3), apply=True, drop=True, times=1))
    with open_store(f"aerospike://{server.url_host}/{NS}/{SET}", cfg) as store:  # type: ignore[attr-defined]
        before = server.requests
        lists = lists_factory([1, 2, 3, 4, 5, 6, 7], version=3)
        result = store.upsert(lists)
        assert server.requests - before == 4  # batches of 2, 2, 2, 1
        assert result.failed.tolist() == [False, False, True, True, False, False, False]
        assert result.stored.sum() == 5 and "in doubt" in result.errors[2]
        retry = store.upsert(lists.take(result.failed))
        assert retry.done.all()  # query 3 landed before the reply was lost: stale; 4 stored
        assert retry.stale.tolist() == [True, False]
        got = store.lookup(lists.query_ids)
    assert got.found.all()
    np.testing.assert_array_equal(got.ids, lists.ids)
