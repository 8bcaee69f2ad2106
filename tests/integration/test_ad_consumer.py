"""The ad consumer against the real broker: topic -> AdStream -> net_changes -> LiveIvfIndex.

Every check is differential: the index the stream built must equal (ids, stored vectors,
search results) a fresh index built directly from the expected final set of ads, with the
same trained quantizer, or the index of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from annstream.codec import AdCodec
from annstream.config import IndexConfig, KafkaConfig
from annstream.events import NO_ID, OP_DELETE, OP_UPSERT, AdBatch
from annstream.index import LiveIvfIndex
from annstream.kafka import DeadLetterPublisher, headers_dict, make_consumer, make_producer
from annstream.schemas import LocalSchemaRegistry, frame, schema_dir
from annstream.snapshot import list_snapshots, load_latest_snapshot, write_snapshot
from consumers.ads import AdStream, net_changes
from producers.publish import Publisher, batch_keys, publish_batches

DIM = 24
ICFG = IndexConfig(dim=DIM, metric="cosine", nlist=32, nprobe=8)
K = 10
N_ADS = 2_000
N_CHANGES = 2_000
UNKNOWN_BASE = 1_000_000_000
POLL = 400
HANG_GUARD_S = 120.0


@pytest.fixture(scope="module")
def codec() -> AdCodec:
    return AdCodec(LocalSchemaRegistry(), DIM, ICFG.metric)


@pytest.fixture(scope="module")
def trained() -> np.ndarray:
    """The serialized empty trained index: every index of a test starts from the same quantizer."""
    sample = np.random.default_rng(99).standard_normal((2_000, DIM)).astype("float32")
    index_bytes, _ = LiveIvfIndex.train(ICFG, sample).serialize()
    return index_bytes


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((200, DIM)).astype("float32")


def _empty(trained: np.ndarray) -> LiveIvfIndex:
    return LiveIvfIndex.deserialize(ICFG, trained)


@dataclass
class Workload:
    """Events in publish order and the ads expected live after all of them."""

    events: AdBatch
    expected: dict[int, np.ndarray]
    counts: dict[str, int]


def _events(ids: np.ndarray, ops: np.ndarray, vectors: np.ndarray) -> AdBatch:
    n = len(ids)
    return AdBatch(
        ad_ids=ids.astype("int64"),
        ops=ops.astype("uint8"),
        vectors=np.ascontiguousarray(vectors * (ops == OP_UPSERT)[:, None], dtype="float32"),
        event_time_ms=np.arange(n, dtype="int64") + 1_700_000_000_000,
        advertiser_ids=np.full(n, NO_ID, dtype="int64"),
        campaign_ids=np.full(n, NO_ID, dtype="int64"),
    )


def _workload(seed: int) -> Workload:
    """N_ADS inserts, then N_CHANGES updates, deletes, re-inserts and deletes of unknown ads."""
    rng = np.random.default_rng(seed)
    inserts = rng.permutation(np.arange(1, N_ADS + 1))
    unknown = UNKNOWN_BASE + np.arange(25)
    targets = rng.integers(1, N_ADS + 1, N_CHANGES)
    targets[rng.choice(N_CHANGES, unknown.size, replace=False)] = unknown
    ops = np.where(rng.random(N_CHANGES) < 0.6, OP_UPSERT, OP_DELETE)
    ops[np.isin(targets, unknown)] = OP_DELETE
    ids = np.concatenate([inserts, targets])
    all_ops = np.concatenate([np.full(N_ADS, OP_UPSERT), ops])
    vectors = rng.standard_normal((ids.size, DIM)).astype("float32")
    events = _events(ids, all_ops, vectors)

    live: dict[int, np.ndarray] = {}
    counts = {"inserts": 0, "updates": 0, "deletes": 0, "unknown_deletes": 0, "reinserts": 0}
    deleted: set[int] = set()
    for i, (ad, op) in enumerate(zip(ids.tolist(), all_ops.tolist(), strict=True)):
        if op == OP_UPSERT:
            key = "updates" if ad in live else "reinserts" if ad in deleted else "inserts"
            counts[key] += 1
            live[ad] = events.vectors[i]
        elif ad in live:
            counts["deletes"] += 1
            del live[ad]
            deleted.add(ad)
        else:
            counts["unknown_deletes"] += 1
    return Workload(events, live, counts)


def _chunks(batch: AdBatch, size: int = 500) -> Iterator[AdBatch]:
    for start in range(0, len(batch), size):
        yield batch.take(np.arange(start, min(start + size, len(batch))))


def _kafka(bootstrap: str, topic: str, dead_letter_topic: str) -> KafkaConfig:
    return KafkaConfig(
        bootstrap_servers=bootstrap,
        ad_topic=topic,
        dead_letter_topic=dead_letter_topic,
        group_id=f"test-{topic}",
    )


def _publish(cfg: KafkaConfig, codec: AdCodec, events: AdBatch) -> None:
    stats = publish_batches(Publisher(make_producer(cfg), cfg.ad_topic), codec, _chunks(events))
    assert (stats.delivered, stats.failed) == (len(events), 0), stats.first_error


def _stream(
    cfg: KafkaConfig, codec: AdCodec, offsets: dict[int, int] | None = None
) -> tuple[AdStream, DeadLetterPublisher]:
    dead_letters = DeadLetterPublisher(make_producer(cfg), cfg.dead_letter_topic)
    return AdStream(cfg, codec, dead_letters, offsets), dead_letters


def _apply(index: LiveIvfIndex, batch: AdBatch) -> None:
    up_ids, up_vectors, delete_ids = net_changes(batch)
    index.delete(delete_ids)
    index.upsert(up_ids, up_vectors)


def _consume(stream: AdStream, index: LiveIvfIndex, at_least: int, max_messages: int = POLL) -> int:
    """Poll and apply micro-batches until `at_least` messages arrived; returns how many did."""
    seen = 0
    deadline = time.monotonic() + HANG_GUARD_S
    while seen < at_least:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {seen} of {at_least} ad events arrived: broker stuck?")
        poll = stream.poll(max_messages, 0.2)
        seen += poll.messages
        _apply(index, poll.batch)
    return seen


def _offsets_key(stream: AdStream) -> dict[tuple[str, int], int]:
    return {(stream.topic, p): o for p, o in stream.offsets.items()}


def _fresh(trained: np.ndarray, expected: dict[int, np.ndarray]) -> LiveIvfIndex:
    index = _empty(trained)
    ids = np.array(sorted(expected), dtype="int64")
    index.upsert(ids, np.stack([expected[i] for i in ids.tolist()]))
    return index


def _assert_same(got: LiveIvfIndex, want: LiveIvfIndex, queries: np.ndarray) -> None:
    ids = want.ids()
    np.testing.assert_array_equal(got.ids(), ids)
    np.testing.assert_array_equal(got.vectors(ids), want.vectors(ids))
    for search in ("search", "search_exact"):
        got_scores, got_ids = getattr(got, search)(queries, K)
        want_scores, want_ids = getattr(want, search)(queries, K)
        np.testing.assert_array_equal(got_ids, want_ids, err_msg=search)
        np.testing.assert_array_equal(got_scores, want_scores, err_msg=search)


def _assert_drained(stream: AdStream) -> None:
    assert stream.poll(POLL, 0.3).messages == 0


def test_inserts_updates_and_deletes_through_the_topic_match_a_fresh_index(
    bootstrap: str,
    topic_factory: Callable[..., str],
    codec: AdCodec,
    trained: np.ndarray,
    queries: np.ndarray,
) -> None:
    work = _workload(seed=1)
    assert all(work.counts.values()), work.counts
    cfg = _kafka(bootstrap, topic_factory("ads", 2), topic_factory("dlq"))
    _publish(cfg, codec, work.events)

    stream, dead_letters = _stream(cfg, codec)
    index = _empty(trained)
    try:
        assert _consume(stream, index, len(work.events)) == len(work.events)
        _assert_drained(stream)
    finally:
        stream.close()
    assert dead_letters.count == 0
    _assert_same(index, _fresh(trained, work.expected), queries)
    assert not index.contains(UNKNOWN_BASE + np.arange(25)).any()


def _run_with_snapshots(
    cfg: KafkaConfig,
    codec: AdCodec,
    trained: np.ndarray,
    total: int,
    snapshot_dir: Path,
    snapshot_at: list[int],
) -> tuple[LiveIvfIndex, dict[int, int], list[Path]]:
    """Run A: consume everything, writing a snapshot once `snapshot_at[i]` messages arrived."""
    stream, _ = _stream(cfg, codec)
    index = _empty(trained)
    paths = []
    seen = 0
    try:
        for mark in [*snapshot_at, total]:
            seen += _consume(stream, index, mark - seen)
            if mark < total:
                paths.append(
                    write_snapshot(snapshot_dir, index, _offsets_key(stream), {"seen": seen})
                )
        _assert_drained(stream)
        return index, dict(stream.offsets), paths
    finally:
        stream.close()


def _resume(
    cfg: KafkaConfig, codec: AdCodec, snapshot_dir: Path, total: int
) -> tuple[LiveIvfIndex, dict[int, int], Path]:
    """Run B: restore the newest usable snapshot and replay the topic from its offsets."""
    snap = load_latest_snapshot(snapshot_dir, ICFG)
    assert snap is not None
    offsets = {p: o for (t, p), o in snap.offsets.items() if t == cfg.ad_topic}
    assert sum(offsets.values()) == snap.meta["seen"]
    stream, _ = _stream(cfg, codec, offsets)
    try:
        _consume(stream, snap.index, total - int(snap.meta["seen"]))
        _assert_drained(stream)
        return snap.index, dict(stream.offsets), snap.path
    finally:
        stream.close()


def test_restart_from_snapshot_equals_an_uninterrupted_run(
    bootstrap: str,
    topic_factory: Callable[..., str],
    codec: AdCodec,
    trained: np.ndarray,
    queries: np.ndarray,
    tmp_path: Path,
) -> None:
    work = _workload(seed=2)
    total = len(work.events)
    cfg = _kafka(bootstrap, topic_factory("ads", 3), topic_factory("dlq"))
    _publish(cfg, codec, work.events)

    index_a, offsets_a, _ = _run_with_snapshots(cfg, codec, trained, total, tmp_path, [total // 2])
    index_b, offsets_b, _ = _resume(cfg, codec, tmp_path, total)

    assert offsets_b == offsets_a
    assert sorted(offsets_a) == [0, 1, 2]
    _assert_same(index_b, index_a, queries)
    _assert_same(index_a, _fresh(trained, work.expected), queries)


@pytest.mark.parametrize("damage", ["flipped byte", "torn write"])
def test_corrupt_newest_snapshot_falls_back_to_the_previous_one(
    bootstrap: str,
    topic_factory: Callable[..., str],
    codec: AdCodec,
    trained: np.ndarray,
    queries: np.ndarray,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    work = _workload(seed=3)
    total = len(work.events)
    cfg = _kafka(bootstrap, topic_factory("ads", 3), topic_factory("dlq"))
    _publish(cfg, codec, work.events)
    index_a, offsets_a, (older, newest) = _run_with_snapshots(
        cfg, codec, trained, total, tmp_path, [total // 3, 2 * total // 3]
    )
    assert list_snapshots(tmp_path) == [newest, older]

    data = bytearray(newest.read_bytes())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[len(data) * 2 // 3 :]
    newest.write_bytes(bytes(data))

    index_b, offsets_b, used = _resume(cfg, codec, tmp_path, total)
    assert used == older
    assert f"snapshot {newest} is unusable" in caplog.text
    assert offsets_b == offsets_a
    _assert_same(index_b, index_a, queries)
    _assert_same(index_b, _fresh(trained, work.expected), queries)


def _unknown_operation() -> bytes:
    """An ad event written with a newer enum symbol this consumer does not know, under id 1."""
    schema = json.loads((schema_dir() / "ad_event.avsc").read_text("utf-8"))
    schema["fields"][1]["type"]["symbols"].append("ARCHIVE")
    record: dict[str, Any] = {
        "ad_id": 5,
        "op": "ARCHIVE",
        "embedding": None,
        "dim": 0,
        "model_version": "",
        "event_time": 1,
        "advertiser_id": None,
        "campaign_id": None,
    }
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    return frame(1, buf.getvalue())


def _bad_messages(codec: AdCodec, good: bytes) -> list[tuple[bytes | None, str]]:
    """(payload, expected start of its dead-letter reason) for every kind of invalid event."""
    small = AdCodec(codec.registry, 8, codec.metric)
    wrong_dim = small.encode(AdBatch.upserts(np.array([900]), np.ones((1, 8)), 1))[0]
    nan, zero = np.ones((2, DIM), dtype="float32"), np.zeros((2, DIM), dtype="float32")
    nan[0, 3] = np.nan
    nan_zero = codec.encode(
        AdBatch.upserts(np.array([901, 902]), np.vstack([nan[:1], zero[:1]]), 1)
    )
    return [
        (good[:40], "truncated or corrupt Avro payload (EOFError"),
        (b"\x00\x00\x01", "truncated message: 3 bytes"),
        (wrong_dim, "wrong dimension: embedding has 8 floats (dim field 8), the index expects 24"),
        (nan_zero[0], "embedding has NaN or inf values"),
        (nan_zero[1], "zero embedding: cannot be normalised under the cosine metric"),
        (frame(99, good[5:]), "unknown schema id 99"),
        (
            _unknown_operation(),
            "truncated or corrupt Avro payload: an enum or union index is out of range (unknown operation?)",
        ),
        (b"\x01" + good[1:], "bad magic byte 1"),
        (good + b"zz", "2 trailing bytes after the Avro record"),
        (None, "empty message (null value)"),
    ]


def test_bad_messages_go_to_the_dead_letter_topic_and_the_stream_goes_on(
    bootstrap: str,
    topic_factory: Callable[..., str],
    codec: AdCodec,
    trained: np.ndarray,
    queries: np.ndarray,
) -> None:
    rng = np.random.default_rng(4)
    n_good = 60
    ids = np.arange(1, n_good + 1)
    ops = np.full(n_good, OP_UPSERT)
    ops[[10, 30, 50]] = OP_DELETE
    ids[[10, 30, 50]] = [3, 7, 12_345]
    good_events = _events(ids, ops, rng.standard_normal((n_good, DIM)).astype("float32"))
    good = codec.encode(good_events)
    bad = _bad_messages(codec, good[0])
    # Bad messages between good ones (two back to back) and one last of all.
    after_good = {2: [0], 8: [1, 2], 20: [3], 26: [4], 32: [5], 38: [6], 44: [7], 50: [8]}
    values: list[bytes | None] = []
    keys: list[bytes | None] = []
    bad_at: dict[int, int] = {}
    for i, key in enumerate(batch_keys(good_events)):
        values.append(good[i])
        keys.append(key)
        for j in after_good.get(i, []):
            bad_at[j] = len(values)
            values.append(bad[j][0])
            keys.append(b"bad")
    bad_at[len(bad) - 1] = len(values)
    values.append(bad[-1][0])
    keys.append(b"bad")
    assert sorted(bad_at) == list(range(len(bad)))
    reasons_at = {bad_at[j]: reason for j, (_, reason) in enumerate(bad)}

    cfg = _kafka(bootstrap, topic_factory("ads"), topic_factory("dlq"))
    publisher = Publisher(make_producer(cfg), cfg.ad_topic)
    publisher.send(keys, values, np.arange(len(values)))
    assert publisher.flush() == 0 and publisher.stats.failed == 0

    stream, dead_letters = _stream(cfg, codec)
    index = _empty(trained)
    rejected = 0
    try:
        seen = 0
        deadline = time.monotonic() + HANG_GUARD_S
        while seen < len(values) and time.monotonic() < deadline:
            poll = stream.poll(5, 0.2)
            seen, rejected = seen + poll.messages, rejected + poll.rejected
            _apply(index, poll.batch)
        assert seen == len(values)
        assert stream.offsets == {0: len(values)}
    finally:
        stream.close()
    assert dead_letters.flush() == 0
    assert rejected == dead_letters.count == len(bad)

    expected: dict[int, np.ndarray] = {}
    for ad, op, vector in zip(ids.tolist(), ops.tolist(), good_events.vectors, strict=True):
        if op == OP_UPSERT:
            expected[ad] = vector
        else:
            expected.pop(ad, None)
    _assert_same(index, _fresh(trained, expected), queries)

    letters = _read_all(cfg, cfg.dead_letter_topic, len(bad))
    assert [m["offset"] for m in letters] == list(range(len(bad)))
    sources = [m["source"] for m in letters]
    assert sources == [f"{cfg.ad_topic}/0/{at}" for at in sorted(reasons_at)]
    for m in letters:
        at = int(m["source"].rsplit("/", 1)[1])
        assert m["value"] == values[at]
        assert m["key"] == b"bad"
        assert m["reason"].startswith(reasons_at[at]), (m["reason"], reasons_at[at])


def _read_all(cfg: KafkaConfig, topic: str, n: int) -> list[dict[str, Any]]:
    """The first `n` messages of partition 0 of `topic`, with their annstream headers."""
    consumer = make_consumer(cfg, group_id=f"read-{topic}")
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + HANG_GUARD_S
    try:
        while len(out) < n and time.monotonic() < deadline:
            for m in consumer.consume(n, 0.2):
                assert m.error() is None, m.error()
                headers = headers_dict(m)
                out.append(
                    {
                        "offset": m.offset(),
                        "key": m.key(),
                        "value": m.value(),
                        "reason": headers["annstream.reason"].decode(),
                        "source": headers["annstream.source"].decode(),
                    }
                )
        extra = consumer.consume(10, 0.3)
    finally:
        consumer.close()
    assert len(out) == n and not extra, (len(out), len(extra))
    return out


def _mutated(rng: np.random.Generator, message: bytes) -> bytes | None:
    kind = rng.integers(6)
    if kind == 0:
        return message[: rng.integers(len(message))]
    if kind == 1:
        flipped = bytearray(message)
        flipped[rng.integers(len(message))] ^= 1 << int(rng.integers(8))
        return bytes(flipped)
    if kind == 2:
        return message + bytes(rng.integers(0, 256, rng.integers(1, 4), dtype="uint8"))
    if kind == 3:
        return frame(int(rng.choice([0, 2, 99])), message[5:])
    if kind == 4:
        return None
    return b"\x00" * int(rng.integers(6))


@pytest.mark.parametrize("seed", range(10))
def test_batch_parser_agrees_with_per_message_decoding(seed: int) -> None:
    """The consumer's fast path (numpy over the batch) equals fastavro message by message."""
    rng = np.random.default_rng(seed)
    n = 400
    ids = rng.integers(-(2**63), 2**63 - 1, n, dtype="int64", endpoint=True)
    ids[: n // 2] = rng.integers(0, 10_000, n // 2)
    ops = np.where(rng.random(n) < 0.8, OP_UPSERT, OP_DELETE).astype("uint8")
    vectors = rng.standard_normal((n, DIM)).astype("float32")
    vectors[rng.random(n) < 0.05] = 0.0
    vectors[rng.random(n) < 0.05, 2] = np.inf
    optional = rng.integers(-(2**40), 2**40, (2, n))
    optional[:, rng.random(n) < 0.5] = NO_ID
    events = AdBatch(
        ad_ids=ids,
        ops=ops,
        vectors=np.where((ops == OP_UPSERT)[:, None], vectors, np.float32(0)),
        event_time_ms=rng.integers(0, 2**45, n),
        advertiser_ids=optional[0],
        campaign_ids=optional[1],
        model_versions=tuple(rng.choice(["", "m1", "glove-6B-50d", "modèle-ü"], n).tolist()),
    )
    fast = AdCodec(LocalSchemaRegistry(), DIM, ICFG.metric)
    slow = AdCodec(LocalSchemaRegistry(), DIM, ICFG.metric)
    slow._parse_fast = False
    messages: list[bytes | None] = list(fast.encode(events))
    messages += [fast.encode(events.take(np.array([i])))[0] for i in range(3)]
    messages += [_mutated(rng, m) for m in messages if m is not None and rng.random() < 0.3]
    order = rng.permutation(len(messages))
    messages = [messages[i] for i in order.tolist()]

    got, got_rejected = fast.decode(messages)
    want, want_rejected = slow.decode(messages)
    assert got_rejected == want_rejected
    assert len(want) > n // 2 and len(want_rejected) > 20
    for name in ("ad_ids", "ops", "vectors", "event_time_ms", "advertiser_ids", "campaign_ids"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert got.model_versions == want.model_versions


def _hostile_ads(codec: AdCodec, now_ms: int) -> list[tuple[bytes, str]]:
    """(payload, start of its reason): records no ad consumer may index, at the real limits."""
    one = AdBatch.upserts(np.array([77]), np.ones((1, DIM)), now_ms)
    good = codec.encode(one)[0]
    future = AdBatch.upserts(np.array([78]), np.ones((1, DIM)), now_ms * 1000)
    negative = AdBatch.upserts(np.array([-1]), np.ones((1, DIM)), now_ms)
    return [
        (good[:5] + b"\x01" * (1_020_000 - 5), "message of 1020000 bytes is over"),
        (good[:5] + b"\x02" * (5_000_000 - 5), "message of 5000000 bytes is over"),
        (codec.encode(future)[0], f"event time {now_ms * 1000} ms is "),
        (codec.encode(negative)[0], "negative ad id -1"),
        (b"not avro", "bad magic byte"),
    ]


def test_replayed_bad_records_are_not_dead_lettered_twice(
    bootstrap: str,
    topic_factory: Callable[..., str],
    codec: AdCodec,
    trained: np.ndarray,
    queries: np.ndarray,
) -> None:
    """Issue 15 item 10 and issue 11 item 1: bad records (two over the real 1,000,000-byte
    limit) are dead-lettered once; a stream that replays the topic from the beginning (an older
    snapshot) counts them as dead-lettered before and sends nothing; new bad records after the
    replayed ones are sent."""
    now_ms = int(time.time() * 1000)
    hostile = _hostile_ads(codec, now_ms)
    rng = np.random.default_rng(5)
    good_events = _events(np.arange(1, 41), np.full(40, OP_UPSERT), rng.standard_normal((40, DIM)))
    good = codec.encode(good_events)
    values: list[bytes | None] = []
    for i, message in enumerate(good):
        values.append(message)
        if i % 8 == 3:
            values.append(hostile[(i // 8) % len(hostile)][0])
    n_bad = len(values) - len(good)
    assert n_bad == len(hostile)
    cfg = _kafka(bootstrap, topic_factory("ads"), topic_factory("dlq"))
    big = make_producer(dataclasses.replace(cfg, max_message_bytes=6_000_000))
    for v in values:
        big.produce(cfg.ad_topic, value=v, key=b"k", partition=0)
    assert big.flush(HANG_GUARD_S) == 0

    def run(expect_messages: int) -> tuple[LiveIvfIndex, int, int, DeadLetterPublisher]:
        stream, dead_letters = _stream(cfg, codec)
        index = _empty(trained)
        sent = again = seen = 0
        deadline = time.monotonic() + HANG_GUARD_S
        try:
            while seen < expect_messages and time.monotonic() < deadline:
                poll = stream.poll(7, 0.2)
                seen += poll.messages
                sent += poll.rejected
                again += poll.already_dead_lettered
                _apply(index, poll.batch)
                dead_letters.poll()
            assert seen == expect_messages
            assert dead_letters.flush() == 0
        finally:
            stream.close()
        return index, sent, again, dead_letters

    index, sent, again, letters = run(len(values))
    assert (sent, again, letters.failed) == (n_bad, 0, 0)
    expected = dict(zip(range(1, 41), good_events.vectors, strict=True))
    _assert_same(index, _fresh(trained, expected), queries)
    dead = _read_all(cfg, cfg.dead_letter_topic, n_bad)
    reasons = {d["source"]: d["reason"] for d in dead}
    bad_at = [i for i, v in enumerate(values) if v not in good]
    for at, (_, reason) in zip(bad_at, hostile, strict=True):
        assert reasons[f"{cfg.ad_topic}/0/{at}"].startswith(reason), reasons

    # A replay of the whole topic (an older snapshot): nothing is sent again.
    more = [b"late garbage", hostile[3][0]]
    index, sent, again, letters = run(len(values))
    assert (sent, again) == (0, n_bad)
    _assert_same(index, _fresh(trained, expected), queries)
    for v in more:
        big.produce(cfg.ad_topic, value=v, key=b"k", partition=0)
    assert big.flush(HANG_GUARD_S) == 0
    _, sent, again, _ = run(len(values) + len(more))
    assert (sent, again) == (len(more), n_bad)
    dead = _read_all(cfg, cfg.dead_letter_topic, n_bad + len(more))
    assert [d["source"] for d in dead[n_bad:]] == [
        f"{cfg.ad_topic}/0/{len(values) + i}" for i in range(len(more))
    ]
