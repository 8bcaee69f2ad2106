"""The topics annstream reads and writes: their settings, and the check the service makes at start.

Outside the embedded broker, topics are created ahead by whoever runs Kafka
(deploy/kafka/create-topics.sh, Terraform, an operator) with the partitions, replication and
retention the cluster needs. A missing topic is then a mistake (a typo in a name would read
nothing, forever), so the service refuses to start, naming it. With `kafka.create_topics = true`
(the demo, the benchmarks, the tests, a development setup) the service creates what is missing,
with `kafka.topic_partitions` and `kafka.topic_replication` (-1: the broker's `num.partitions`
and `default.replication.factor`) and the settings below; the head-state changelog always gets
as many partitions as the engagement topic. `annstream broker` creates them all at its start.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from annstream.config import KafkaConfig
from annstream.errors import BrokerError, ConfigError

__all__ = [
    "TOPIC_CONFIGS",
    "Topic",
    "ensure_topics",
    "existing_topics",
    "topic_plan",
]

logger = logging.getLogger(__name__)

_DAY_MS = 86_400_000
TOPIC_CONFIGS: dict[str, dict[str, str]] = {
    # every replica rebuilds its whole ad index from it: the latest event per ad id
    "ad_topic": {"cleanup.policy": "compact"},
    "engagement_topic": {"cleanup.policy": "delete", "retention.ms": str(7 * _DAY_MS)},
    # snapshots are written at least daily; records have no keys, so never compacted
    "head_state_topic": {"cleanup.policy": "delete", "retention.ms": str(7 * _DAY_MS)},
    "dead_letter_topic": {"cleanup.policy": "delete", "retention.ms": str(14 * _DAY_MS)},
    # the latest neighbour list per query id; a tombstone removes a query that left
    "results_topic": {"cleanup.policy": "compact"},
}
"""Topic-level settings per `kafka.*_topic` key, used when annstream creates a topic."""


@dataclass(frozen=True)
class Topic:
    """One topic of the configured set: its name, the setting naming it, how to create it."""

    name: str
    setting: str
    config: dict[str, str] = field(default_factory=dict)
    same_partitions_as: str = ""


def topic_plan(k: KafkaConfig) -> list[Topic]:
    """Every topic the service reads or writes (the results topic only when configured)."""
    keys = ["ad_topic", "engagement_topic", "dead_letter_topic", "results_topic"]
    out = [
        Topic(getattr(k, key), f"kafka.{key}", dict(TOPIC_CONFIGS[key]))
        for key in keys
        if getattr(k, key)
    ]
    out.append(
        Topic(
            k.head_state_topic,
            "kafka.head_state_topic",
            dict(TOPIC_CONFIGS["head_state_topic"]),
            same_partitions_as=k.engagement_topic,
        )
    )
    return out


def _admin(k: KafkaConfig) -> Any:
    from confluent_kafka.admin import AdminClient

    from annstream.kafka import client_logging

    return AdminClient(
        {"bootstrap.servers": k.bootstrap_servers, "log_level": 3, **client_logging(), **k.client}
    )


def existing_topics(k: KafkaConfig, timeout_s: float = 10.0) -> dict[str, int]:
    """Topic name -> partition count, as the cluster's metadata says."""
    from confluent_kafka import KafkaException

    admin = _admin(k)
    try:
        meta = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        error = exc.args[0].str() if exc.args and hasattr(exc.args[0], "str") else str(exc)
        raise BrokerError(
            f"Kafka: no broker answered at {k.bootstrap_servers} within {timeout_s:g}s "
            f"({error}); is a broker up at kafka.bootstrap_servers?"
        ) from None
    return {name: len(t.partitions) for name, t in meta.topics.items() if t.error is None}


def _wait_for(k: KafkaConfig, name: str, timeout_s: float) -> dict[str, int]:
    """The cluster's topics once `name` shows in its metadata (a topic just created may take
    a moment to)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = existing_topics(k, timeout_s)
        if found.get(name) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def ensure_topics(k: KafkaConfig, timeout_s: float = 10.0) -> dict[str, int]:
    """Check that every topic of `topic_plan(k)` exists (creating the missing ones when
    `kafka.create_topics` is true) and that the head-state changelog has one partition per
    engagement partition; returns topic -> partition count. ConfigError naming what is wrong."""
    from annstream.broker import create_topics

    found = existing_topics(k, timeout_s)
    plan = topic_plan(k)
    missing = [t for t in plan if t.name not in found]
    if missing and not k.create_topics:
        named = ", ".join(f"{t.name!r} ({t.setting})" for t in missing)
        raise ConfigError(
            f"topics missing on the Kafka cluster at {k.bootstrap_servers}: {named}; create "
            "them (deploy/kafka/create-topics.sh has the settings) or set "
            "kafka.create_topics = true to let the service create them with "
            "kafka.topic_partitions and kafka.topic_replication"
        )
    for t in missing:
        partitions = k.topic_partitions
        if t.same_partitions_as:
            found = _wait_for(k, t.same_partitions_as, timeout_s)
            partitions = found[t.same_partitions_as]
        create_topics(
            k.bootstrap_servers,
            [t.name],
            partitions=partitions,
            replication=k.topic_replication,
            timeout_s=timeout_s,
            client=k.client,
            config=t.config,
        )
        logger.info(
            "created topic %s (%s) with %s partitions, replication %s, %s",
            t.name,
            t.setting,
            partitions if partitions > 0 else "the broker's default",
            k.topic_replication if k.topic_replication > 0 else "the broker's default",
            t.config,
        )
    for t in missing:
        found = _wait_for(k, t.name, timeout_s)
    for t in plan:
        want = found.get(t.same_partitions_as) if t.same_partitions_as else None
        if want is not None and found.get(t.name) != want:
            raise ConfigError(
                f"{t.setting} {t.name!r} has {found.get(t.name)} partitions and the engagement "
                f"topic {t.same_partitions_as!r} {want}: the head-state changelog needs one "
                f"partition per engagement partition; recreate it with {want}"
            )
    return {t.name: found.get(t.name, 0) for t in plan}
