"""The results topic against the real broker: records keyed by query id that Confluent's
AvroDeserializer reads back into exactly the lists published (K + margin, campaign and
advertiser ids), tombstones for exits, and a record over the message limit counted, not
raised."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Callable
from typing import Any

import fastavro
import numpy as np
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from annstream.config import KafkaConfig
from annstream.kafka import make_consumer, make_producer
from annstream.results import ResultsPublisher, encode_lists, query_key
from annstream.schemas import ConfluentSchemaRegistry, frame, load_schema, open_registry
from annstream.store.record import NeighbourLists

K, MARGIN = 100, 20


def lists_of(
    query_ids: list[int], seed: int, width: int = K + MARGIN, meta: bool = True
) -> NeighbourLists:
    rng = np.random.default_rng(seed)
    n = len(query_ids)
    ids = rng.integers(0, 1 << 50, (n, width), dtype=np.int64)
    ids[:, -3:] = -1  # padding
    scores = -np.sort(-rng.random((n, width), dtype=np.float32), axis=1)
    scores[:, -3:] = -np.inf
    return NeighbourLists(
        query_ids=np.asarray(query_ids, dtype=np.int64),
        ids=ids,
        scores=scores,
        versions=np.full(n, 1_764_000_000_123, dtype=np.int64) + np.arange(n),
        computed_at_ms=np.full(n, 1_764_000_000_000, dtype=np.int64),
        k=K,
        campaign_ids=rng.integers(-1, 1 << 40, (n, width), dtype=np.int64) if meta else None,
        advertiser_ids=rng.integers(-1, 1 << 40, (n, width), dtype=np.int64) if meta else None,
    )


def read_all(consumer: Consumer, topic: str, count: int) -> list[Any]:
    consumer.assign([TopicPartition(topic, 0, 0)])
    out: list[Any] = []
    deadline = time.monotonic() + 60
    while len(out) < count and time.monotonic() < deadline:
        out += [m for m in consumer.consume(500, 0.2) if m.error() is None]
    assert len(out) == count, f"read {len(out)} of {count}"
    return out


def assert_row(record: dict[str, Any], lists: NeighbourLists, row: int) -> None:
    assert record["query_id"] == int(lists.query_ids[row])
    np.testing.assert_array_equal(np.frombuffer(record["neighbour_ids"], "<i8"), lists.ids[row])
    np.testing.assert_array_equal(np.frombuffer(record["scores"], "<f4"), lists.scores[row])
    assert record["k"] == lists.k and record["version"] == int(lists.versions[row])
    at = record["computed_at"]
    assert int(at.timestamp() * 1000) == int(lists.computed_at_ms[row])
    for field, column in (
        ("campaign_ids", lists.campaign_ids),
        ("advertiser_ids", lists.advertiser_ids),
    ):
        if column is None:
            assert record[field] is None
        else:
            np.testing.assert_array_equal(np.frombuffer(record[field], "<i8"), column[row])


def test_hand_written_records_equal_fastavro_ones() -> None:
    schema = load_schema("neighbour_list.avsc")
    for meta in (True, False):
        lists = lists_of([0, 7, -1 + (1 << 62), 123_456_789], seed=1, meta=meta)
        for row, value in enumerate(encode_lists(lists, 4)):
            buf = io.BytesIO()
            record = {
                "query_id": int(lists.query_ids[row]),
                "neighbour_ids": lists.ids[row].tobytes(),
                "scores": lists.scores[row].tobytes(),
                "k": K,
                "version": int(lists.versions[row]),
                "computed_at": int(lists.computed_at_ms[row]),
                "campaign_ids": None if not meta else lists.campaign_ids[row].tobytes(),
                "advertiser_ids": None if not meta else lists.advertiser_ids[row].tobytes(),
            }
            fastavro.schemaless_writer(buf, schema, record)
            assert value == frame(4, buf.getvalue())


def test_results_records_read_by_confluent_deserializer_and_tombstones(
    bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    topic = topic_factory("results")
    kafka = KafkaConfig(
        bootstrap_servers=bootstrap,
        results_topic=topic,
        schema_registry_url=f"mock://{uuid.uuid4().hex}",
    )
    registry = open_registry(kafka)
    assert isinstance(registry, ConfluentSchemaRegistry)
    producer = make_producer(kafka)
    publisher = ResultsPublisher(producer, topic, registry)
    lists = lists_of(list(range(1000, 1300)), seed=2)
    publisher.publish(lists, exited=[1000, 5])
    publisher.flush(30)
    assert (publisher.records, publisher.tombstones, publisher.too_large) == (300, 2, 0)

    consumer = make_consumer(kafka, group_id=f"read-{topic}")
    try:
        messages = read_all(consumer, topic, 302)
    finally:
        consumer.close()
    reader = AvroDeserializer(registry.client)
    context = SerializationContext(topic, MessageField.VALUE)
    for row, m in enumerate(messages[:300]):
        assert m.key() == query_key(int(lists.query_ids[row]))
        assert_row(reader(m.value(), context), lists, row)
    assert [(m.key(), m.value()) for m in messages[300:]] == [
        (query_key(1000), None),
        (query_key(5), None),
    ]
    assert registry.client.get_subjects() == [f"{topic}-value"]


def test_a_record_over_the_message_limit_is_counted_not_raised(
    bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    topic = topic_factory("results-large")
    kafka = KafkaConfig(bootstrap_servers=bootstrap, results_topic=topic)
    publisher = ResultsPublisher(make_producer(kafka), topic, open_registry(kafka))
    huge = lists_of([1], seed=3, width=50_000)  # 1.4 MB: over the 1,000,000-byte limit
    publisher.publish(huge)
    publisher.publish(lists_of([2, 3], seed=4))
    publisher.flush(30)
    assert (publisher.records, publisher.too_large) == (2, 1)
