"""Shared fixtures: a real Kafka-protocol broker per session, topic and client factories."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from annstream.broker import EmbeddedBroker, create_topics


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[EmbeddedBroker]:
    """One Tansu broker for the whole session, on a free loopback port, stopped by PID."""
    with EmbeddedBroker() as broker:
        yield broker


@pytest.fixture
def bootstrap(kafka_broker: EmbeddedBroker) -> str:
    return kafka_broker.bootstrap_servers


@pytest.fixture
def topic_factory(bootstrap: str) -> Callable[..., str]:
    """Create a fresh uniquely named topic: `topic_factory(partitions=3)`."""

    def make(prefix: str = "t", partitions: int = 1) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        create_topics(bootstrap, [name], partitions=partitions)
        return name

    return make
