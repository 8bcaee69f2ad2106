"""`annstream bench store`: stored and stale counted apart, and a failed run exits non-zero."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from annstream.cli import main
from annstream.testing.aerospike_server import AerospikeTestServer

if TYPE_CHECKING:
    from tests.store.conftest import AerospikeTarget

SMALL = ["--records", "300", "--batch", "100", "--single", "20", "--k", "10", "--margin", "2"]


def _bench(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code = main(["bench", "store", "--json", *SMALL, *args])
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture(params=["sqlite", "aerospike"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bench.db'}"
    target: AerospikeTarget = request.getfixturevalue("aerospike_target")
    return target.url(request.getfixturevalue("set_name"))


def test_bench_store_rerun_on_an_existing_set_stores_again(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for _ in range(2):
        code, result = _bench(capsys, "--store", store_url)
        assert code == 0 and result["ok"] is True, result
        assert result["upsert_stored"] == 300 and result["upsert_stale"] == 0
        assert result["replay_stale"] == 300 and result["replay_stored"] == 0
        assert result["found"] == 300 and result["single_found"] == 20
        assert result["upserts_per_s"] > 0


def test_bench_store_on_a_full_server_fails_and_exits_non_zero(
    aerospike_server: AerospikeTestServer, capsys: pytest.CaptureFixture[str]
) -> None:
    aerospike_server.clear()
    aerospike_server.namespace("test").stop_writes = True
    try:
        code, result = _bench(capsys, "--store", f"aerospike://{aerospike_server.url_host}/test/nb")
    finally:
        aerospike_server.clear_faults()
    assert code == 1 and result["ok"] is False
    assert "result 8 SERVER_FULL" in result["error"]


def test_bench_store_with_rows_refused_for_good_fails(
    aerospike_server: AerospikeTestServer, capsys: pytest.CaptureFixture[str]
) -> None:
    aerospike_server.clear()
    code, result = _bench(capsys, "--store", f"aerospike://{aerospike_server.url_host}/test/nb",
                          "--k", "60000", "--margin", "40000", "--records", "2", "--batch", "2",
                          "--single", "1")  # fmt: skip
    assert code == 1 and result["ok"] is False
    assert result["upsert_permanent"] == 2 and result["upserts_per_s"] == 0.0
    assert "RECORD_TOO_BIG" in result["error"]
