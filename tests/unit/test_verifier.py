"""StoreVerifier against the in-memory store: round robin over every head query, missing and
rolled-back lists found, an episode checked back to back, nothing found in a healthy store."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from annstream.errors import StoreUnavailableError
from annstream.store.memory import InMemoryStore
from annstream.store.record import NeighbourLists
from annstream.verifier import StoreVerifier

K, MARGIN = 100, 20


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def lists(query_ids: np.ndarray, version: int) -> NeighbourLists:
    n = len(query_ids)
    rng = np.random.default_rng(version)
    return NeighbourLists(
        query_ids=query_ids.astype(np.int64),
        ids=rng.integers(0, 1 << 40, (n, K + MARGIN), dtype=np.int64),
        scores=-np.sort(-rng.random((n, K + MARGIN), dtype=np.float32), axis=1),
        versions=np.full(n, version, dtype=np.int64),
        computed_at_ms=np.zeros(n, dtype=np.int64),
        k=K,
    )


@pytest.fixture
def world() -> tuple[StoreVerifier, InMemoryStore, Clock, np.ndarray]:
    clock = Clock()
    store = InMemoryStore()
    heads = np.arange(1, 251, dtype=np.int64) * 7
    written = lists(heads, version=10)
    store.upsert(written)
    verifier = StoreVerifier(5.0, 100, clock=clock)
    verifier.stored(written.query_ids, written.versions)
    return verifier, store, clock, heads


def test_verifier_finds_nothing_in_a_healthy_store_and_waits_between_slices(
    world: tuple[StoreVerifier, InMemoryStore, Clock, np.ndarray],
) -> None:
    verifier, store, clock, heads = world
    assert not verifier.due()
    clock.now += 5
    assert verifier.due()
    for _ in range(3):
        assert len(verifier.check(store, heads)) == 0
        assert not verifier.due()
        clock.now += 5
    assert verifier.checked == 300


def test_verifier_covers_every_head_query_round_robin_after_a_wipe(
    world: tuple[StoreVerifier, InMemoryStore, Clock, np.ndarray],
    caplog: pytest.LogCaptureFixture,
) -> None:
    verifier, store, clock, heads = world
    store.wipe()
    clock.now += 5
    found: list[np.ndarray] = []
    with caplog.at_level(logging.INFO, logger="annstream.verifier"):
        while verifier.due():
            lost = verifier.check(store, heads[::-1])  # any order in, sorted slices out
            found.append(lost)
            repaired = lists(lost, version=11)
            store.upsert(repaired)
            verifier.stored(repaired.query_ids, repaired.versions)
    assert [len(f) for f in found] == [100, 100, 50, 0]  # back to back within the episode
    np.testing.assert_array_equal(np.sort(np.concatenate(found)), heads)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "lost 100 of 100" in warnings[0].getMessage()
    assert any("verified again after 250 rewrites" in r.getMessage() for r in caplog.records)


def test_verifier_finds_lists_older_than_stored(
    world: tuple[StoreVerifier, InMemoryStore, Clock, np.ndarray],
) -> None:
    verifier, store, clock, heads = world
    store.wipe()
    store.upsert(lists(heads, version=3))  # a restore from an old backup
    clock.now += 5
    lost = verifier.check(store, heads)
    np.testing.assert_array_equal(lost, heads[:100])


def test_verifier_skips_queries_it_never_stored_or_forgot(
    world: tuple[StoreVerifier, InMemoryStore, Clock, np.ndarray],
) -> None:
    verifier, store, clock, heads = world
    store.wipe()
    verifier.forget(heads[:240])
    clock.now += 5
    lost = verifier.check(store, np.concatenate([heads, [1, 2, 3]]))
    np.testing.assert_array_equal(lost, heads[240:])


def test_verifier_lets_store_unavailable_through_and_stays_off_at_zero(
    world: tuple[StoreVerifier, InMemoryStore, Clock, np.ndarray],
) -> None:
    verifier, store, clock, heads = world
    store.go_down()
    clock.now += 5
    with pytest.raises(StoreUnavailableError):
        verifier.check(store, heads)
    assert not verifier.due()  # the next slice waits for the interval again
    off = StoreVerifier(0, 10, clock=clock)
    clock.now += 1e6
    assert not off.due()
    with pytest.raises(ValueError, match="verify_sample"):
        StoreVerifier(1, 0)
