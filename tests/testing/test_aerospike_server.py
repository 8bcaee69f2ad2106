"""The Aerospike test server, exercised with the real `aerospike` client."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aerospike
import pytest
from aerospike_helpers import expressions as exp
from aerospike_helpers.batch.records import BatchRecords, Write
from aerospike_helpers.operations import operations as op

from annstream.testing.aerospike_server import (
    ENV_REAL_SERVER,
    AerospikeTestServer,
    Fault,
    evaluate_filter,
    external_server,
)

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


def test_server_refuses_ttl_per_namespace(
    server: AerospikeTestServer, client: Any, clock: Clock
) -> None:
    server.namespace(NS).refuse_ttl = True
    with pytest.raises(EXC.ForbiddenError):
        client.put((NS, SET, 1), {"a": 1}, policy={"ttl": 60})
    client.put((NS, SET, 1), {"a": 1}, policy={"ttl": aerospike.TTL_NEVER_EXPIRE})
    client.put((NS, SET, 2), {"a": 1}, policy={"ttl": aerospike.TTL_NAMESPACE_DEFAULT})
    with pytest.raises(EXC.ForbiddenError):
        client.touch((NS, SET, 1), 60)
    client.put(("other", SET, 1), {"a": 1}, policy={"ttl": 60})  # a namespace with nsup-period


def test_server_past_stop_writes_answers_8_to_writes_only(
    server: AerospikeTestServer, client: Any, clock: Clock
) -> None:
    client.put((NS, SET, 1), {"a": 1})
    server.namespace(NS).stop_writes = True
    with pytest.raises(EXC.ServerFull):
        client.put((NS, SET, 2), {"a": 1})
    with pytest.raises(EXC.ServerFull):
        client.touch((NS, SET, 1), 60)
    records = BatchRecords([Write((NS, SET, i), [op.write("a", 2)]) for i in (1, 3)])
    client.batch_write(records)
    assert [r.result for r in records.batch_records] == [8, 8]
    assert client.get((NS, SET, 1))[2] == {"a": 1}  # reads go on
    client.put(("other", SET, 1), {"a": 1})  # other namespaces are not full
    client.remove((NS, SET, 1))  # deletes go on: they free space
    server.clear_faults()
    client.put((NS, SET, 2), {"a": 1})


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


# ---- behaviour shared with a real server ----------------------------------------------------
# These run against the test server and, with ANNSTREAM_TEST_AEROSPIKE=host:port[/namespace],
# against a real one too: the test server must answer as the real server does.


@dataclass
class Target:
    client: Any
    namespace: str
    set_name: str

    def key(self, user_key: int, set_name: str | None = None) -> tuple[Any, ...]:
        return (self.namespace, set_name or self.set_name, user_key)

    def foreign_key(self, user_key: int, set_name: str) -> tuple[Any, ...]:
        """A key of another set at the digest of `key(user_key)`."""
        digest = aerospike.calc_digest(self.namespace, self.set_name, user_key)
        return (self.namespace, set_name, None, digest)


@pytest.fixture(params=["test-server", "real-server"])
def target(
    request: pytest.FixtureRequest, server: AerospikeTestServer, client: Any
) -> Iterator[Target]:
    if request.param == "test-server":
        server.clear()
        yield Target(client, NS, SET)
        server.clear_faults()
        return
    real = external_server()
    if real is None:
        pytest.skip(f"set {ENV_REAL_SERVER}=host:port[/namespace] to compare with a real server")
    host, port, namespace = real
    real_client = aerospike.client({"hosts": [(host, port)]})
    name = f"ts_{uuid.uuid4().hex[:12]}"
    try:
        yield Target(real_client, namespace, name)
    finally:
        for used in (name, f"{name}_b"):
            real_client.truncate(namespace, used, 0)
        real_client.close()


def test_any_server_set_name_mismatch_at_a_digest_answers_4(target: Target) -> None:
    c = target.client
    c.put(target.key(1), {"a": 1})
    c.put(target.key(2), {"a": 2})
    other = f"{target.set_name}_b"
    with pytest.raises(EXC.InvalidRequest):
        c.get(target.foreign_key(1, other))
    with pytest.raises(EXC.InvalidRequest):
        c.put(target.foreign_key(1, other), {"a": 9})
    with pytest.raises(EXC.InvalidRequest):
        c.remove(target.foreign_key(1, other))
    read = c.batch_read([target.foreign_key(1, other), target.key(2)])
    assert [r.result for r in read.batch_records] == [4, 0]
    writes = BatchRecords(
        [Write(k, [op.write("a", 3)]) for k in (target.foreign_key(1, other), target.key(2))]
    )
    c.batch_write(writes)
    assert [r.result for r in writes.batch_records] == [4, 0]
    # without a set name a read is allowed, a write is not
    digest = aerospike.calc_digest(target.namespace, target.set_name, 1)
    assert c.get((target.namespace, None, None, digest))[2] == {"a": 1}
    with pytest.raises(EXC.InvalidRequest):
        c.put((target.namespace, None, None, digest), {"a": 9})
    assert c.get(target.key(1))[2] == {"a": 1}


def test_any_server_record_over_one_mib_answers_13(target: Target) -> None:
    c = target.client
    with pytest.raises(EXC.RecordTooBig):
        c.put(target.key(1), {"b": b"x" * (1 << 20)})
    assert c.exists(target.key(1))[1] is None
    c.put(target.key(1), {"b": b"x" * ((1 << 20) - 1024)})  # just under the default limit
    with pytest.raises(EXC.RecordTooBig):
        c.put(target.key(1), {"c": b"y" * 2048})  # an update that grows it past the limit
    assert c.get(target.key(1))[1]["gen"] == 1


def test_any_server_ttl_above_ten_years_answers_4(target: Target) -> None:
    c = target.client
    with pytest.raises(EXC.InvalidRequest):
        c.put(target.key(1), {"a": 1}, policy={"ttl": 315_360_001})
    c.put(target.key(1), {"a": 1}, policy={"ttl": 315_360_000})
    with pytest.raises(EXC.InvalidRequest):
        c.touch(target.key(1), 315_360_001)


def test_any_server_filter_skips_creates_and_guards_updates(target: Target) -> None:
    c = target.client
    never = {"expressions": exp.Eq(exp.IntBin("v"), 6).compile()}  # false for any record here
    c.put(target.key(1), {"v": 5}, policy=never)  # creating the record: the filter is not applied
    assert c.get(target.key(1))[2] == {"v": 5}
    with pytest.raises(EXC.FilteredOut):
        c.put(target.key(1), {"v": 7}, policy=never)
    _, meta, bins = c.get(target.key(1))
    assert bins == {"v": 5} and meta["gen"] == 1
    writes = BatchRecords([Write(target.key(i), [op.write("v", 8)], policy=never) for i in (1, 2)])
    c.batch_write(writes)
    assert [r.result for r in writes.batch_records] == [27, 0]
