"""An in-memory Aerospike wire-protocol server for tests, spoken to by the real `aerospike` client.

It implements what annstream's neighbour store uses and nothing more: the info handshake,
single-record get / put / remove / exists / touch, batch read / write / remove / operate,
TTL (void times), generations, the record-exists and generation write policies, and filter
expressions built from comparisons, and/or/not, integer bins and bin types. Anything else is
refused with result 16 (unsupported) so a test fails loudly instead of passing on a
convenience a real server does not offer.

It answers like a real CE 8.1 server (see ../shared/notes/aerospike.md and the server source,
as/src/transaction/write.c) where the store's error handling depends on it, in the real
server's order of checks:
- a write to a namespace past stop-writes answers 8 (`Namespace.stop_writes`; deletes and
  reads go on);
- the set name is stored with the record: a read, write or delete naming another set at the
  same digest answers 4 (a write without a set to a record in a set, too);
- a filter expression is not applied to a write that creates the record (an absent or expired
  record); on an existing record a failing filter answers 27 and changes nothing;
- a TTL above 315,360,000 s (10 years) answers 4; a namespace without nsup-period
  (`Namespace.refuse_ttl`) answers a write carrying a TTL with 22;
- a record over the namespace's `max-record-size` (1 MiB by default) answers 13; its size is
  the real server's flat-record size to within a few dozen bytes.

Run by hand: `python -m annstream.testing.aerospike_server --port 3000 [--refuse-ttl NS]`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import logging
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from annstream.errors import StoreError

__all__ = [
    "ENV_REAL_SERVER",
    "MAX_RECORD_SIZE",
    "MAX_TTL",
    "AerospikeTestServer",
    "Fault",
    "Namespace",
    "child_server",
    "external_server",
    "main",
]

logger = logging.getLogger(__name__)

CITRUSLEAF_EPOCH = 1_262_304_000
MSG_HEADER = struct.Struct(">BBBBBBIIIHH")
PROTO_INFO, PROTO_MSG, PROTO_COMPRESSED = 1, 3, 4

# info1 / info2 / info3 flags
INFO1_READ, INFO1_GET_ALL, INFO1_BATCH, INFO1_NOBINDATA = 0x01, 0x02, 0x08, 0x20
INFO2_WRITE, INFO2_DELETE, INFO2_GEN, INFO2_GEN_GT = 0x01, 0x02, 0x04, 0x08
INFO2_CREATE_ONLY, INFO2_RESPOND_ALL_OPS = 0x20, 0x80
INFO3_LAST, INFO3_UPDATE_ONLY, INFO3_CREATE_OR_REPLACE, INFO3_REPLACE_ONLY = 0x01, 0x08, 0x10, 0x20

FIELD_NAMESPACE, FIELD_SET, FIELD_KEY, FIELD_DIGEST = 0, 1, 2, 4
FIELD_BATCH_INDEX, FIELD_BATCH_INDEX_WITH_SET, FIELD_FILTER_EXP = 41, 42, 43
FIELD_SOCKET_TIMEOUT = 9

OP_READ, OP_WRITE, OP_TOUCH = 1, 2, 11
PARTICLE_NIL, PARTICLE_INT = 0, 1

OK, NOT_FOUND, GENERATION_ERROR, PARAMETER_ERROR, KEY_EXISTS = 0, 2, 3, 4, 5
SERVER_FULL, RECORD_TOO_BIG = 8, 13
UNSUPPORTED, NAMESPACE_NOT_FOUND, FORBIDDEN, FILTERED_OUT = 16, 20, 22, 27

BATCH_REPEAT, BATCH_INFO, BATCH_GEN, BATCH_TTL, BATCH_INFO4 = 0x01, 0x02, 0x04, 0x08, 0x10

TTL_NEVER, TTL_DONT_UPDATE = 0xFFFF_FFFF, 0xFFFF_FFFE
MAX_TTL = 315_360_000  # 10 years (MAX_ALLOWED_TTL in the server)
MAX_RECORD_SIZE = 1 << 20  # CE 8.1 default max-record-size


ENV_REAL_SERVER = "ANNSTREAM_TEST_AEROSPIKE"


def external_server(env: dict[str, str] | None = None) -> tuple[str, int, str] | None:
    """(host, port, namespace) of a real server to test against, from
    `ANNSTREAM_TEST_AEROSPIKE=host:port[/namespace]` (namespace `test` by default)."""
    value = (os.environ if env is None else env).get(ENV_REAL_SERVER, "").strip()
    if not value:
        return None
    address, _, namespace = value.partition("/")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{ENV_REAL_SERVER}={value!r}: expected host:port[/namespace]")
    return host, int(port), namespace or "test"


class Unsupported(Exception):
    """A request uses a feature the test server does not implement (result 16)."""


@dataclass
class Record:
    bins: dict[str, tuple[int, bytes]]
    generation: int = 1
    void_time: int = 0  # seconds since the citrusleaf epoch; 0 = never expires
    set_name: str = ""
    user_key: bytes | None = None


@dataclass
class Namespace:
    """One namespace and the conditions a test may set on it, each answered like a real one."""

    name: str
    refuse_ttl: bool = False  # no nsup-period: a write carrying a TTL answers 22
    stop_writes: bool = False  # past stop-writes (memory full): every write answers 8
    max_record_size: int = MAX_RECORD_SIZE  # larger records answer 13
    default_ttl: int = 0


def record_size(bins: dict[str, tuple[int, bytes]], set_name: str, key: bytes | None) -> int:
    """Bytes of a record in the server's flat format (as_flat_record_size + end mark).

    Header with digest, generation and times, void time, set name, stored key, bin count,
    then per bin its name and particle (type, size, data; 8 bytes for an int).
    """
    size = 40 + 4 + (1 + len(set_name) if set_name else 0) + (5 + len(key) if key else 0) + 1
    for name, (ptype, value) in bins.items():
        size += 1 + len(name.encode()) + (1 + 8 if ptype == PARTICLE_INT else 1 + 4 + len(value))
    return size + 4


@dataclass
class Fault:
    """An injected failure: requests on `digests` answer `result` (`apply` still writes first).

    `drop=True` closes the connection without a reply instead (the client sees a timeout
    or a socket error, the write may or may not have happened: in doubt). Faults hit writes
    (and deletes, touches) only unless `reads=True`.
    """

    digests: frozenset[bytes]
    result: int = 14
    apply: bool = False
    drop: bool = False
    times: int | None = None
    reads: bool = False


@dataclass
class Msg:
    info1: int
    info2: int
    info3: int
    generation: int
    record_ttl: int
    fields: dict[int, bytes]
    ops: list[tuple[int, int, str, bytes]] = field(default_factory=list)


class _Drop(Exception):
    """Close the connection without answering (fault injection)."""


# --- msgpack (only what filter expressions contain) -------------------------------------


def _unpack_msgpack(data: bytes, pos: int = 0) -> tuple[Any, int]:
    b = data[pos]
    pos += 1
    if b <= 0x7F:
        return b, pos
    if b >= 0xE0:
        return b - 0x100, pos
    if 0x90 <= b <= 0x9F:
        return _unpack_array(data, pos, b & 0x0F)
    if 0xA0 <= b <= 0xBF:
        n = b & 0x1F
        return data[pos : pos + n], pos + n
    if b == 0xC0:
        return None, pos
    if b in (0xC2, 0xC3):
        return b == 0xC3, pos
    fixed = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h"}
    fixed |= {0xD2: ">i", 0xD3: ">q", 0xCA: ">f", 0xCB: ">d"}
    if b in fixed:
        st = struct.Struct(fixed[b])
        return st.unpack_from(data, pos)[0], pos + st.size
    if b in (0xD9, 0xDA, 0xDB, 0xC4, 0xC5, 0xC6):
        width = {0xD9: 1, 0xC4: 1, 0xDA: 2, 0xC5: 2, 0xDB: 4, 0xC6: 4}[b]
        n = int.from_bytes(data[pos : pos + width], "big")
        pos += width
        return data[pos : pos + n], pos + n
    if b in (0xDC, 0xDD):
        width = 2 if b == 0xDC else 4
        n = int.from_bytes(data[pos : pos + width], "big")
        return _unpack_array(data, pos + width, n)
    raise Unsupported(f"msgpack type 0x{b:02x} in a filter expression")


def _unpack_array(data: bytes, pos: int, n: int) -> tuple[list[Any], int]:
    out = []
    for _ in range(n):
        item, pos = _unpack_msgpack(data, pos)
        out.append(item)
    return out, pos


# --- filter expressions ------------------------------------------------------------------

_UNKNOWN = object()
EXP_CMP = {1: "eq", 2: "ne", 3: "gt", 4: "ge", 5: "lt", 6: "le"}
EXP_AND, EXP_OR, EXP_NOT, EXP_BIN, EXP_BIN_TYPE = 16, 17, 18, 81, 82
EXP_TYPE_INT = 2


def _bin_name(raw: Any) -> str:
    if not isinstance(raw, bytes):
        raise Unsupported("bin name in a filter expression is not a string")
    return raw.decode()


def _evaluate(node: Any, bins: dict[str, tuple[int, bytes]]) -> Any:
    """Value of one expression node: int, bool or _UNKNOWN (a missing or mistyped bin)."""
    if isinstance(node, bool | int):
        return node
    if not isinstance(node, list) or not node:
        raise Unsupported(f"filter expression node {node!r}")
    op = node[0]
    if op in EXP_CMP and len(node) == 3:
        a, b = _evaluate(node[1], bins), _evaluate(node[2], bins)
        if a is _UNKNOWN or b is _UNKNOWN:
            return _UNKNOWN
        return {
            "eq": a == b, "ne": a != b, "gt": a > b, "ge": a >= b, "lt": a < b, "le": a <= b,
        }[EXP_CMP[op]]  # fmt: skip
    if op in (EXP_AND, EXP_OR):
        values = [_evaluate(arg, bins) for arg in node[1:]]
        decisive = op == EXP_OR
        if decisive in values:
            return decisive
        return _UNKNOWN if _UNKNOWN in values else not decisive
    if op == EXP_NOT and len(node) == 2:
        value = _evaluate(node[1], bins)
        return _UNKNOWN if value is _UNKNOWN else not value
    if op == EXP_BIN and len(node) == 3 and node[1] == EXP_TYPE_INT:
        stored = bins.get(_bin_name(node[2]))
        if stored is None or stored[0] != PARTICLE_INT:
            return _UNKNOWN
        return struct.unpack(">q", stored[1])[0]
    if op == EXP_BIN_TYPE and len(node) == 2:
        stored = bins.get(_bin_name(node[1]))
        return PARTICLE_NIL if stored is None else stored[0]
    raise Unsupported(f"filter expression op {op!r} (arity {len(node) - 1})")


def evaluate_filter(expression: bytes, bins: dict[str, tuple[int, bytes]]) -> bool:
    """True when the record passes; an unknown result filters it out, as on a real server."""
    tree, _ = _unpack_msgpack(expression)
    return _evaluate(tree, bins) is True


# --- wire parsing ------------------------------------------------------------------------


def _parse_fields_ops(body: bytes, pos: int, n_fields: int, n_ops: int) -> tuple[Msg, int]:
    fields: dict[int, bytes] = {}
    for _ in range(n_fields):
        (size,) = struct.unpack_from(">I", body, pos)
        fields[body[pos + 4]] = body[pos + 5 : pos + 4 + size]
        pos += 4 + size
    ops: list[tuple[int, int, str, bytes]] = []
    for _ in range(n_ops):
        size, op, ptype, _ver, nlen = struct.unpack_from(">IBBBB", body, pos)
        name = body[pos + 8 : pos + 8 + nlen].decode()
        ops.append((op, ptype, name, body[pos + 8 + nlen : pos + 4 + size]))
        pos += 4 + size
    return Msg(0, 0, 0, 0, 0, fields, ops), pos


def parse_message(body: bytes) -> tuple[Msg, int, int]:
    hsz, i1, i2, i3, _i4, _res, gen, rttl, _tttl, n_fields, n_ops = MSG_HEADER.unpack_from(body)
    msg, _ = _parse_fields_ops(body, hsz, n_fields, n_ops)
    msg.info1, msg.info2, msg.info3, msg.generation, msg.record_ttl = i1, i2, i3, gen, rttl
    return msg, n_fields, n_ops


def encode_reply(
    result: int,
    record: Record | None = None,
    bins: Iterable[tuple[str, int, bytes]] = (),
    *,
    index: int = 0,
    info3: int = 0,
) -> bytes:
    ops = b"".join(
        struct.pack(">IBBBB", 4 + len(n.encode()) + len(v), OP_READ, t, 0, len(n.encode()))
        + n.encode()
        + v
        for n, t, v in bins
    )
    n_ops = sum(1 for _ in bins) if not isinstance(bins, list) else len(bins)
    gen = record.generation if record else 0
    void = record.void_time if record else 0
    header = MSG_HEADER.pack(22, 0, 0, info3, 0, result, gen, void, index, 0, n_ops)
    return header + ops


def frame(ptype: int, body: bytes) -> bytes:
    return struct.pack(">Q", (2 << 56) | (ptype << 48) | len(body)) + body


class AerospikeTestServer:
    """Serve the Aerospike protocol from memory on a loopback port, in a background thread."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        namespaces: Iterable[str | Namespace] = ("test",),
        clock: Callable[[], float] = time.time,
        node_name: str = "BB9A0E5C1D2F3A4",
        build: str = "8.1.0.0",
    ) -> None:
        self.host = host
        self.port = port
        self.namespaces: dict[str, Namespace] = {}
        for ns in namespaces:
            spec = ns if isinstance(ns, Namespace) else Namespace(ns)
            self.namespaces[spec.name] = spec
        self._initial = {name: dataclasses.replace(ns) for name, ns in self.namespaces.items()}
        self.clock = clock
        self.node_name = node_name
        self.build = build
        self.requests = 0
        self._data: dict[str, dict[bytes, Record]] = {ns: {} for ns in self.namespaces}
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._writers: set[asyncio.StreamWriter] = set()

    # --- lifecycle ---
    def start(self) -> AerospikeTestServer:
        self._thread = threading.Thread(target=self._run, name="aerospike-test-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("aerospike test server did not start within 10 s")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(self._shutdown)
        thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> AerospikeTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url_host(self) -> str:
        return f"{self.host}:{self.port}"

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._server = loop.run_until_complete(
            asyncio.start_server(self._serve, self.host, self.port)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _shutdown(self) -> None:
        assert self._server is not None and self._loop is not None
        self._server.close()
        for w in list(self._writers):
            w.close()
        self._loop.call_later(0.05, self._loop.stop)

    # --- inspection and fault injection (thread-safe) ---
    def inject(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        """Drop injected faults and reset every namespace's conditions to a healthy one."""
        with self._lock:
            self._faults.clear()
            for name, ns in self.namespaces.items():
                vars(ns).update(vars(self._initial[name]))

    def namespace(self, name: str = "test") -> Namespace:
        """The settings of one namespace, e.g. `server.namespace("test").stop_writes = True`."""
        return self.namespaces[name]

    def record_count(self, namespace: str = "test") -> int:
        with self._lock:
            now = self._now()
            return sum(1 for r in self._data[namespace].values() if not self._expired(r, now))

    def clear(self) -> None:
        with self._lock:
            for records in self._data.values():
                records.clear()

    def _fault_for(self, digest: bytes, write: bool) -> Fault | None:
        for fault in self._faults:
            if not (write or fault.reads):
                continue
            if digest in fault.digests and (fault.times is None or fault.times > 0):
                if fault.times is not None:
                    fault.times -= 1
                return fault
        return None

    # --- connection handling ---
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                header = await reader.readexactly(8)
                (word,) = struct.unpack(">Q", header)
                ptype, length = (word >> 48) & 0xFF, word & 0xFFFF_FFFF_FFFF
                body = await reader.readexactly(length)
                if ptype == PROTO_COMPRESSED:
                    inner = zlib.decompress(body[8:])
                    ptype, body = (struct.unpack(">Q", inner[:8])[0] >> 48) & 0xFF, inner[8:]
                if ptype == PROTO_INFO:
                    writer.write(frame(PROTO_INFO, self._info(body.decode())))
                elif ptype == PROTO_MSG:
                    with self._lock:
                        self.requests += 1
                        reply = self._message(body)
                    writer.write(frame(PROTO_MSG, reply))
                else:
                    logger.warning("unsupported proto type %d; closing connection", ptype)
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, _Drop):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def _info(self, request: str) -> bytes:
        bitmap = base64.b64encode(b"\xff" * 512).decode()
        values = {
            "node": self.node_name,
            "partition-generation": "1",
            "rebalance-generation": "1",
            "peers-generation": "1",
            "build": self.build,
            "peers-clear-std": "1,,[]",
            "peers-tls-std": "1,,[]",
            "replicas": ";".join(f"{ns}:0,1,{bitmap}" for ns in self.namespaces),
            "rack-ids": ";".join(f"{ns}:0" for ns in self.namespaces),
            "service-clear-std": f"{self.host}:{self.port}",
            "namespaces": ";".join(self.namespaces),
            "features": "batch-any;batch-index;pscans;pquery;query-show;relaxed-sc",
            "version": "Aerospike Community Edition build " + self.build,
            "edition": "Aerospike Community Edition",
        }
        names = [n for n in request.split("\n") if n]
        if not names:
            return "".join(f"{k}\t{v}\n" for k, v in values.items()).encode()
        return "".join(f"{n}\t{values.get(n, '')}\n" for n in names).encode()

    # --- AS_MSG ---
    def _now(self) -> int:
        return int(self.clock()) - CITRUSLEAF_EPOCH

    @staticmethod
    def _expired(record: Record, now: int) -> bool:
        return record.void_time != 0 and record.void_time <= now

    def _message(self, body: bytes) -> bytes:
        msg, _, _ = parse_message(body)
        if msg.info1 & INFO1_BATCH or FIELD_BATCH_INDEX in msg.fields:
            return self._batch(msg)
        if FIELD_BATCH_INDEX_WITH_SET in msg.fields:
            return encode_reply(UNSUPPORTED, info3=INFO3_LAST)
        ns = msg.fields.get(FIELD_NAMESPACE, b"").decode()
        digest = msg.fields.get(FIELD_DIGEST, b"")
        result, record, bins = self._execute(msg, ns, digest, msg.fields.get(FIELD_FILTER_EXP))
        return encode_reply(result, record, bins)

    def _batch(self, msg: Msg) -> bytes:
        data = msg.fields.get(FIELD_BATCH_INDEX)
        if data is None:
            return encode_reply(UNSUPPORTED, info3=INFO3_LAST)
        parent_filter = msg.fields.get(FIELD_FILTER_EXP)
        (count,) = struct.unpack_from(">I", data)
        pos = 5
        out: list[bytes] = []
        previous: Msg | None = None
        for _ in range(count):
            index = struct.unpack_from(">I", data, pos)[0]
            digest = data[pos + 4 : pos + 24]
            kind = data[pos + 24]
            pos += 25
            if kind == BATCH_REPEAT:
                if previous is None:
                    return encode_reply(PARAMETER_ERROR, info3=INFO3_LAST)
                row = previous
            else:
                info1, info2, info3, gen, ttl = 0, 0, 0, 0, 0
                if kind & BATCH_INFO:
                    info1, info2, info3 = data[pos], data[pos + 1], data[pos + 2]
                    pos += 3
                else:
                    info1 = data[pos]
                    pos += 1
                if kind & BATCH_INFO4:
                    pos += 1
                if kind & BATCH_GEN:
                    (gen,) = struct.unpack_from(">H", data, pos)
                    pos += 2
                if kind & BATCH_TTL:
                    (ttl,) = struct.unpack_from(">I", data, pos)
                    pos += 4
                n_fields, n_ops = struct.unpack_from(">HH", data, pos)
                row, pos = _parse_fields_ops(data, pos + 4, n_fields, n_ops)
                row.info1, row.info2, row.info3, row.generation, row.record_ttl = (
                    info1, info2, info3, gen, ttl,
                )  # fmt: skip
                previous = row
            ns = row.fields.get(FIELD_NAMESPACE, b"").decode()
            exp = row.fields.get(FIELD_FILTER_EXP, parent_filter)
            try:
                result, record, bins = self._execute(row, ns, digest, exp)
            except _Drop:
                raise
            out.append(encode_reply(result, record, bins, index=index))
        out.append(encode_reply(OK, info3=INFO3_LAST))
        return b"".join(out)

    def _execute(
        self, msg: Msg, ns: str, digest: bytes, exp: bytes | None
    ) -> tuple[int, Record | None, list[tuple[str, int, bytes]]]:
        if ns not in self.namespaces:
            return NAMESPACE_NOT_FOUND, None, []
        if len(digest) != 20:
            return PARAMETER_ERROR, None, []
        fault = self._fault_for(digest, bool(msg.info2 & (INFO2_WRITE | INFO2_DELETE)))
        if fault is not None and not fault.apply:
            if fault.drop:
                raise _Drop
            return fault.result, None, []
        try:
            outcome = self._apply(msg, self.namespaces[ns], digest, exp)
        except Unsupported as exc:
            logger.warning("aerospike test server refused a request: %s", exc)
            return UNSUPPORTED, None, []
        if fault is not None:
            if fault.drop:
                raise _Drop
            return fault.result, None, []
        return outcome

    def _apply(
        self, msg: Msg, ns: Namespace, digest: bytes, exp: bytes | None
    ) -> tuple[int, Record | None, list[tuple[str, int, bytes]]]:
        records = self._data[ns.name]
        now = self._now()
        record = records.get(digest)
        msg_set = msg.fields.get(FIELD_SET, b"").decode()
        delete = bool(msg.info2 & INFO2_DELETE)
        if msg.info2 & INFO2_WRITE and not delete:
            return self._write(msg, ns, records, digest, record, msg_set, exp, now)
        if record is None:
            return NOT_FOUND, None, []
        # reads and deletes: a set name, when sent, must match (checked before expiry)
        if msg_set and msg_set != record.set_name:
            return PARAMETER_ERROR, record, []
        if self._expired(record, now):
            del records[digest]
            return NOT_FOUND, None, []
        if exp is not None and not evaluate_filter(exp, record.bins):
            return FILTERED_OUT, record, []
        if delete:
            if msg.ops:
                raise Unsupported("delete with ops")
            del records[digest]
            return OK, None, []
        if not msg.info1 & INFO1_READ:
            raise Unsupported(f"message with info1={msg.info1:#x} info2={msg.info2:#x}")
        if msg.info1 & INFO1_NOBINDATA:
            return OK, record, []
        if msg.info1 & INFO1_GET_ALL:
            return OK, record, [(n, t, v) for n, (t, v) in record.bins.items()]
        bins = []
        for op, _t, name, _v in msg.ops:
            if op != OP_READ:
                raise Unsupported(f"op {op} in a read")
            if name in record.bins:
                bins.append((name, *record.bins[name]))
        return OK, record, bins

    def _write(
        self,
        msg: Msg,
        ns: Namespace,
        records: dict[bytes, Record],
        digest: bytes,
        record: Record | None,
        msg_set: str,
        exp: bytes | None,
        now: int,
    ) -> tuple[int, Record | None, list[tuple[str, int, bytes]]]:
        """A write in the real server's order of checks (write_master in write.c)."""
        if ns.stop_writes:
            return SERVER_FULL, None, []
        if record is not None and self._expired(record, now):
            del records[digest]  # an expired record is written as a fresh create
            record = None
        if msg.info2 & INFO2_CREATE_ONLY and record is not None:
            return KEY_EXISTS, record, []
        if msg.info3 & (INFO3_UPDATE_ONLY | INFO3_REPLACE_ONLY) and record is None:
            return NOT_FOUND, None, []
        touch_only = all(op == OP_TOUCH for op, *_ in msg.ops)
        if touch_only and record is None:
            return NOT_FOUND, None, []
        if msg.info2 & INFO2_GEN and (record.generation if record else 0) != msg.generation:
            return GENERATION_ERROR, record, []
        if msg.info2 & INFO2_GEN_GT and (record.generation if record else 0) >= msg.generation:
            return GENERATION_ERROR, record, []
        if record is not None and msg_set != record.set_name:
            return PARAMETER_ERROR, record, []
        # the filter applies to existing records only: a write that creates one ignores it
        if record is not None and exp is not None and not evaluate_filter(exp, record.bins):
            return FILTERED_OUT, record, []
        ttl = msg.record_ttl
        if ttl == TTL_DONT_UPDATE and record is None:
            ttl = 0
        if ttl > MAX_TTL and ttl not in (TTL_NEVER, TTL_DONT_UPDATE):
            logger.warning("aerospike test server: invalid ttl %d", ttl)
            return PARAMETER_ERROR, record, []
        ttl = ns.default_ttl if ttl == 0 else ttl
        if ttl not in (0, TTL_NEVER, TTL_DONT_UPDATE) and ns.refuse_ttl:
            return FORBIDDEN, record, []
        replace = msg.info3 & (INFO3_CREATE_OR_REPLACE | INFO3_REPLACE_ONLY)
        bins = {} if record is None or replace else dict(record.bins)
        reply: list[tuple[str, int, bytes]] = []
        for op, ptype, name, value in msg.ops:
            if op == OP_WRITE:
                if ptype == PARTICLE_NIL:
                    bins.pop(name, None)
                else:
                    bins[name] = (ptype, value)
            elif op == OP_READ:
                if name in bins:
                    reply.append((name, *bins[name]))
                continue
            elif op != OP_TOUCH:
                raise Unsupported(f"write op {op}")
            if msg.info2 & INFO2_RESPOND_ALL_OPS:
                reply.append((name, PARTICLE_NIL, b""))
        if not bins:
            records.pop(digest, None)
            return OK, None, reply
        set_name = record.set_name if record is not None else msg_set
        user_key = msg.fields.get(FIELD_KEY, record.user_key if record else None)
        if record_size(bins, set_name, user_key) > ns.max_record_size:
            return RECORD_TOO_BIG, record, []
        if ttl == TTL_DONT_UPDATE:
            void = record.void_time if record else 0
        else:
            void = 0 if ttl in (0, TTL_NEVER) else now + ttl
        generation = 1 if record is None else record.generation % 0xFFFF + 1
        new = Record(bins, generation, void, set_name, user_key)
        records[digest] = new
        return OK, new, reply


@contextlib.contextmanager
def child_server() -> Iterator[str]:
    """A test server in a child process (its protocol work does not share the caller's GIL);
    yields its `host:port`."""
    with subprocess.Popen(
        [sys.executable, "-m", "annstream.testing.aerospike_server", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if not line.startswith("aerospike test server on "):
                raise StoreError(f"the Aerospike test server did not start: {line!r}")
            yield line.rsplit(" ", 1)[1]
        finally:
            proc.terminate()
            proc.wait(10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--namespace", action="append", default=None)
    parser.add_argument(
        "--refuse-ttl",
        action="append",
        default=[],
        metavar="NAMESPACE",
        help="this namespace answers writes carrying a TTL with 22 (no nsup-period)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    names = args.namespace or ["test"]
    server = AerospikeTestServer(
        args.host,
        args.port,
        namespaces=[Namespace(n, refuse_ttl=n in args.refuse_ttl) for n in names],
    )
    server.start()
    print(f"aerospike test server on {server.url_host}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)
    server.stop()


if __name__ == "__main__":
    main()
