"""Replay against the real broker: event times, per-key order, resume after interruption."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer, Message, TopicPartition

from annstream.broker import free_port
from annstream.cli import main
from annstream.codec import AdCodec
from annstream.config import KafkaConfig
from annstream.errors import ConfigError
from annstream.events import AdBatch
from annstream.kafka import make_consumer, make_producer
from annstream.schemas import LocalSchemaRegistry
from producers.publish import Publisher, publish_batches
from producers.replay import load_checkpoint, payload_id, replay_file, replay_topic
from producers.sources import write_avro_file

DIM = 8
T0 = 1_700_000_000_000
N = 600
CLI = "import sys; from annstream.cli import main; sys.exit(main())"
KEYS = 40


def consume_all(
    bootstrap: str, topic: str, n: int, timeout_s: float = 30.0, idle_s: float = 0.3
) -> list[Message]:
    """At least `n` messages of `topic` from the start, plus any that follow within `idle_s`."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "r", "fetch.wait.max.ms": 20})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        got: list[Message] = []
        deadline = time.monotonic() + timeout_s
        while len(got) < n and time.monotonic() < deadline:
            got.extend(m for m in consumer.consume(500, 0.2) if m.error() is None)
        while more := [m for m in consumer.consume(500, idle_s) if m.error() is None]:
            got.extend(more)
        return got
    finally:
        consumer.close()


class Interrupted(Exception):
    pass


def _history() -> AdBatch:
    """N updates of KEYS ads; vector[0] is the update's sequence number, event times rising."""
    seq = np.arange(N, dtype="float32")
    vectors = np.ones((N, DIM), "float32")
    vectors[:, 0] = seq + 1
    return AdBatch.upserts(np.arange(N) % KEYS, vectors, T0 + 10 * np.arange(N))


def _check_target(messages: list[Message], expected: AdBatch) -> Counter[int]:
    """Every expected event is there, in per-key order, with its event time; returns dups."""
    codec = AdCodec(LocalSchemaRegistry(), DIM)
    ordered = sorted(messages, key=lambda m: (m.partition(), m.offset()))
    got, rejected = codec.decode([m.value() for m in ordered])
    assert rejected == []
    assert [m.timestamp()[1] for m in ordered] == got.event_time_ms.tolist()
    assert [m.key() for m in ordered] == [int(i).to_bytes(8, "big") for i in got.ad_ids]
    seqs = got.vectors[:, 0].astype(int)
    dups = Counter(s for s, c in Counter(seqs.tolist()).items() for _ in range(c - 1))
    want = expected.vectors[:, 0].astype(int)
    assert set(seqs.tolist()) == set(want.tolist())
    for ad in np.unique(expected.ad_ids):
        mine = seqs[got.ad_ids == ad]
        first_seen = list(dict.fromkeys(mine.tolist()))
        assert first_seen == want[expected.ad_ids == ad].tolist()
    by_seq = dict(zip(seqs.tolist(), got.event_time_ms.tolist(), strict=True))
    assert all(by_seq[int(s)] == int(t) for s, t in zip(want, expected.event_time_ms, strict=True))
    return dups


def _rows(messages: list[Message]) -> set[int]:
    """The history rows (vector[0] - 1, see `_history`) of `messages`."""
    got, _ = AdCodec(LocalSchemaRegistry(), DIM).decode([m.value() for m in messages])
    return {int(v) - 1 for v in got.vectors[:, 0]}


def _publisher(bootstrap: str, topic: str) -> Publisher:
    return Publisher(make_producer(KafkaConfig(bootstrap_servers=bootstrap)), topic)


def test_replay_file_resumes_after_interruption_without_gaps(
    bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path
) -> None:
    history = _history()
    path = tmp_path / "ads.avro"
    write_avro_file(path, [history])
    target = topic_factory("replay", partitions=3)
    ckpt = tmp_path / "replay.ckpt"
    registry = LocalSchemaRegistry()

    def crash(sent: int) -> None:
        if sent >= N // 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        replay_file(path, _publisher(bootstrap, target), registry, checkpoint=ckpt,
                    batch_size=70, on_sent=crash)  # fmt: skip
    saved = json.loads(ckpt.read_text())
    assert N // 2 <= saved["position"]["rows"] < N
    assert saved["delivered"] == saved["position"]["rows"]

    result = replay_file(path, _publisher(bootstrap, target), registry, checkpoint=ckpt,
                         batch_size=70)  # fmt: skip
    assert result.resumed_from == saved["delivered"]
    assert result.stats.delivered == N - saved["delivered"]
    assert result.checkpoint.position == {"rows": N}
    dups = _check_target(consume_all(bootstrap, target, N), history)
    assert sum(dups.values()) == 0

    again = replay_file(path, _publisher(bootstrap, target), registry, checkpoint=ckpt)
    assert again.stats.sent == 0


def test_replay_killed_with_sigkill_resumes_with_at_most_the_unconfirmed_tail(
    bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path
) -> None:
    history = _history()
    path = tmp_path / "ads.avro"
    write_avro_file(path, [history])
    target = topic_factory("kill", partitions=3)
    ckpt = tmp_path / "kill.ckpt"
    batch = 40
    argv = [sys.executable, "-c", CLI, "replay", "--from-file", str(path),
            "--to-topic", target, "--bootstrap-servers", bootstrap, "--checkpoint", str(ckpt),
            "--batch-size", str(batch)]  # fmt: skip
    proc = subprocess.Popen([*argv, "--rate", "400"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpt.exists() and json.loads(ckpt.read_text())["delivered"] >= N // 3:
                break
            time.sleep(0.02)
    finally:
        proc.kill()  # SIGKILL: no flush, no final checkpoint
        proc.wait()
    confirmed = json.loads(ckpt.read_text())["delivered"]
    assert N // 3 <= confirmed < N
    # what the killed run got into the topic: the confirmed rows and an unconfirmed tail (its
    # length is the broker's delivery latency times the rate, so it grows under load)
    landed = _rows(consume_all(bootstrap, target, confirmed, idle_s=1.0))
    tail = landed - set(range(confirmed))
    assert set(range(confirmed)) <= landed and tail <= set(range(confirmed, N))

    assert subprocess.run(argv, stdout=subprocess.DEVNULL, check=False).returncode == 0
    dups = _check_target(consume_all(bootstrap, target, N), history)
    # only what was sent after the last checkpoint, and not yet confirmed, can come twice
    assert {seq - 1 for seq in dups} <= tail
    assert sum(dups.values()) <= len(tail)


def test_replay_topic_time_range_keeps_order_and_resumes(
    bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path
) -> None:
    history = _history()
    source = topic_factory("source", partitions=3)
    target = topic_factory("target", partitions=2)
    codec = AdCodec(LocalSchemaRegistry(), DIM)
    publish_batches(_publisher(bootstrap, source), codec, [history])
    start_ms, end_ms = T0 + 10 * 100, T0 + 10 * 500
    ckpt = tmp_path / "topic.ckpt"
    cfg = KafkaConfig(bootstrap_servers=bootstrap)

    def run(max_events: int | None) -> int:
        consumer = make_consumer(cfg, "replay-test", **{"enable.partition.eof": True})
        try:
            result = replay_topic(consumer, source, _publisher(bootstrap, target),
                                  start_ms=start_ms, end_ms=end_ms, checkpoint=ckpt,
                                  batch_size=50, max_events=max_events, idle_s=0.5)  # fmt: skip
        finally:
            consumer.close()
        assert result.stats.failed == 0
        return result.stats.delivered

    first = run(150)
    assert first == 150
    cp = load_checkpoint(ckpt, f"topic:{source}[{start_ms},{end_ms})", target)
    assert cp.delivered == 150
    second = run(None)
    assert first + second == 400
    expected = history.take(np.arange(100, 500))
    dups = _check_target(consume_all(bootstrap, target, 400), expected)
    assert sum(dups.values()) == 0


def test_replay_cli_file_with_checkpoint(
    bootstrap: str,
    topic_factory: Callable[..., str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    history = _history()
    path = tmp_path / "ads.avro"
    write_avro_file(path, [history])
    target = topic_factory("cli", partitions=2)
    argv = ["replay", "--from-file", str(path), "--to-topic", target, "--bootstrap-servers",
            bootstrap, "--checkpoint", str(tmp_path / "c.ckpt"), "--speed", "1000"]  # fmt: skip
    assert main([*argv, "--max-events", "200"]) == 0
    assert "200 of 200 events delivered" in capsys.readouterr().out
    assert main(argv) == 0
    assert "(resumed after 200 delivered earlier)" in capsys.readouterr().out
    assert sum(_check_target(consume_all(bootstrap, target, N), history).values()) == 0


def test_replay_cli_failed_deliveries_exit_nonzero_and_leave_no_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ads.avro"
    write_avro_file(path, [_history().take(np.arange(20))])
    config = tmp_path / "c.toml"
    config.write_text('[kafka.client]\n"message.timeout.ms" = "500"\n')
    ckpt = tmp_path / "c.ckpt"
    argv = ["replay", "--from-file", str(path), "--to-topic", "t", "--config", str(config),
            "--bootstrap-servers", f"127.0.0.1:{free_port()}", "--checkpoint", str(ckpt)]  # fmt: skip
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "0 of 20 events delivered" in captured.out and "20 failed" in captured.out
    assert "20 events not delivered" in captured.err
    assert not ckpt.exists()


def test_replay_refuses_a_checkpoint_of_another_replay(tmp_path: Path) -> None:
    ckpt = tmp_path / "c.ckpt"
    ckpt.write_text(
        json.dumps({"source": "file:/x", "target": "t", "position": {}, "delivered": 0})
    )
    with pytest.raises(ConfigError, match="belongs to a replay of file:/x -> t"):
        load_checkpoint(ckpt, "file:/y", "t")


def test_replay_payload_id_reads_the_leading_avro_long() -> None:
    codec = AdCodec(LocalSchemaRegistry(), DIM)
    ids = np.array([0, 1, -1, 2**40, -(2**62)])
    values = codec.encode(AdBatch.upserts(ids, np.ones((5, DIM)), T0))
    assert [payload_id(v) for v in values] == ids.tolist()
    assert payload_id(b"\x00\x00") is None


def test_replay_cli_keeps_history_event_times_under_a_rate_and_prints_json(
    bootstrap: str,
    topic_factory: Callable[..., str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Replay sends history: unlike `produce` of a file without times, it never re-stamps."""
    history = _history()
    path = tmp_path / "ads.avro"
    write_avro_file(path, [history])
    target = topic_factory("rate", partitions=3)
    argv = ["replay", "--from-file", str(path), "--to-topic", target,
            "--bootstrap-servers", bootstrap, "--rate", "2000", "--json"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["sent"], summary["delivered"], summary["failed"]) == (N, N, 0)
    assert summary["topic"] == target and summary["resumed_from"] == 0
    assert summary["elapsed_s"] > 0 and summary["events_per_s"] > 0
    assert sum(_check_target(consume_all(bootstrap, target, N), history).values()) == 0
