"""Fixtures for the neighbour-store contract suite: one test server, both backends."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aerospike
import numpy as np
import pytest

from annstream.config import StoreConfig
from annstream.store import NeighbourLists, NeighbourStore, open_store
from annstream.store.memory import InMemoryStore
from annstream.store.sqlite import SqliteStore
from annstream.testing.aerospike_server import AerospikeTestServer, Fault

NAMESPACE, SET = "test", "neighbours"


class FakeClock:
    """Wall-clock seconds that only move when a test says so."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="session")
def aerospike_server() -> Iterator[AerospikeTestServer]:
    """The project's Aerospike wire-protocol test server, in a thread on a free port."""
    with AerospikeTestServer(namespaces=[NAMESPACE]) as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store_cfg() -> StoreConfig:
    return StoreConfig(retries=2, retry_backoff_s=0.01, timeout_ms=2_000)


@dataclass
class Backend:
    """A store plus the knobs a contract test needs: time, injected faults, TTL refusal."""

    name: str
    store: NeighbourStore
    clock: FakeClock
    fail: Callable[[np.ndarray], None]
    heal: Callable[[], None]
    refuse_ttl: Callable[[], None] | None


def _sqlite_backend(path: Path, cfg: StoreConfig, clock: FakeClock) -> Backend:
    store = SqliteStore(path, cfg, clock=clock)

    def fail(query_ids: np.ndarray) -> None:
        ids = ",".join(str(int(q)) for q in query_ids)
        with sqlite3.connect(path) as db:
            for event in ("INSERT", "UPDATE"):
                db.execute(
                    f"CREATE TRIGGER fail_{event.lower()} BEFORE {event} ON neighbour_lists "
                    f"WHEN NEW.query_id IN ({ids}) "
                    "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
                )

    def heal() -> None:
        with sqlite3.connect(path) as db:
            db.execute("DROP TRIGGER IF EXISTS fail_insert")
            db.execute("DROP TRIGGER IF EXISTS fail_update")

    return Backend("sqlite", store, clock, fail, heal, None)


def _aerospike_backend(server: AerospikeTestServer, cfg: StoreConfig, clock: FakeClock) -> Backend:
    server.clock = clock
    store = open_store(f"aerospike://{server.url_host}/{NAMESPACE}/{SET}", cfg)

    def fail(query_ids: np.ndarray) -> None:
        digests = frozenset(bytes(aerospike.calc_digest(NAMESPACE, SET, int(q))) for q in query_ids)
        server.inject(Fault(digests, result=13))  # RECORD_TOO_BIG: not retryable

    def refuse_ttl() -> None:
        server.refuse_ttl = True

    return Backend("aerospike", store, clock, fail, server.clear_faults, refuse_ttl)


def _memory_backend(cfg: StoreConfig, clock: FakeClock) -> Backend:
    store = InMemoryStore(cfg, clock=clock)
    return Backend("memory", store, clock, store.fail, store.heal, None)


@pytest.fixture(params=["sqlite", "aerospike", "memory"])
def backend(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    store_cfg: StoreConfig,
    clock: FakeClock,
) -> Iterator[Backend]:
    if request.param == "sqlite":
        b = _sqlite_backend(tmp_path / "store.db", store_cfg, clock)
    elif request.param == "memory":
        b = _memory_backend(store_cfg, clock)
    else:
        server: AerospikeTestServer = request.getfixturevalue("aerospike_server")
        server.clear()
        b = _aerospike_backend(server, store_cfg, clock)
    try:
        yield b
    finally:
        b.heal()
        b.store.close()
        if request.param == "aerospike":
            server.refuse_ttl = False
            server.clock = time.time


def make_lists(
    query_ids: list[int] | np.ndarray,
    *,
    version: int = 1,
    k: int = 3,
    margin: int = 2,
    seed: int = 0,
    with_campaigns: bool = False,
) -> NeighbourLists:
    """A seeded micro-batch: ids descending by score, the last row padded by one."""
    rng = np.random.default_rng(seed)
    qids = np.asarray(query_ids, dtype=np.int64)
    n, m = qids.size, k + margin
    ids = rng.integers(0, 1_000_000, size=(n, m), dtype=np.int64)
    scores = -np.sort(-rng.random((n, m), dtype=np.float32), axis=1)
    if n:
        ids[-1, -1], scores[-1, -1] = -1, -np.inf
    return NeighbourLists(
        query_ids=qids,
        ids=ids,
        scores=scores,
        versions=np.full(n, version, dtype=np.int64),
        computed_at_ms=np.full(n, 1_700_000_000_000 + version, dtype=np.int64),
        k=k,
        campaign_ids=ids % 7 if with_campaigns else None,
        advertiser_ids=ids % 3 if with_campaigns else None,
    )


@pytest.fixture
def lists_factory() -> Callable[..., NeighbourLists]:
    """`lists_factory([1, 2], version=3, with_campaigns=True)`: a seeded micro-batch."""
    return make_lists
