from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from confluent_kafka import Consumer, Producer

from annstream.broker import EmbeddedBroker


def test_broker_round_trip_through_real_client(
    bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    topic = topic_factory()
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(10):
        producer.produce(topic, key=str(i).encode(), value=f"v{i}".encode())
    assert producer.flush(10) == 0
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "g-" + topic,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
            "fetch.wait.max.ms": 50,
        }
    )
    consumer.subscribe([topic])
    got: list[bytes] = []
    try:
        for _ in range(100):
            got.extend(m.value() for m in consumer.consume(10, 0.5) if not m.error())
            if len(got) >= 10:
                break
    finally:
        consumer.close()
    assert got == [f"v{i}".encode() for i in range(10)]


def test_broker_stops_by_pid() -> None:
    broker = EmbeddedBroker().start()
    pid = broker.pid
    assert pid is not None
    broker.stop()
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().split()[2] == "Z"
