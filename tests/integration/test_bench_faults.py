"""`annstream bench faults` end to end at a tiny size: every fault kind once, short pauses."""

from __future__ import annotations

import json

import pytest

from annstream.cli import main


def test_bench_faults_survives_every_fault_and_loses_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["bench", "faults", "--json", "--kills", "1", "--corrupts", "1", "--pauses", "1"]
    argv += ["--outages", "1", "--fault-min-s", "2", "--fault-max-s", "3", "--bad-inputs", "30"]
    argv += ["--engagements", "1200", "--stream-ads", "300", "--seed", "3"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["benchmark"] == "faults"
    assert result["faults_injected"] == 4
    assert {f["kind"] for f in result["faults"]} == {"kill", "corrupt", "pause", "outage"}
    assert result["faults_survived"] == 4
    assert result["bad_inputs"] == 30 and result["bad_inputs_dead_lettered"] == 30
    assert result["dead_letters_without_reason"] == 0
    assert result["messages_lost"] == 0
    assert result["oracle_match"] == 1.0
    assert result["exit_code"] == 0
