"""Topics at start-up against the real broker: a missing topic stops the service in one line
naming it and the fix, unless `kafka.create_topics`, which creates them with the configured
partitions; the head-state changelog must have one partition per engagement partition."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from annstream.broker import create_topics
from annstream.cli import main
from annstream.config import KafkaConfig, load_config
from annstream.errors import ConfigError
from annstream.topics import TOPIC_CONFIGS, ensure_topics, existing_topics, topic_plan
from consumers.service import RefresherService


def _names(tag: str) -> dict[str, str]:
    return {
        "ad_topic": f"ads-{tag}",
        "engagement_topic": f"eng-{tag}",
        "dead_letter_topic": f"dlq-{tag}",
        "head_state_topic": f"hs-{tag}",
        "results_topic": f"res-{tag}",
    }


def test_missing_topics_stop_the_service_naming_them_and_the_fix(
    bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path
) -> None:
    """Issue 15 item 6: a typo in a topic name used to create that topic (1 partition) and
    read nothing, silently."""
    names = _names(uuid.uuid4().hex[:8])
    names["ad_topic"] = topic_factory("ads", 2)
    names["engagement_topic"] = topic_factory("eng", 3)
    cfg = load_config(
        env={},
        overrides={
            "kafka": {"bootstrap_servers": bootstrap, **names},
            "store": {"url": f"sqlite:///{tmp_path / 'n.db'}"},
            "snapshot": {"dir": str(tmp_path / "snap")},
        },
    )
    with pytest.raises(ConfigError) as info:
        RefresherService.from_config(cfg)
    line = str(info.value)
    assert "\n" not in line
    for key in ("dead_letter_topic", "head_state_topic", "results_topic"):
        assert f"{names[key]!r} (kafka.{key})" in line
    assert "kafka.create_topics = true" in line and "create-topics.sh" in line
    assert names["ad_topic"] not in line
    found = existing_topics(cfg.kafka)
    assert not {names["dead_letter_topic"], names["head_state_topic"]} & set(found)


def test_the_run_command_prints_the_missing_topic_in_one_line(
    bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = f"annstream.adz-{uuid.uuid4().hex[:6]}"
    path = tmp_path / "c.toml"
    path.write_text(
        f'[kafka]\nbootstrap_servers = "{bootstrap}"\nad_topic = "{typo}"\n'
        f'[store]\nurl = "sqlite:///{tmp_path / "n.db"}"\n'
    )
    assert main(["run", "--config", str(path)]) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith("annstream run: error: topics missing")
    assert f"{typo!r} (kafka.ad_topic)" in line


def test_create_topics_uses_the_configured_partitions(bootstrap: str) -> None:
    tag = uuid.uuid4().hex[:8]
    names = _names(tag)
    cfg = KafkaConfig(
        bootstrap_servers=bootstrap,
        create_topics=True,
        topic_partitions=4,
        topic_replication=1,
        **names,
    )
    got = ensure_topics(cfg)
    assert got == {
        names["ad_topic"]: 4,
        names["engagement_topic"]: 4,
        names["dead_letter_topic"]: 4,
        names["results_topic"]: 4,
        names["head_state_topic"]: 4,
    }
    assert ensure_topics(cfg) == got  # idempotent
    # the broker's default (-1) for both: whatever it is, the changelog follows the engagements
    other = _names(f"{tag}-d")
    found = ensure_topics(KafkaConfig(bootstrap_servers=bootstrap, create_topics=True, **other))
    assert found[other["head_state_topic"]] == found[other["engagement_topic"]] >= 1


def test_a_changelog_with_other_partitions_than_the_engagements_is_refused(
    bootstrap: str,
) -> None:
    names = _names(uuid.uuid4().hex[:8])
    create_topics(bootstrap, [names["engagement_topic"]], partitions=3)
    create_topics(bootstrap, [names["head_state_topic"]], partitions=2)
    cfg = KafkaConfig(bootstrap_servers=bootstrap, create_topics=True, **names)
    with pytest.raises(ConfigError, match=r"has 2 partitions and the engagement topic .* 3"):
        ensure_topics(cfg)


def test_the_topic_plan_compacts_what_is_keyed_by_its_latest_state() -> None:
    plan = {t.setting: t for t in topic_plan(KafkaConfig(results_topic="r"))}
    assert plan["kafka.ad_topic"].config["cleanup.policy"] == "compact"
    assert plan["kafka.results_topic"].config["cleanup.policy"] == "compact"
    assert plan["kafka.head_state_topic"].config == TOPIC_CONFIGS["head_state_topic"]
    assert plan["kafka.head_state_topic"].same_partitions_as == "annstream.engagements"
    assert "kafka.results_topic" not in {t.setting for t in topic_plan(KafkaConfig())}


def test_the_broker_command_creates_every_topic_the_service_checks(tmp_path: Path) -> None:
    """`annstream broker` then `annstream run` against it: every topic (the head-state
    changelog and a configured results topic included) exists, so the service starts without
    kafka.create_topics."""
    import os
    import signal
    import subprocess
    import sys

    from annstream.broker import free_port

    port = free_port()
    config = tmp_path / "c.toml"
    config.write_text('[kafka]\nresults_topic = "annstream.neighbours"\n')
    argv = [sys.executable, "-m", "annstream", "broker", "--port", str(port)]
    with subprocess.Popen(
        [*argv, "--partitions", "2", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            lines = [proc.stdout.readline() for _ in range(2)]
            assert lines[0].strip() == f"127.0.0.1:{port}" and "ready" in lines[1], lines
            cfg = load_config(
                config, env={}, overrides={"kafka": {"bootstrap_servers": f"127.0.0.1:{port}"}}
            )
            assert ensure_topics(cfg.kafka) == {
                "annstream.ads": 2,
                "annstream.engagements": 2,
                "annstream.dead-letter": 2,
                "annstream.neighbours": 2,
                "annstream.head-state": 2,
            }
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
