"""Aerospike-only behaviour: retries, in-doubt batches, an unreachable cluster, URLs."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import aerospike
import numpy as np
import pytest

from annstream.config import StoreConfig
from annstream.errors import ConfigError, StoreUnavailableError
from annstream.store import NeighbourLists, open_store, parse_aerospike_url
from annstream.store.aerospike import stale_guard
from annstream.testing.aerospike_server import AerospikeTestServer, Fault

NS, SET = "test", "neighbours"
Factory = Callable[..., NeighbourLists]


def _digests(*query_ids: int) -> frozenset[bytes]:
    return frozenset(bytes(aerospike.calc_digest(NS, SET, q)) for q in query_ids)


@pytest.fixture
def server(aerospike_server: AerospikeTestServer) -> AerospikeTestServer:
    aerospike_server.clear()
    yield aerospike_server  # type: ignore[misc]
    aerospike_server.clear_faults()


def test_aerospike_transient_errors_are_retried(
    server: AerospikeTestServer, store_cfg: StoreConfig, lists_factory: Factory
) -> None:
    server.inject(Fault(_digests(2), result=14, times=2))  # KEY_BUSY twice, then fine
    with open_store(f"aerospike://{server.url_host}/{NS}/{SET}", store_cfg) as store:  # type: ignore[attr-defined]
        result = store.upsert(lists_factory([1, 2, 3], version=1))
    assert result.stored.all() and not result.errors


def test_aerospike_transient_errors_beyond_retries_fail_those_rows(
    server: AerospikeTestServer, store_cfg: StoreConfig, lists_factory: Factory
) -> None:
    server.inject(Fault(_digests(2), result=18))  # DEVICE_OVERLOAD, persistent
    store = open_store(f"aerospike://{server.url_host}/{NS}/{SET}", store_cfg)
    result = store.upsert(lists_factory([1, 2, 3], version=1))
    store.close()
    assert result.failed.tolist() == [False, True, False]
    assert "18" in result.errors[1]


def test_aerospike_in_doubt_batch_is_replayed_and_replays_are_stale(
    server: AerospikeTestServer, store_cfg: StoreConfig, lists_factory: Factory
) -> None:
    # Record 2 is written but the whole batch reply is lost: the client cannot know what landed.
    server.inject(Fault(_digests(2), apply=True, drop=True, times=1))
    store = open_store(f"aerospike://{server.url_host}/{NS}/{SET}", store_cfg)
    lists = lists_factory([1, 2, 3], version=4)
    result = store.upsert(lists)
    assert result.done.all() and not result.failed.any()
    assert result.stale[1]  # the replay of the write that did land was a no-op
    got = store.lookup(lists.query_ids)
    store.close()
    np.testing.assert_array_equal(got.ids, lists.ids)


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
