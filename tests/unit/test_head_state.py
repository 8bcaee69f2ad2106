"""HeadStateLog against the real broker: records under librdkafka's real message limit at the
dimensions users have, snapshot + deltas, a restore bounded by the state and not by the uptime,
the barrier, the restore timeout, and the decay clock carried through the log.

The expected state is kept by the tests themselves (a dict of the last row per query), sharing
no code with the log's merge.
"""

from __future__ import annotations

import json
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Producer, TopicPartition

from annstream.broker import EmbeddedBroker
from annstream.config import HeadsConfig, KafkaConfig
from annstream.errors import BrokerError
from annstream.heads import HeadQueryTracker
from annstream.kafka import make_consumer, make_producer
from consumers.head_state import (
    _BARRIER_KEY,
    _OFFSET_HEADER,
    _SNAPSHOT_HEADER,
    SNAPSHOT_MIN_BYTES,
    HeadStateLog,
    _merge,
    decode_state,
    encode_state,
    producer_message_limit,
)

State = dict[str, np.ndarray]
LIMIT = 1_000_000  # librdkafka's default message.max.bytes
BATCH_MS = 250  # refresh.batch_ms default
HOUR_BATCHES = 3_600_000 // BATCH_MS
WEEK_BATCHES = 7 * 24 * HOUR_BATCHES


def rows(query_ids: Any, dim: int, rng: np.random.Generator, clock_ms: int = 0) -> State:
    """Tracker-shaped rows (the columns `HeadQueryTracker.state()` returns)."""
    q = np.asarray(query_ids, dtype=np.int64)
    n = len(q)
    return {
        "query_ids": q,
        "scores": rng.uniform(0, 10, n),
        "last_ms": rng.integers(0, max(clock_ms, 1), n),
        "in_head": rng.random(n) < 0.5,
        "has_vector": np.ones(n, bool),
        "vectors": rng.standard_normal((n, dim)).astype(np.float32),
        "clock_ms": np.full(n, clock_ms, np.int64),
    }


class Truth:
    """The rows of one partition as the tracker would hold them: the last row per query."""

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, Any]] = {}

    def update(self, state: State) -> None:
        for i, q in enumerate(state["query_ids"].tolist()):
            self.rows[q] = {k: v[i].copy() for k, v in state.items()}

    def state(self) -> State:
        qs = sorted(self.rows)
        if not qs:
            raise AssertionError("empty truth")
        return {k: np.stack([self.rows[q][k] for q in qs]) for k in self.rows[qs[0]]}


def assert_same_rows(restored: list[State], truth: Truth) -> None:
    assert len(restored) == 1
    got, want = restored[0], truth.state()
    order = np.argsort(got["query_ids"])
    for k in ("query_ids", "scores", "last_ms", "in_head", "has_vector", "vectors"):
        np.testing.assert_array_equal(got[k][order], want[k], err_msg=k)
    assert int(got["clock_ms"].max()) == int(want["clock_ms"].max())


@pytest.fixture
def cfg(bootstrap: str, topic_factory: Callable[..., str]) -> KafkaConfig:
    return KafkaConfig(
        bootstrap_servers=bootstrap,
        head_state_topic=topic_factory("head-state", partitions=2),
        group_id=f"g-{uuid.uuid4().hex[:8]}",
    )


@pytest.fixture
def log_factory(cfg: KafkaConfig) -> Iterator[Callable[..., HeadStateLog]]:
    made: list[tuple[HeadStateLog, Producer]] = []

    def make(
        partition_state: Callable[[int], State], kafka: KafkaConfig | None = None
    ) -> HeadStateLog:
        producer = make_producer(cfg)
        log = HeadStateLog(kafka or cfg, producer, partition_state)
        made.append((log, producer))
        return log

    yield make
    for log, producer in made:
        log.close()
        producer.flush(5)
    made.clear()


def raw_records(cfg: KafkaConfig, partition: int) -> list[Any]:
    """Every record of a changelog partition, read with a plain consumer up to a marker (a
    barrier, which restores skip)."""
    producer = Producer({"bootstrap.servers": cfg.bootstrap_servers})
    marker = uuid.uuid4().bytes
    producer.produce(cfg.head_state_topic, key=_BARRIER_KEY, value=marker, partition=partition)
    producer.flush(10)
    consumer = make_consumer(cfg, group_id=f"raw-{uuid.uuid4().hex[:8]}")
    consumer.assign([TopicPartition(cfg.head_state_topic, partition, 0)])
    out: list[Any] = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            for m in consumer.consume(1000, 0.2):
                if m.error() is not None:
                    continue
                if m.value() == marker:
                    return out
                out.append(m)
        raise AssertionError("end marker not read within 60s")
    finally:
        consumer.close()


def wire_size(m: Any) -> int:
    headers = sum(len(k) + len(v or b"") for k, v in m.headers() or [])
    return len(m.value() or b"") + len(m.key() or b"") + headers


# ---- records -----------------------------------------------------------------------------


def test_head_state_record_round_trip_and_refusals() -> None:
    state = rows([3, 1, 2], 5, np.random.default_rng(0), clock_ms=7)
    back = decode_state(encode_state(state))
    assert list(back) == list(state)
    for k, v in state.items():
        np.testing.assert_array_equal(back[k], v)
        assert back[k].dtype == v.dtype
    empty = decode_state(encode_state({k: v[:0] for k, v in state.items()}))
    assert empty["vectors"].shape == (0, 5)
    # the npz records of earlier versions still restore
    import io

    buf = io.BytesIO()
    np.savez(buf, **state)  # type: ignore[arg-type]
    np.testing.assert_array_equal(decode_state(buf.getvalue())["vectors"], state["vectors"])
    # the raw-column records written before the changelog was Avro still restore
    header = json.dumps([[k, v.dtype.str, list(v.shape[1:])] for k, v in state.items()]).encode()
    raw = b"ANNHS1\n" + struct.pack("<I", len(header)) + header + struct.pack("<Q", 3)
    raw += b"".join(v.tobytes() for v in state.values())
    np.testing.assert_array_equal(decode_state(raw)["vectors"], state["vectors"])
    blob = encode_state(state)
    assert blob[0] == 0 and int.from_bytes(blob[1:5], "big") == 5  # Confluent framing, id 5
    for bad in (b"garbage", blob[:-3], blob + b"x"):
        with pytest.raises(ValueError):
            decode_state(bad)
    assert producer_message_limit(KafkaConfig()) == LIMIT
    # the ingest limit (lowered to 4 KB by the fault tests) is not the producer's
    assert producer_message_limit(KafkaConfig(max_message_bytes=4096)) == LIMIT
    assert producer_message_limit(KafkaConfig(client={"message.max.bytes": "5000000"})) == 5_000_000


def test_head_state_row_over_the_limit_is_refused_naming_the_setting() -> None:
    state = rows([1], 300_000, np.random.default_rng(0))
    log = HeadStateLog(KafkaConfig(), Producer({}), lambda p: state, max_message_bytes=LIMIT)
    with pytest.raises(ValueError, match=r"message\.max\.bytes in \[kafka\.client\]"):
        log.append(0, state, 1)


@pytest.mark.parametrize(("dim", "n"), [(384, 3_000), (4096, 300)])
def test_head_state_records_fit_the_real_message_limit(
    cfg: KafkaConfig, log_factory: Callable[..., HeadStateLog], dim: int, n: int
) -> None:
    """Issue 11 item 2: a fixed 2,000 rows per record died with MSG_SIZE_TOO_LARGE at d = 384."""
    rng = np.random.default_rng(dim)
    truth = Truth()
    log = log_factory(lambda p: truth.state())
    assert log.max_message_bytes == LIMIT
    for step in range(3):  # a snapshot, then deltas larger than one record
        delta = rows(rng.choice(n, n // (step + 1), replace=False), dim, rng, clock_ms=step)
        truth.update(delta)
        log.append(0, delta, 10 + step)
        log.flush(60)
    records = raw_records(cfg, 0)
    assert len(records) >= sum(-(-n // (s + 1) * dim * 4 // LIMIT) for s in range(3))
    assert max(wire_size(m) for m in records) <= LIMIT
    restored, offset = log_factory(lambda p: truth.state()).restore(0)
    assert offset == 12
    assert_same_rows(restored, truth)


def test_head_state_flush_raises_while_the_broker_is_stopped_and_succeeds_after(
    cfg: KafkaConfig, log_factory: Callable[..., HeadStateLog], kafka_broker: EmbeddedBroker
) -> None:
    """The service keeps a micro-batch pending while flush() raises, and calls it again."""
    rng = np.random.default_rng(4)
    truth = Truth()
    log = log_factory(lambda p: truth.state())
    base = rows(np.arange(100), 384, rng)
    truth.update(base)
    log.append(1, base, 1)
    log.flush(10)
    kafka_broker.pause()
    try:
        delta = rows([3, 200], 384, rng, clock_ms=5)
        truth.update(delta)
        log.append(1, delta, 2)
        with pytest.raises(BrokerError, match="not yet in"):
            log.flush(1.0)
    finally:
        kafka_broker.resume()
    log.flush(30)
    restored, offset = log_factory(lambda p: truth.state()).restore(1)
    assert offset == 2
    assert_same_rows(restored, truth)


# ---- snapshots ---------------------------------------------------------------------------


def committed(cfg: KafkaConfig, partition: int) -> int:
    consumer = make_consumer(cfg, group_id=f"{cfg.group_id}.head-state")
    try:
        tp = consumer.committed([TopicPartition(cfg.head_state_topic, partition)], timeout=10)
        return int(tp[0].offset)
    finally:
        consumer.close()


def test_head_state_restore_reads_the_latest_snapshot_and_the_deltas_after_it(
    cfg: KafkaConfig, log_factory: Callable[..., HeadStateLog]
) -> None:
    dim, queries = 384, 500
    rng = np.random.default_rng(5)
    truths = {0: Truth(), 1: Truth()}
    log = log_factory(lambda p: truths[p].state())
    for p, truth in truths.items():
        full = rows(np.arange(queries) * 2 + p, dim, rng)
        truth.update(full)
        log.append(p, full, 0)
    log.flush(30)
    snapshot_bytes = SNAPSHOT_MIN_BYTES  # the state (~790 KB) is below the floor
    assert log.snapshots_written == 0
    for batch in range(1, 201):
        p = batch % 2
        delta = rows(rng.choice(queries, 20, replace=False) * 2 + p, dim, rng, clock_ms=batch)
        truths[p].update(delta)
        log.append(p, delta, batch)
        log.flush(30)
    assert log.snapshots_written >= 4  # 100 deltas of ~32 KB per partition
    for p, truth in truths.items():
        start = committed(cfg, p)
        assert start > 0
        records = raw_records(cfg, p)
        first = next(m for m in records if m.offset() == start)
        assert dict(first.headers())[_SNAPSHOT_HEADER].split()[1] == b"0"
        later = [m for m in records if m.offset() >= start and m.key() is None]
        reader = log_factory(lambda q: truths[q].state())
        restored, offset = reader.restore(p)
        assert offset == 200 - p
        assert_same_rows(restored, truth)
        stats = reader.restores[p]
        assert stats.start_offset == start
        assert stats.records == len(later)
        assert stats.bytes <= 2 * snapshot_bytes + 40 * 1_700


def test_head_state_partial_snapshot_and_garbage_are_survived(
    cfg: KafkaConfig, log_factory: Callable[..., HeadStateLog]
) -> None:
    """A crash in the middle of writing a snapshot leaves some of its chunks: they count as
    changes (they hold current rows), and do not discard what came before them."""
    rng = np.random.default_rng(9)
    truth = Truth()
    log = log_factory(lambda p: truth.state())
    base = rows(np.arange(100), 8, rng, clock_ms=1)
    truth.update(base)
    log.append(0, base, 1)
    log.flush(10)
    raw = make_producer(cfg)
    part = rows(np.arange(50, 60), 8, rng, clock_ms=2)  # chunk 0 of a 3-chunk snapshot
    truth.update(part)
    headers = {_OFFSET_HEADER: "2", _SNAPSHOT_HEADER: "feedfacefeedface 0 3"}
    raw.produce(cfg.head_state_topic, value=encode_state(part), partition=0, headers=headers)
    raw.produce(cfg.head_state_topic, value=b"not a record", partition=0)
    raw.flush(10)
    delta = rows([5, 150], 8, rng, clock_ms=3)
    truth.update(delta)
    log.append(0, delta, 3)
    log.flush(10)
    restored, offset = log_factory(lambda p: truth.state()).restore(0)
    assert offset == 3
    assert_same_rows(restored, truth)


# ---- bounded by the state, not by the uptime ---------------------------------------------


def _run(log: HeadStateLog, partition: int, batches: int, dim: int) -> Truth:
    """`batches` micro-batches of one touched query each on a state of 2,000 queries."""
    rng = np.random.default_rng(partition)
    truth = Truth()
    model = rows(np.arange(2_000), dim, rng)
    truth.update(model)
    log.partition_state = lambda p: model
    views = [{k: v[q : q + 1] for k, v in model.items()} for q in range(2_000)]
    last, scores, clock = model["last_ms"], model["scores"], model["clock_ms"]
    for b in range(batches):
        q = b % 2_000
        last[q] = clock[q] = b * BATCH_MS
        scores[q] += 1.0
        log.append(partition, views[q], b)
        if b % 20_000 == 19_999:
            log.flush(60)
    log.flush(60)
    truth.update(model)
    return truth


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_head_state_restore_after_seven_days_is_as_fast_as_after_one_hour(
    cfg: KafkaConfig, log_factory: Callable[..., HeadStateLog]
) -> None:
    """Issue 11 item 4: a changelog replayed from offset 0 gains a record per micro-batch, so
    after ~4 h restores hit their 60 s limit. One micro-batch per 250 ms for an hour on
    partition 0 and for seven days (2.4 million records) on partition 1 (d = 16 keeps the
    7-day log in the broker's memory; the bound is in bytes, so d does not change it)."""
    dim = 16
    truths = {}
    t0 = time.perf_counter()
    for p, batches in ((0, HOUR_BATCHES), (1, WEEK_BATCHES)):
        truths[p] = _run(log_factory(lambda q: {}), p, batches, dim)
    written_s = time.perf_counter() - t0
    reader = log_factory(lambda q: {})
    reader.restore(0)  # the reader's producer and consumer start up once
    results = {}
    for p in (0, 1):
        restored, offset = reader.restore(p)
        assert offset == (HOUR_BATCHES, WEEK_BATCHES)[p] - 1
        assert_same_rows(restored, truths[p])
        results[p] = reader.restores[p]
    hour, week = results[0], results[1]
    print(f"\nwrote 1 h + 7 d of micro-batches in {written_s:.0f}s; restore 1 h: {hour}")
    print(f"restore 7 d: {week}")
    assert week.end_offset > 150 * hour.end_offset
    state_bytes = 2_000 * (8 * 4 + 2 + 4 * dim)
    for stats in (hour, week):
        assert stats.bytes <= 2 * max(state_bytes, SNAPSHOT_MIN_BYTES) + 4_096
    assert week.records <= SNAPSHOT_MIN_BYTES // 300 + 10
    assert week.seconds <= 3 * hour.seconds + 1.0


def test_head_state_restore_timeout_is_the_setting(
    cfg: KafkaConfig, log_factory: Callable[..., HeadStateLog]
) -> None:
    """A consumer asking for more bytes than there are waits fetch.wait.max.ms (1.5 s) on the
    broker for every fetch: such a restore cannot finish within 1 s, and does within 20 s."""
    state = rows(np.arange(10), 4, np.random.default_rng(1))
    log = log_factory(lambda p: state)
    log.append(0, state, 1)
    log.flush(10)
    slow = {"fetch.min.bytes": "100000000", "fetch.wait.max.ms": "1500"}
    for timeout_s, ok in ((1.0, False), (20.0, True)):
        kafka = KafkaConfig(
            bootstrap_servers=cfg.bootstrap_servers,
            head_state_topic=cfg.head_state_topic,
            group_id=cfg.group_id,
            head_state_restore_timeout_s=timeout_s,
        )
        reader = HeadStateLog(kafka, log.producer, lambda p: state)
        reader._consumer = make_consumer(
            kafka,
            group_id=reader.snapshot_group,
            **slow,
        )
        try:
            if ok:
                assert reader.restore(0)[1] == 1
            else:
                with pytest.raises(BrokerError, match=r"kafka\.head_state_restore_timeout_s"):
                    reader.restore(0)
        finally:
            reader.close()


def test_head_state_restore_stops_at_its_barrier_while_another_writer_appends(
    cfg: KafkaConfig, log_factory: Callable[..., HeadStateLog]
) -> None:
    rng = np.random.default_rng(3)
    state = rows(np.arange(200), 32, rng)
    writer = log_factory(lambda p: state)
    writer.append(0, state, 0)
    writer.flush(10)
    stop = threading.Event()
    flushed = [0]

    def keep_writing() -> None:
        b = 1
        while not stop.is_set():
            writer.append(0, {k: v[b % 200 : b % 200 + 1] for k, v in state.items()}, b)
            if b % 50 == 0:
                writer.flush(10)
                flushed[0] = b
            b += 1

    thread = threading.Thread(target=keep_writing, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while flushed[0] < 500 and time.monotonic() < deadline:
            time.sleep(0.01)
        before = flushed[0]
        restored, offset = log_factory(lambda p: state).restore(0, timeout_s=30)
        assert offset >= before
    finally:
        stop.set()
        thread.join(30)
    assert len(restored[0]["query_ids"]) == 200


# ---- the decay clock through the log -----------------------------------------------------


def test_head_state_idle_restart_keeps_the_head_set(
    cfg: KafkaConfig, log_factory: Callable[..., HeadStateLog]
) -> None:
    """Issue 11 item 6: the clock restarted at 0, so queries that had left came back."""
    now_s = 1_750_000_000.0
    heads_cfg = HeadsConfig(half_life_s=3600.0, enter_score=5.0, exit_score=2.5)
    tracker = HeadQueryTracker(heads_cfg, 384, 600.0, lambda: now_s)
    log = log_factory(lambda p: tracker.state())
    rng = np.random.default_rng(2)
    left: set[int] = set()
    for step in range(72):  # six hours of event time, a micro-batch per 5 minutes
        at = int(now_s * 1000) - (72 - step) * 300_000
        ids = rng.choice(300, 30, replace=False)
        weights = rng.uniform(0.2, 3.0, 30) * (ids < 150 + 2 * step)
        vecs = rng.standard_normal((30, 384)).astype(np.float32)
        tracker.observe(ids, weights, np.full(30, at), vecs)
        ch = tracker.changes()
        left |= set(ch.exited.tolist())
        touched = np.union1d(ids, np.union1d(ch.entered, ch.exited))
        log.append(0, tracker.state(touched), step)
        log.flush(10)
    heads = tracker.head_ids()
    assert len(heads) >= 20 and len(left - set(heads.tolist())) >= 5
    restored, _ = log_factory(lambda p: {}).restore(0)
    other = HeadQueryTracker(heads_cfg, 384, 600.0, lambda: now_s + 3600)
    for state in restored:
        other.load_state(state)
    assert other.clock_ms == tracker.clock_ms
    ch = other.changes()
    np.testing.assert_array_equal(ch.entered, heads)
    assert ch.exited.tolist() == []


def test_head_state_records_without_the_retired_column_merge_as_none() -> None:
    """Records written before `retired_until_ms` existed restore next to newer ones: their
    rows mean "no retired list" (-1), not an expiry at 0."""
    rng = np.random.default_rng(5)
    old = rows([1, 2], 4, rng, clock_ms=3)
    new = {**rows([2, 3], 4, rng, clock_ms=4), "retired_until_ms": np.array([7, 8], np.int64)}
    merged = _merge([old, new])
    order = np.argsort(merged["query_ids"])
    assert merged["query_ids"][order].tolist() == [1, 2, 3]
    assert merged["retired_until_ms"][order].tolist() == [-1, 7, 8]
    assert decode_state(encode_state(merged))["retired_until_ms"].dtype == np.int64


def test_head_state_restore_returns_entrants_noted_with_no_rows_after_them(
    cfg: KafkaConfig, log_factory: Callable[..., HeadStateLog]
) -> None:
    """Entrants are noted before their lists are stored; a crash before their rows follow must
    not hide them from the next owner, through a snapshot too."""
    dim = 384
    rng = np.random.default_rng(11)
    truth = Truth()
    log = log_factory(lambda p: truth.state())
    base = rows(np.arange(50), dim, rng)
    truth.update(base)
    log.append(1, base, 1)
    log.note_entrants(1, np.array([101, 7, 100]))
    log.flush(30)  # killed here: their rows never follow

    def restored_entrants() -> list[int]:
        reader = log_factory(lambda p: truth.state())
        restored, offset = reader.restore(1)
        assert offset == offsets[-1]
        assert_same_rows(restored, truth)
        return list(reader.restored_entrants(1).tolist())

    offsets = [1]
    assert restored_entrants() == [7, 100, 101]
    delta = rows([100, 101], dim, rng, clock_ms=3)
    truth.update(delta)
    log.append(1, delta, 2)
    log.flush(30)
    offsets.append(2)
    assert restored_entrants() == [7]  # their rows superseded the note
    big = rows(np.arange(1000, 1800), dim, rng, clock_ms=4)  # over the 1 MiB floor: a snapshot
    truth.update(big)
    log.append(1, big, 3)
    log.flush(30)
    offsets.append(3)
    assert log.snapshots_written == 1 and committed(cfg, 1) > 0
    assert restored_entrants() == [7]  # noted again after the snapshot
