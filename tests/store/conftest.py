"""Fixtures for the neighbour-store contract suite: every backend behind one `Backend`.

The Aerospike backend talks to the project's wire-protocol test server, or to a real server
when `ANNSTREAM_TEST_AEROSPIKE=host:port[/namespace]` is set (each test then gets its own
set, truncated afterwards). Cases that need the test server (fault injection, its clock)
skip with a reason in that mode.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aerospike
import numpy as np
import pytest

from annstream.config import StoreConfig
from annstream.store import NeighbourLists, NeighbourStore, open_store
from annstream.store.memory import InMemoryStore
from annstream.store.sqlite import SqliteStore
from annstream.testing.aerospike_server import (
    ENV_REAL_SERVER,
    AerospikeTestServer,
    Fault,
    external_server,
)

NAMESPACE, SET = "test", "neighbours"
NEEDS_TEST_SERVER = (
    f"needs the project's Aerospike test server (fault injection or its clock); "
    f"{ENV_REAL_SERVER} points at a real server"
)


class FakeClock:
    """Wall-clock seconds that only move when a test says so."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RealClock:
    """A real server keeps its own time: advancing means waiting."""

    def __call__(self) -> float:
        return time.time()

    def advance(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass(frozen=True)
class AerospikeTarget:
    """Where the Aerospike tests run: the test server (`server`) or a real one (None)."""

    host: str
    port: int
    namespace: str
    server: AerospikeTestServer | None

    @property
    def real(self) -> bool:
        return self.server is None

    def url(self, set_name: str) -> str:
        return f"aerospike://{self.host}:{self.port}/{self.namespace}/{set_name}"


@pytest.fixture(scope="session")
def aerospike_target() -> Iterator[AerospikeTarget]:
    real = external_server()
    if real is not None:
        yield AerospikeTarget(*real, server=None)
        return
    with AerospikeTestServer(namespaces=[NAMESPACE]) as server:
        yield AerospikeTarget(server.host, server.port, NAMESPACE, server)


@pytest.fixture(scope="session")
def aerospike_client(aerospike_target: AerospikeTarget) -> Iterator[Any]:
    """A raw client for setting up records the store itself would never write."""
    client = aerospike.client({"hosts": [(aerospike_target.host, aerospike_target.port)]})
    yield client
    client.close()


@pytest.fixture
def aerospike_server(aerospike_target: AerospikeTarget) -> AerospikeTestServer:
    """The project's test server; skips when the suite runs against a real one."""
    if aerospike_target.server is None:
        pytest.skip(NEEDS_TEST_SERVER)
    return aerospike_target.server


@pytest.fixture
def set_name(aerospike_target: AerospikeTarget, aerospike_client: Any) -> Iterator[str]:
    """A set of this test's own on a real server (truncated after), `neighbours` otherwise."""
    if aerospike_target.server is not None:
        aerospike_target.server.clear()
        yield SET
        aerospike_target.server.clear_faults()
        return
    name = f"nb_{uuid.uuid4().hex[:12]}"
    yield name
    for used in (name, f"{name}_other"):
        aerospike_client.truncate(aerospike_target.namespace, used, 0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store_cfg() -> StoreConfig:
    return StoreConfig(retries=2, retry_backoff_s=0.01, timeout_ms=2_000)


@dataclass
class Backend:
    """A store plus the knobs a contract test needs; a knob a backend lacks is None."""

    name: str
    store: NeighbourStore
    clock: FakeClock | RealClock
    # make writes of these query ids fail for good (a record the store must not overwrite)
    refuse: Callable[[np.ndarray], None]
    # make writes of these query ids fail retryably (busy key)
    fail: Callable[[np.ndarray], None] | None
    # fill the store up: writes fail until heal()
    fill: Callable[[], None] | None
    refuse_ttl: Callable[[], None] | None
    reads_refused: bool  # refused keys also fail on read (Aerospike: result 4)
    heal_steps: list[Callable[[], None]] = field(default_factory=list)

    def heal(self) -> None:
        while self.heal_steps:
            self.heal_steps.pop()()


def _sqlite_backend(path: Path, cfg: StoreConfig, clock: FakeClock) -> Backend:
    store = SqliteStore(path, cfg, clock=clock)
    backend: Backend

    def refuse(query_ids: np.ndarray) -> None:
        ids = ",".join(str(int(q)) for q in query_ids)
        with sqlite3.connect(path) as db:
            for event in ("INSERT", "UPDATE"):
                db.execute(
                    f"CREATE TRIGGER refuse_{event.lower()} BEFORE {event} ON neighbour_lists "
                    f"WHEN NEW.query_id IN ({ids}) "
                    "BEGIN SELECT RAISE(ABORT, 'injected constraint failure'); END"
                )

        def drop() -> None:
            with sqlite3.connect(path) as db:
                db.execute("DROP TRIGGER IF EXISTS refuse_insert")
                db.execute("DROP TRIGGER IF EXISTS refuse_update")

        backend.heal_steps.append(drop)

    def fill() -> None:
        # A real SQLITE_FULL: the store's connection may not grow the file any more.
        db: sqlite3.Connection = store._db  # type: ignore[attr-defined]
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")
        backend.heal_steps.append(lambda: db.execute("PRAGMA max_page_count = 1073741823"))

    backend = Backend("sqlite", store, clock, refuse, None, fill, None, reads_refused=False)
    return backend


def _aerospike_backend(
    target: AerospikeTarget, client: Any, set_name: str, cfg: StoreConfig, clock: FakeClock
) -> Backend:
    server = target.server
    ns = target.namespace
    if server is not None:
        server.clock = clock
    store = open_store(target.url(set_name), cfg)
    backend: Backend

    def digests(query_ids: np.ndarray) -> list[bytes]:
        return [bytes(aerospike.calc_digest(ns, set_name, int(q))) for q in query_ids]

    def refuse(query_ids: np.ndarray) -> None:
        # A record of another set at the same digest: a real server answers 4 on read and write.
        other = f"{set_name}_other"
        keys = [(ns, other, None, bytearray(d)) for d in digests(query_ids)]
        for key in keys:
            client.put(key, {"x": 1}, policy={"key": aerospike.POLICY_KEY_DIGEST})

        def remove() -> None:
            for key in keys:
                client.remove(key)

        backend.heal_steps.append(remove)

    def fail(query_ids: np.ndarray) -> None:
        assert server is not None
        server.inject(Fault(frozenset(digests(query_ids)), result=14))  # KEY_BUSY
        backend.heal_steps.append(server.clear_faults)

    def fill() -> None:
        assert server is not None
        server.namespace(ns).stop_writes = True
        backend.heal_steps.append(server.clear_faults)

    def refuse_ttl() -> None:
        assert server is not None
        server.namespace(ns).refuse_ttl = True
        backend.heal_steps.append(server.clear_faults)

    backend = Backend(
        "aerospike",
        store,
        clock if server is not None else RealClock(),
        refuse,
        fail if server is not None else None,
        fill if server is not None else None,
        refuse_ttl if server is not None else None,
        reads_refused=True,
    )
    return backend


def _memory_backend(cfg: StoreConfig, clock: FakeClock) -> Backend:
    store = InMemoryStore(cfg, clock=clock)
    backend: Backend

    def refuse(query_ids: np.ndarray) -> None:
        store.fail(query_ids, permanent=True, reason="refused")
        backend.heal_steps.append(store.heal)

    def fail(query_ids: np.ndarray) -> None:
        store.fail(query_ids, reason="busy")
        backend.heal_steps.append(store.heal)

    def fill() -> None:
        store.fill()
        backend.heal_steps.append(store.heal)

    backend = Backend("memory", store, clock, refuse, fail, fill, None, reads_refused=False)
    return backend


@pytest.fixture(params=["sqlite", "aerospike", "memory"])
def backend(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    store_cfg: StoreConfig,
    clock: FakeClock,
) -> Iterator[Backend]:
    target: AerospikeTarget | None = None
    if request.param == "sqlite":
        b = _sqlite_backend(tmp_path / "store.db", store_cfg, clock)
    elif request.param == "memory":
        b = _memory_backend(store_cfg, clock)
    else:
        target = request.getfixturevalue("aerospike_target")
        client = request.getfixturevalue("aerospike_client")
        set_name = request.getfixturevalue("set_name")
        assert target is not None
        b = _aerospike_backend(target, client, set_name, store_cfg, clock)
    try:
        yield b
    finally:
        b.heal()
        b.store.close()
        if target is not None and target.server is not None:
            target.server.clock = time.time


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
