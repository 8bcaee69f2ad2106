"""The serving reader and `annstream lookup`, over both stores."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pytest

from annstream.cli import main
from annstream.serving import NeighbourReader, exclude
from annstream.store import NeighbourLists

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
