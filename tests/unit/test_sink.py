"""NeighbourSink over the in-memory store: one store call per write, per-row outcomes, head
exits, never a sleep or a retry loop of its own (the Checkpoint owns the retry policy)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from annstream.config import StoreConfig
from annstream.errors import StoreUnavailableError
from annstream.sink import NeighbourSink, refusal_reason
from annstream.store.memory import InMemoryStore
from annstream.store.record import NeighbourLists

K, MARGIN = 100, 20


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def lists(query_ids: list[int], version: int = 1, seed: int = 0) -> NeighbourLists:
    rng = np.random.default_rng(seed)
    n = len(query_ids)
    return NeighbourLists(
        query_ids=np.asarray(query_ids, dtype=np.int64),
        ids=rng.integers(0, 1 << 40, (n, K + MARGIN), dtype=np.int64),
        scores=-np.sort(-rng.random((n, K + MARGIN), dtype=np.float32), axis=1),
        versions=np.full(n, version, dtype=np.int64),
        computed_at_ms=np.full(n, 1_700_000_000_000, dtype=np.int64),
        k=K,
    )


def sink(**cfg: object) -> tuple[NeighbourSink, InMemoryStore, Clock]:
    clock = Clock()
    config = StoreConfig(url="memory://", **cfg)  # type: ignore[arg-type]
    store = InMemoryStore(config, clock=clock)
    return NeighbourSink(store, config), store, clock


def test_sink_write_stores_and_reports_stale_rows() -> None:
    s, store, _ = sink()
    first = s.write(lists([1, 2, 3], version=5))
    assert first.stored.all() and first.permanent is not None and not first.permanent.any()
    again = s.write(lists([1, 2, 4], version=5, seed=1))
    assert again.stale.tolist() == [True, True, False] and again.stored.tolist() == [
        False,
        False,
        True,
    ]
    assert (s.stats.stored, s.stats.stale) == (4, 2)
    assert store.lookup(np.array([1, 2, 3, 4])).found.all()


def test_sink_write_is_one_pass_failed_rows_are_left_to_the_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s, store, _ = sink(retries=5, retry_backoff_s=10.0)
    monkeypatch.setattr("time.sleep", lambda _: pytest.fail("the sink must never sleep"))
    store.fail([2])
    result = s.write(lists([1, 2, 3]))
    assert store.calls["upsert"] == 1
    assert result.failed.tolist() == [False, True, False]
    assert result.stored.tolist() == [True, False, True]
    assert s.stats.failed == 1


def test_sink_reports_permanent_refusals_with_the_query_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s, store, _ = sink()
    store.fail([7, 9], permanent=True, reason="result 13 RECORD_TOO_BIG")
    with caplog.at_level(logging.ERROR, logger="annstream.sink"):
        result = s.write(lists([7, 8, 9]))
    assert result.permanent is not None and result.permanent.tolist() == [True, False, True]
    assert not result.failed.any() and result.stored.tolist() == [False, True, False]
    assert s.stats.refused == 2
    text = caplog.text
    assert "query 7" in text and "query 9" in text and "RECORD_TOO_BIG" in text


def test_sink_raises_store_unavailable_without_claiming_anything() -> None:
    s, store, _ = sink()
    store.go_down("connection refused")
    with pytest.raises(StoreUnavailableError, match="connection refused"):
        s.write(lists([1]))
    assert s.stats.unavailable == 1 and s.stats.stored == 0
    store.heal()
    assert s.write(lists([1])).stored.all()


def test_sink_passes_the_live_ttl() -> None:
    s, store, clock = sink(ttl_s=60)
    s.write(lists([1]))
    clock.now += 59
    assert store.lookup([1]).found.all()
    clock.now += 2
    assert not store.lookup([1]).found.any()


@pytest.mark.parametrize("policy", ["expire", "delete"])
def test_sink_head_exits_follow_the_policy(policy: str) -> None:
    s, store, clock = sink(on_head_exit=policy, exit_ttl_s=30)
    s.write(lists([1, 2, 3]))
    s.head_exits(np.array([1, 3], dtype=np.int64))
    s.head_exits(np.array([], dtype=np.int64))
    found = store.lookup([1, 2, 3]).found.tolist()
    if policy == "expire":
        assert found == [True, True, True] and s.stats.expired == 2
        clock.now += 31
        assert store.lookup([1, 2, 3]).found.tolist() == [False, True, False]
    else:
        assert found == [False, True, False] and s.stats.removed == 2
    assert store.calls["expire"] + store.calls["remove"] == 1


def test_refusal_reason_is_a_short_label_without_free_text() -> None:
    assert refusal_reason("result 13 RECORD_TOO_BIG") == "result_13_record_too_big"
    assert refusal_reason("") == "unknown"
    assert len(refusal_reason("x" * 500)) == 40
