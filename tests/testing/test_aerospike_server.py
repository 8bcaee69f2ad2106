"""The Aerospike test server, exercised with the real `aerospike` client."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import aerospike
import pytest
from aerospike_helpers import expressions as exp
from aerospike_helpers.batch.records import BatchRecords, Write
from aerospike_helpers.operations import operations as op

from annstream.testing.aerospike_server import AerospikeTestServer, Fault, evaluate_filter

NS, SET = "test", "demo"
EXC: Any = aerospike.exception


class Clock:
    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def server() -> Iterator[AerospikeTestServer]:
    with AerospikeTestServer(namespaces=[NS, "other"]) as s:
        yield s


@pytest.fixture
def clock(server: AerospikeTestServer) -> Iterator[Clock]:
    c = Clock()
    server.clock = c
    server.clear()
    yield c
    server.clock = time.time
    server.refuse_ttl = False
    server.clear_faults()


@pytest.fixture(scope="module")
def client(server: AerospikeTestServer) -> Iterator[Any]:
    c = aerospike.client({"hosts": [("127.0.0.1", server.port)]})
    yield c
    c.close()


def test_server_handshake_lists_namespaces_and_build(client: Any) -> None:
    assert client.is_connected()
    node_info = client.info_all("namespaces")
    assert any("test;other" in str(v) for v in node_info.values())


def test_server_put_get_exists_remove(client: Any, clock: Clock) -> None:
    key = (NS, SET, 1)
    client.put(key, {"i": -5, "s": "héllo", "b": b"\x00\x01", "f": 1.5, "l": [1, "a"]})
    _, meta, bins = client.get(key)
    assert bins == {"i": -5, "s": "héllo", "b": b"\x00\x01", "f": 1.5, "l": [1, "a"]}
    assert meta["gen"] == 1
    client.put(key, {"i": 6})
    _, meta, bins = client.get(key)
    assert meta["gen"] == 2 and bins["i"] == 6 and bins["s"] == "héllo"  # update merges bins
    assert client.exists(key)[1] is not None
    client.remove(key)
    assert client.exists(key)[1] is None
    with pytest.raises(EXC.RecordNotFound):
        client.get(key)


def test_server_unknown_namespace_is_refused_by_the_client(client: Any) -> None:
    with pytest.raises(EXC.AerospikeError):
        client.put(("nowhere", SET, 1), {"a": 1})


def test_server_ttl_expires_records_on_the_server_clock(client: Any, clock: Clock) -> None:
    client.put((NS, SET, 1), {"a": 1}, policy={"ttl": 100})
    client.put((NS, SET, 2), {"a": 1}, policy={"ttl": aerospike.TTL_NEVER_EXPIRE})
    _, meta, _ = client.get((NS, SET, 1))
    assert 0 < meta["ttl"] <= 100
    clock.now += 101
    assert client.exists((NS, SET, 1))[1] is None
    assert client.exists((NS, SET, 2))[1] is not None


def test_server_touch_sets_a_new_ttl(client: Any, clock: Clock) -> None:
    client.put((NS, SET, 1), {"a": 1})
    client.touch((NS, SET, 1), 10)
    clock.now += 11
    assert client.exists((NS, SET, 1))[1] is None
    with pytest.raises(EXC.RecordNotFound):
        client.touch((NS, SET, 1), 10)


def test_server_refuse_ttl_answers_forbidden(
    server: AerospikeTestServer, client: Any, clock: Clock
) -> None:
    server.refuse_ttl = True
    with pytest.raises(EXC.ForbiddenError):
        client.put((NS, SET, 1), {"a": 1}, policy={"ttl": 60})
    client.put((NS, SET, 1), {"a": 1}, policy={"ttl": aerospike.TTL_NEVER_EXPIRE})
    client.put((NS, SET, 2), {"a": 1}, policy={"ttl": aerospike.TTL_NAMESPACE_DEFAULT})


def test_server_generation_and_exists_policies(client: Any, clock: Clock) -> None:
    key = (NS, SET, 1)
    client.put(key, {"a": 1}, policy={"exists": aerospike.POLICY_EXISTS_CREATE})
    with pytest.raises(EXC.RecordExistsError):
        client.put(key, {"a": 2}, policy={"exists": aerospike.POLICY_EXISTS_CREATE})
    with pytest.raises(EXC.RecordGenerationError):
        client.put(key, {"a": 3}, meta={"gen": 5}, policy={"gen": aerospike.POLICY_GEN_EQ})
    client.put(key, {"a": 3}, meta={"gen": 1}, policy={"gen": aerospike.POLICY_GEN_EQ})
    with pytest.raises(EXC.RecordNotFound):
        client.put((NS, SET, 2), {"a": 1}, policy={"exists": aerospike.POLICY_EXISTS_UPDATE})
    client.put(key, {"b": 1}, policy={"exists": aerospike.POLICY_EXISTS_REPLACE})
    assert client.get(key)[2] == {"b": 1}


def test_server_filter_expression_on_put_and_get(client: Any, clock: Clock) -> None:
    key = (NS, SET, 1)
    client.put(key, {"v": 5})
    newer = exp.Or(exp.Not(exp.BinExists("v")), exp.LT(exp.IntBin("v"), 4)).compile()
    with pytest.raises(EXC.FilteredOut):
        client.put(key, {"v": 4}, policy={"expressions": newer})
    assert client.get(key)[2] == {"v": 5}
    client.put((NS, SET, 2), {"v": 4}, policy={"expressions": newer})  # absent record passes
    with pytest.raises(EXC.FilteredOut):
        client.get(key, policy={"expressions": exp.Eq(exp.IntBin("v"), 6).compile()})


def test_server_refuses_expressions_it_cannot_evaluate(client: Any, clock: Clock) -> None:
    client.put((NS, SET, 1), {"s": "x"})
    unsupported = exp.Eq(exp.StrBin("s"), "x").compile()
    with pytest.raises(EXC.UnsupportedFeature):
        client.get((NS, SET, 1), policy={"expressions": unsupported})


def test_server_evaluates_unknown_as_filtered_out() -> None:
    # [LT, [BIN, INT, "v"], 3] against a record without "v": unknown, so filtered out.
    expression = bytes([0x93, 0x05, 0x93, 0x51, 0x02, 0xA1]) + b"v" + bytes([0x03])
    assert evaluate_filter(expression, {}) is False
    assert evaluate_filter(expression, {"v": (1, (2).to_bytes(8, "big"))}) is True


def test_server_batch_write_read_remove_and_operate(client: Any, clock: Clock) -> None:
    keys = [(NS, SET, i) for i in range(5)]
    records = BatchRecords(
        [Write(k, [op.write("a", i), op.write("b", b"x")]) for i, k in enumerate(keys)]
    )
    client.batch_write(records)
    assert [r.result for r in records.batch_records] == [0] * 5
    read = client.batch_read([*keys, (NS, SET, 99)])
    assert [r.result for r in read.batch_records] == [0] * 5 + [2]
    assert [r.record[2]["a"] for r in read.batch_records[:5]] == list(range(5))
    removed = client.batch_remove(keys[:2])
    assert [r.result for r in removed.batch_records] == [0, 0]
    touched = client.batch_operate(keys, [op.touch()], ttl=5)
    assert [r.result for r in touched.batch_records] == [2, 2, 0, 0, 0]
    clock.now += 6
    assert [r.result for r in client.batch_read(keys).batch_records] == [2] * 5


def test_server_batch_write_with_filter_per_record(client: Any, clock: Clock) -> None:
    client.put((NS, SET, 1), {"v": 9})
    guard = exp.Or(exp.Not(exp.BinExists("v")), exp.LT(exp.IntBin("v"), 5)).compile()
    records = BatchRecords(
        [Write((NS, SET, i), [op.write("v", 5)], policy={"expressions": guard}) for i in (1, 2)]
    )
    client.batch_write(records)
    assert [r.result for r in records.batch_records] == [27, 0]


def test_server_faults_fail_or_drop_selected_records(
    server: AerospikeTestServer, client: Any, clock: Clock
) -> None:
    digest = bytes(aerospike.calc_digest(NS, SET, 2))
    server.inject(Fault(frozenset({digest}), result=14, times=1))
    records = BatchRecords([Write((NS, SET, i), [op.write("a", 1)]) for i in (1, 2)])
    client.batch_write(records)
    assert [r.result for r in records.batch_records] == [0, 14]
    server.inject(Fault(frozenset({digest}), apply=True, drop=True, times=1))
    with pytest.raises(EXC.AerospikeError):
        client.put((NS, SET, 2), {"a": 2}, policy={"max_retries": 0})
    assert client.get((NS, SET, 2))[2] == {"a": 2}  # applied although the reply was lost
