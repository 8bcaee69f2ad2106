from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from annstream.broker import EmbeddedBroker, create_topics
from annstream.errors import BrokerError


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


def _broker_cli(port: int) -> subprocess.CompletedProcess[str]:
    """`annstream broker --port PORT` in its own process; it must give up, not serve."""
    argv = [sys.executable, "-m", "annstream", "broker", "--port", str(port)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_broker_cli_refuses_a_port_another_kafka_broker_holds(
    kafka_broker: EmbeddedBroker,
) -> None:
    """Regression: its own broker failed to bind, the readiness check connected to the other
    one and it reported ready."""
    done = _broker_cli(kafka_broker.port)
    assert done.returncode == 2, done
    assert "ready" not in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"port {kafka_broker.port} on 127.0.0.1 is already in use" in lines[0]


def test_broker_cli_refuses_a_port_a_non_kafka_listener_holds() -> None:
    """Regression: with a plain TCP listener on the port it ended in a traceback."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        done = _broker_cli(port)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in lines[0]


def test_broker_is_ready_only_when_its_own_process_listens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The readiness check asks which process listens, so a port taken between the free-port
    check and the broker's bind is reported, not mistaken for the broker."""
    import annstream.broker as broker_module
    from annstream.broker import owns_listener

    monkeypatch.setattr(broker_module, "_port_in_use", lambda host, port: False)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert owns_listener(os.getpid(), port) is True
        broker = EmbeddedBroker(port=port)
        with pytest.raises(BrokerError, match=f"port {port} on 127.0.0.1 is already in use"):
            broker.start()
    assert broker.pid is None


def test_create_topics_without_a_kafka_broker_is_a_broker_error() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(BrokerError, match=f"Kafka: no broker answered at {address}"):
            create_topics(address, ["t"], timeout_s=2)
