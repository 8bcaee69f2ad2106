"""Issue 15's "done when": a Confluent `AvroDeserializer` with a registry client decodes every
topic the project writes. The service runs against the real broker and a real HTTP schema
registry (annstream.testing.schema_registry), then a plain consumer walks the ad, engagement,
dead-letter, head-state and results topics and decodes every value with Confluent's own
deserializer: Avro everywhere, except dead letters whose original was not Avro (they carry the
original bytes) and the results topic's tombstones (null). The results records equal the
stored lists of every head query."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from annstream.codec import AdCodec, EngagementCodec
from annstream.config import KafkaConfig
from annstream.events import AdBatch, EngagementBatch
from annstream.kafka import headers_dict, make_consumer
from annstream.results import query_key
from annstream.schemas import open_registry
from annstream.testing.harness import (
    DIM,
    T0,
    Feed,
    Topics,
    committed_offsets,
    service_settings,
    step_until,
    to_config,
    workload,
)
from annstream.testing.schema_registry import FakeSchemaRegistry
from annstream.topics import existing_topics
from consumers.head_state import decode_state
from consumers.service import RefresherService

pytest_plugins = ["service_harness"]

GARBAGE = {b"not avro at all", b"\x00\x00\x00\x00\x01garbage"}
"""What `Feed.bad_messages` writes: not Avro (the second one only looks framed)."""


def read_topic(bootstrap: str, topic: str, partitions: int, quiet_s: float = 2.0) -> list[Any]:
    """Every record of `topic`, read until nothing new came for `quiet_s` (the broker's end
    offsets are not trusted)."""
    consumer: Consumer = make_consumer(
        KafkaConfig(bootstrap_servers=bootstrap), group_id=f"walk-{uuid.uuid4().hex[:8]}"
    )
    out: list[Any] = []
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        last = time.monotonic()
        deadline = last + 60
        while time.monotonic() - last < quiet_s and time.monotonic() < deadline:
            got = [m for m in consumer.consume(1000, 0.2) if m.error() is None]
            if got:
                out += got
                last = time.monotonic()
    finally:
        consumer.close()
    return out


def refused_but_avro(feed: Feed) -> list[tuple[str, bytes]]:
    """Events that decode as Avro but are refused: a NaN embedding, a negative weight."""
    vec = np.ones((1, DIM), "float32")
    vec[0, 3] = np.nan
    one = np.array([77_777], dtype=np.int64)
    eng = EngagementBatch(
        one,
        one,
        np.zeros(1, "uint8"),
        np.full(1, -1.0, "float32"),
        np.full(1, T0),
        np.ones((1, DIM), "float32"),
        np.ones(1, bool),
    )
    return [
        (feed.topics.ads, feed.ad_codec.encode(AdBatch.upserts(one, vec, T0))[0]),
        (feed.topics.engagements, feed.eng_codec.encode(eng)[0]),
    ]


def test_a_confluent_avro_deserializer_decodes_every_topic_annstream_writes(
    bootstrap: str, topics: Topics, training_file: Path, tmp_path: Path
) -> None:
    work = workload(seed=17, engagements=1_500, stream_ads=300)
    group = f"walk-{uuid.uuid4().hex[:8]}"
    results = f"results-{uuid.uuid4().hex[:12]}"
    with FakeSchemaRegistry() as fake:
        settings = service_settings(
            bootstrap,
            topics,
            training_file,
            f"sqlite:///{tmp_path / 'store.db'}",
            tmp_path / "snap",
            group,
            kafka={"schema_registry_url": fake.url, "results_topic": results},
        )
        cfg = to_config(settings)
        feed = Feed(bootstrap, topics)
        registry = open_registry(cfg.kafka)
        feed.ad_codec, feed.eng_codec = AdCodec(registry, DIM), EngagementCodec(registry, DIM)
        for b in work.steps:
            feed.send(b)
        refused = refused_but_avro(feed)
        for topic, value in refused:
            feed.raw(topic, [b"refused!"], [value])
        feed.bad_messages()  # not Avro: dead-lettered as they came
        feed.flush()
        service = RefresherService.from_config(cfg)
        try:
            step_until(
                [service],
                lambda: (
                    service.idle
                    and service.ads.offsets == feed.ends[topics.ads]
                    and committed_offsets(bootstrap, topics.engagements, group)
                    == feed.engagement_ends
                ),
                "every event consumed, stored and committed",
                guard_s=180,
            )
            heads = service.refresher.head_ids() if service.refresher else np.empty(0)
            stored = service.store.lookup(heads)
        finally:
            service.shutdown()
        assert len(heads) == len(work.heads) and stored.found.all()

        reader = AvroDeserializer(SchemaRegistryClient({"url": fake.url}))
        partitions = existing_topics(cfg.kafka)
        decoded: dict[str, list[tuple[Any, dict[str, Any] | None]]] = {}
        for topic in (topics.ads, topics.engagements, topics.dead_letters, topics.head_state):
            decoded[topic] = []
            context = SerializationContext(topic, MessageField.VALUE)
            for m in read_topic(bootstrap, topic, partitions[topic]):
                if m.value() in GARBAGE:  # the test's own, then its dead letters
                    decoded[topic].append((m, None))
                    continue
                record = reader(m.value(), context)
                assert isinstance(record, dict)
                decoded[topic].append((m, record))
        context = SerializationContext(results, MessageField.VALUE)
        latest: dict[bytes, dict[str, Any] | None] = {}
        for m in read_topic(bootstrap, results, partitions[results]):
            latest[m.key()] = None if m.value() is None else reader(m.value(), context)
        assert set(fake.subjects()) >= {
            f"{topics.ads}-value",
            f"{topics.engagements}-value",
            f"{topics.head_state}-value",
            f"{results}-value",
        }

    assert len(decoded[topics.ads]) == feed.messages[topics.ads]
    assert len(decoded[topics.engagements]) == feed.messages[topics.engagements]
    letters = decoded[topics.dead_letters]
    assert len(letters) == 4 and sum(r is None for _, r in letters) == 2
    values = {m.value() for m, _ in letters}
    assert {v for _, v in refused} <= values  # the original bytes, decodable as they were
    reasons = {headers_dict(m)["annstream.reason"].decode() for m, _ in letters}
    assert any("NaN" in r for r in reasons) and any("weight" in r for r in reasons)

    # head state: the deserializer's columns are the changelog's own
    barriers = deltas = 0
    for m, record in decoded[topics.head_state]:
        assert record is not None
        state = decode_state(m.value())
        assert [c["name"] for c in record["columns"]] == list(state)
        assert record["rows"] == len(state.get("query_ids", ()))
        barriers += m.key() == b"\x00barrier"
        deltas += bool(record["rows"])
    assert barriers >= 1 and deltas >= 1

    # the results topic: the latest record of every head query is its stored list
    assert len(latest) == len(heads)
    for row, q in enumerate(heads.tolist()):
        record = latest[query_key(q)]
        assert record is not None and record["query_id"] == q
        np.testing.assert_array_equal(
            np.frombuffer(record["neighbour_ids"], "<i8"), stored.ids[row]
        )
        np.testing.assert_array_equal(np.frombuffer(record["scores"], "<f4"), stored.scores[row])
        assert record["version"] == int(stored.versions[row])
        assert record["campaign_ids"] is not None
        np.testing.assert_array_equal(
            np.frombuffer(record["campaign_ids"], "<i8"), stored.campaign_ids[row]
        )
