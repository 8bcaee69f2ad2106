"""Producers against the real broker: keys, event-time timestamps, files, synthetic Zipf, CLI."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Consumer, Message, TopicPartition

import annstream
from annstream.cli import main
from annstream.codec import AdCodec, EngagementCodec
from annstream.config import KafkaConfig
from annstream.events import OP_DELETE, AdBatch
from annstream.kafka import make_producer
from annstream.schemas import LocalSchemaRegistry
from producers.publish import Publisher, publish_batches
from producers.sources import synthetic_ads, synthetic_engagements, write_avro_file

DIM = 8
T0 = 1_700_000_000_000


def consume_all(bootstrap: str, topic: str, n: int, timeout_s: float = 30.0) -> list[Message]:
    """Read `n` messages of every partition of `topic` from the start (assign, no group)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "reader", "fetch.wait.max.ms": 20}
    )
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        got: list[Message] = []
        deadline = time.monotonic() + timeout_s
        while len(got) < n and time.monotonic() < deadline:
            got.extend(m for m in consumer.consume(500, 0.2) if m.error() is None)
        got.extend(m for m in consumer.consume(500, 0.3) if m.error() is None)
        return got
    finally:
        consumer.close()


def _by_offset(messages: list[Message]) -> list[Message]:
    return sorted(messages, key=lambda m: (m.partition(), m.offset()))


def test_produce_ads_round_trip_keyed_and_stamped(
    bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    topic = topic_factory("ads", partitions=3)
    registry = LocalSchemaRegistry()
    codec = AdCodec(registry, DIM)
    ads = list(synthetic_ads(300, seed=1, dim=DIM, batch_size=64, clock=lambda: T0))
    publisher = Publisher(make_producer(KafkaConfig(bootstrap_servers=bootstrap)), topic)
    stats = publish_batches(publisher, codec, ads)
    assert (stats.sent, stats.delivered, stats.failed) == (300, 300, 0)

    messages = consume_all(bootstrap, topic, 300)
    assert len(messages) == 300
    batch, rejected = codec.decode([m.value() for m in messages])
    assert rejected == []
    keys = [m.key() for m in messages]
    assert keys == [int(i).to_bytes(8, "big") for i in batch.ad_ids]
    assert [m.timestamp()[1] for m in messages] == batch.event_time_ms.tolist()
    assert {m.partition() for m in messages} == {0, 1, 2}
    order = np.argsort(batch.ad_ids)
    np.testing.assert_array_equal(batch.ad_ids[order], np.arange(1, 301))
    sent = np.concatenate([b.vectors for b in ads])
    np.testing.assert_array_equal(batch.vectors[order], sent)


def test_produce_keeps_per_key_order_of_updates(
    bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    topic = topic_factory("upd", partitions=3)
    codec = AdCodec(LocalSchemaRegistry(), DIM)
    ids = np.tile(np.arange(10), 20)
    vectors = np.repeat(np.arange(1, 21, dtype="float32"), 10)[:, None] * np.ones(DIM, "float32")
    batch = AdBatch.upserts(ids, vectors, T0 + np.arange(len(ids)))
    publisher = Publisher(make_producer(KafkaConfig(bootstrap_servers=bootstrap)), topic)
    publish_batches(publisher, codec, [batch.take(np.arange(i, i + 50)) for i in range(0, 200, 50)])
    got, _ = codec.decode([m.value() for m in _by_offset(consume_all(bootstrap, topic, 200))])
    for ad in range(10):
        mine = got.ad_ids == ad
        assert got.vectors[mine, 0].tolist() == list(range(1, 21))
        assert np.all(np.diff(got.event_time_ms[mine]) > 0)


def test_produce_cli_npz_file(
    bootstrap: str,
    topic_factory: Callable[..., str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic = topic_factory("npz", partitions=2)
    vectors = np.random.default_rng(2).standard_normal((40, DIM)).astype("float32")
    np.savez(tmp_path / "ads.npz", ad_ids=np.arange(40) + 500, vectors=vectors,
             event_time_ms=T0 + np.arange(40))  # fmt: skip
    argv = ["produce", "ads", "--from", str(tmp_path / "ads.npz"), "--topic", topic,
            "--bootstrap-servers", bootstrap, "--dim", str(DIM)]  # fmt: skip
    assert main(argv) == 0
    assert "40 of 40 events delivered" in capsys.readouterr().out
    batch, rejected = AdCodec(LocalSchemaRegistry(), DIM).decode(
        [m.value() for m in consume_all(bootstrap, topic, 40)]
    )
    assert rejected == []
    order = np.argsort(batch.ad_ids)
    np.testing.assert_array_equal(batch.ad_ids[order], np.arange(40) + 500)
    np.testing.assert_array_equal(batch.vectors[order], vectors)
    np.testing.assert_array_equal(batch.event_time_ms[order], T0 + np.arange(40))


def test_produce_cli_avro_file_and_to_file(
    bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path
) -> None:
    path = tmp_path / "eng.avro"
    argv = ["produce", "engagements", "--synthetic", "500", "--random-vectors", "--dim", str(DIM),
            "--queries", "50", "--seed", "3", "--to-file", str(path)]  # fmt: skip
    assert main(argv) == 0
    topic = topic_factory("eng", partitions=3)
    argv = ["produce", "engagements", "--from", str(path), "--topic", topic,
            "--bootstrap-servers", bootstrap, "--dim", str(DIM), "--batch-size", "128"]  # fmt: skip
    assert main(argv) == 0
    messages = consume_all(bootstrap, topic, 500)
    batch, rejected = EngagementCodec(LocalSchemaRegistry(), DIM).decode(
        [m.value() for m in messages]
    )
    assert rejected == [] and len(batch) == 500
    assert [m.key() for m in messages] == [int(q).to_bytes(8, "big") for q in batch.query_ids]
    assert [m.timestamp()[1] for m in messages] == batch.event_time_ms.tolist()
    assert batch.has_vector.all()


def test_produce_synthetic_engagements_zipf_popularity_through_broker(
    bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    topic = topic_factory("zipf", partitions=3)
    codec = EngagementCodec(LocalSchemaRegistry(), DIM)
    events = synthetic_engagements(5_000, queries=500, zipf_s=1.1, seed=11, dim=DIM)
    publisher = Publisher(make_producer(KafkaConfig(bootstrap_servers=bootstrap)), topic)
    assert publish_batches(publisher, codec, events).delivered == 5_000
    batch, _ = codec.decode([m.value() for m in consume_all(bootstrap, topic, 5_000)])
    _, counts = np.unique(batch.query_ids, return_counts=True)
    counts.sort()
    assert counts[-1] > 20 * np.median(counts)
    assert counts[-1] > 2 * counts[-5]


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (None, [], "file not found"),
        ("wide", [], "dimension 9, the index expects 8"),
        ("mismatch", [], "ids and vectors must have the same length"),
        ("csv", [], "unknown file extension '.csv'"),
        (None, ["--synthetic", "5", "--dim", "64"], "GloVe vectors have 50 dimensions"),
    ],
)
def test_produce_cli_rejects_bad_input(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make: str | None,
    extra: list[str],
    message: str,
) -> None:
    path = tmp_path / ("ads.csv" if make == "csv" else "ads.npz")
    if make == "wide":
        np.savez(path, ad_ids=np.arange(3), vectors=np.ones((3, DIM + 1), "float32"))
    elif make == "mismatch":
        np.savez(path, ad_ids=np.arange(4), vectors=np.ones((3, DIM), "float32"))
    elif make == "csv":
        path.write_text("1,2\n")
    source = extra or ["--from", str(path), "--dim", str(DIM)]
    argv = ["produce", "ads", *source, "--bootstrap-servers", "127.0.0.1:1"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_produce_avro_file_written_by_helper_is_readable_by_cli(tmp_path: Path) -> None:
    ads = next(synthetic_ads(10, dim=DIM, clock=lambda: T0))
    assert write_avro_file(tmp_path / "a.avro", [ads]) == 10
    out = tmp_path / "b.avro"
    argv = ["produce", "ads", "--from", str(tmp_path / "a.avro"), "--dim", str(DIM),
            "--to-file", str(out)]  # fmt: skip
    assert main(argv) == 0 and out.stat().st_size > 0


# --- bring-your-own files: ops names, deletes only, real query ids, send-time stamps -------


def _produce(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["produce", *argv, "--json"]) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    return out


def test_produce_cli_ops_as_names_and_a_delete_only_file(
    bootstrap: str,
    topic_factory: Callable[..., str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic = topic_factory("ops", partitions=2)
    vectors = np.random.default_rng(6).standard_normal((4, DIM)).astype("float32")
    np.savez(tmp_path / "ads.npz", ad_ids=[1, 2, 3, 4], vectors=vectors,
             ops=np.array(["upsert", "upsert", "DELETE", "upsert"]))  # fmt: skip
    np.savez(tmp_path / "deletes.npz", ad_ids=np.array([1, 4]), ops=np.array(["delete"] * 2))
    common = ["--topic", topic, "--bootstrap-servers", bootstrap, "--dim", str(DIM)]
    first = _produce(capsys, "ads", "--from", str(tmp_path / "ads.npz"), *common)
    second = _produce(capsys, "ads", "--from", str(tmp_path / "deletes.npz"), *common)
    assert first["delivered"] == 4 and second["delivered"] == 2
    assert first["failed"] == second["failed"] == 0
    batch, rejected = AdCodec(LocalSchemaRegistry(), DIM).decode(
        [m.value() for m in consume_all(bootstrap, topic, 6)]
    )
    assert rejected == []
    ops = {(int(a), int(o)) for a, o in zip(batch.ad_ids, batch.ops, strict=True)}
    assert ops == {(1, 0), (2, 0), (3, OP_DELETE), (4, 0), (1, OP_DELETE), (4, OP_DELETE)}


def test_produce_cli_engagements_with_real_query_ids(
    bootstrap: str,
    topic_factory: Callable[..., str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic = topic_factory("qids", partitions=3)
    vectors = np.random.default_rng(7).standard_normal((5, DIM)).astype("float32")
    qids = np.array([9_001, 42, 7, 123_456_789_012, 5])
    np.save(tmp_path / "queries.npy", vectors)
    np.save(tmp_path / "qids.npy", qids)
    np.savez(tmp_path / "eng.npz", ids=qids + 1, vectors=vectors)
    common = ["--topic", topic, "--bootstrap-servers", bootstrap, "--dim", str(DIM)]
    _produce(capsys, "engagements", "--from", str(tmp_path / "queries.npy"),
             "--ids", str(tmp_path / "qids.npy"), *common)  # fmt: skip
    _produce(capsys, "engagements", "--from", str(tmp_path / "eng.npz"), *common)
    messages = consume_all(bootstrap, topic, 10)
    batch, _ = EngagementCodec(LocalSchemaRegistry(), DIM).decode([m.value() for m in messages])
    assert sorted(batch.query_ids.tolist()) == sorted([*qids.tolist(), *(qids + 1).tolist()])
    assert [m.key() for m in messages] == [int(q).to_bytes(8, "big") for q in batch.query_ids]
    by_id = dict(zip(batch.query_ids.tolist(), batch.vectors, strict=True))
    for q, v in zip(qids.tolist(), vectors, strict=True):
        np.testing.assert_array_equal(by_id[q], v)


def test_produce_cli_ids_of_an_npy_file_start_at_0_as_the_help_says(
    bootstrap: str,
    topic_factory: Callable[..., str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["produce", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--from a file without ids (.npy, or .npz without an ids array) 0" in help_text
    topic = topic_factory("npy", partitions=1)
    np.save(tmp_path / "v.npy", np.ones((3, DIM), "float32"))
    _produce(capsys, "ads", "--from", str(tmp_path / "v.npy"), "--topic", topic,
             "--bootstrap-servers", bootstrap, "--dim", str(DIM))  # fmt: skip
    batch, _ = AdCodec(LocalSchemaRegistry(), DIM).decode(
        [m.value() for m in consume_all(bootstrap, topic, 3)]
    )
    assert batch.ad_ids.tolist() == [0, 1, 2]


def test_produce_help_describes_every_accepted_layout(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["produce", "--help"])
    text = capsys.readouterr().out
    for needle in (".npy", ".npz", ".parquet", ".avro", "ad_ids (or ids)", "query_ids (or ids)",
                   "'upsert'/'delete'", "deletes only needs ad_ids and ops", "--ids FILE.npy",
                   "event_time_ms", "stamped when it is sent", "event_types"):  # fmt: skip
        assert needle in text, needle


def test_produce_cli_stamps_each_event_when_it_is_sent(
    bootstrap: str,
    topic_factory: Callable[..., str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Regression: a file without times was stamped once when read, so with --rate the last
    events were (n / rate) s old when sent and freshness counted that wait."""
    topic = topic_factory("stamp", partitions=1)
    n, rate = 300, 200.0
    np.save(tmp_path / "v.npy", np.ones((n, DIM), "float32"))
    before = time.time() * 1000
    out = _produce(capsys, "ads", "--from", str(tmp_path / "v.npy"), "--topic", topic,
                   "--bootstrap-servers", bootstrap, "--dim", str(DIM), "--rate", str(rate),
                   "--batch-size", str(n))  # fmt: skip
    after = time.time() * 1000
    assert out["event_times"] == "send" and out["delivered"] == n
    messages = _by_offset(consume_all(bootstrap, topic, n))
    batch, _ = AdCodec(LocalSchemaRegistry(), DIM).decode([m.value() for m in messages])
    stamps = np.array([m.timestamp()[1] for m in messages])
    np.testing.assert_array_equal(stamps, batch.event_time_ms)
    assert (np.diff(stamps) >= 0).all()
    assert before <= stamps[0] and stamps[-1] <= after
    # the token bucket's first burst is rate / 10 events; the rest follow at `rate`
    expected_ms = 1000 * (n - rate / 10) / rate
    assert stamps[-1] - stamps[0] >= 0.8 * expected_ms


def test_produce_cli_keeps_a_files_own_event_times_with_rate(
    bootstrap: str,
    topic_factory: Callable[..., str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic = topic_factory("keep", partitions=1)
    np.savez(tmp_path / "a.npz", ad_ids=np.arange(50), vectors=np.ones((50, DIM), "float32"),
             event_time_ms=T0 + np.arange(50))  # fmt: skip
    out = _produce(capsys, "ads", "--from", str(tmp_path / "a.npz"), "--topic", topic,
                   "--bootstrap-servers", bootstrap, "--dim", str(DIM), "--rate", "500")  # fmt: skip
    assert out["event_times"] == "file"
    messages = _by_offset(consume_all(bootstrap, topic, 50))
    assert [m.timestamp()[1] for m in messages] == (T0 + np.arange(50)).tolist()


def test_produce_json_summary_and_version(
    bootstrap: str,
    topic_factory: Callable[..., str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic = topic_factory("json", partitions=1)
    out = _produce(capsys, "ads", "--synthetic", "20", "--random-vectors", "--dim", "384",
                   "--topic", topic, "--bootstrap-servers", bootstrap)  # fmt: skip
    assert out.keys() >= {"sent", "delivered", "failed", "events_per_s", "elapsed_s", "topic"}
    assert (out["sent"], out["delivered"], out["failed"], out["topic"]) == (20, 20, 0, topic)
    assert out["elapsed_s"] > 0 and out["events_per_s"] > 0
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"annstream {annstream.__version__}"
