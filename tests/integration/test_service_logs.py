"""`annstream --log-json run` while its broker goes away: every line it writes is one JSON
object, librdkafka's own lines included (issue 15 item 7: 214 of 216 lines were not JSON)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from annstream.broker import EmbeddedBroker, create_topics
from annstream.testing.harness import ENG_PARTITIONS, RESTORED, Topics, service_settings, to_toml

pytest_plugins = ["service_harness"]

DOWN_S = 8.0


def _wait_for(proc: subprocess.Popen[bytes], log: Path, text: str, guard_s: float = 90.0) -> None:
    deadline = time.monotonic() + guard_s
    while log.read_text(errors="replace").count(text) < ENG_PARTITIONS:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, f"no {text!r}:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def test_log_json_lines_stay_json_while_the_broker_is_down(
    training_file: Path, tmp_path: Path
) -> None:
    broker = EmbeddedBroker().start()
    run = uuid.uuid4().hex[:8]
    topics = Topics(f"ads-{run}", f"eng-{run}", f"dlq-{run}", f"head-state-{run}")
    create_topics(broker.bootstrap_servers, [topics.ads], partitions=2)
    create_topics(broker.bootstrap_servers, [topics.engagements], partitions=ENG_PARTITIONS)
    create_topics(broker.bootstrap_servers, [topics.dead_letters])
    settings = service_settings(
        broker.bootstrap_servers,
        topics,
        training_file,
        f"sqlite:///{tmp_path / 'store.db'}",
        tmp_path / "snap",
        f"logs-{run}",
        service={"shutdown_timeout_s": 3.0, "flush_timeout_s": 1.0},
    )
    config = tmp_path / "annstream.toml"
    config.write_text(to_toml(settings))
    log = tmp_path / "service.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "annstream.cli", "--log-json", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        _wait_for(proc, log, RESTORED)
        broker.stop()
        time.sleep(DOWN_S)
        assert proc.poll() is None, log.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        broker.stop()
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    docs: list[dict[str, Any]] = []
    for line in lines:
        try:
            doc = json.loads(line)
        except ValueError:
            raise AssertionError(f"not JSON: {line!r}") from None
        assert isinstance(doc, dict) and {"ts", "level", "logger", "message"} <= set(doc), line
        docs.append(doc)
    client = [d for d in docs if d["logger"] == "annstream.kafka.client"]
    assert client, "librdkafka's lines about the broker going away were not logged"
    assert all("client" in d or "code" in d for d in client)
    assert any(
        d["logger"] == "annstream.cli.run" and d["message"].startswith("stopped") for d in docs
    )
