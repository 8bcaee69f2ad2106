"""`annstream bench faults` end to end at a small size (d = 384, 6 h of event time): kill -9
while starting, after a partition's head state is restored and in the middle of a snapshot,
an idle restart, messages over the real 1,000,000-byte limit, judged by the exact oracle.

One run serves the first two tests; a kill -9 between store write and commit is a second run.
The checks of lists that outlive a restart (expiring lists, orphans) have a test of their own.
"""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pytest

from annstream.cli import main
from annstream.testing.oracle import CHECKS

RESTART_CHECKS = ("deleted_ad_expiring", "orphan_live_list")
_SMALL = ["--engagements", "1200", "--stream-ads", "300", "--seed", "3", "--dim", "384"]
_NONE = ["--kills", "0", "--corrupts", "0", "--pauses", "0", "--outages", "0"]
_NONE += ["--startup-kills", "0", "--restore-kills", "0", "--snapshot-kills", "0"]
_NONE += ["--commit-kills", "0", "--idle-restarts", "0"]


def _bench(*argv: str) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["bench", "faults", "--json", *_NONE, *_SMALL, *argv]) == 0
    result: dict[str, Any] = json.loads(out.getvalue())
    return result


@pytest.fixture(scope="module")
def restarts() -> dict[str, Any]:
    return _bench(
        "--startup-kills", "1", "--restore-kills", "1", "--snapshot-kills", "1",
        "--idle-restarts", "1", "--bad-inputs", "20", "--oversized", "2",
    )  # fmt: skip


def test_bench_faults_survives_kills_at_named_points_and_the_oracle_agrees(
    restarts: dict[str, Any],
) -> None:
    result = restarts
    assert result["benchmark"] == "faults"
    kinds = {f["kind"] for f in result["faults"]}
    assert kinds == {"startup_kill", "restore_kill", "snapshot_kill", "idle_restart"}
    assert result["faults_survived"] == result["faults_injected"] == 4
    assert all(f.get("reached", True) for f in result["faults"]), result["faults"]
    assert result["max_message_bytes"] == 1_000_000 and result["oversized_inputs"] >= 2
    assert result["bad_inputs"] == 22 and result["bad_inputs_dead_lettered"] == 22
    assert result["dead_letters_without_reason"] == 0
    assert result["messages_lost"] == 0
    assert result["index_ads"] == result["live_ads"]
    assert set(result["checks"]) == set(CHECKS)
    # decay over 6 h: some queries must be heads, some must have left
    oracle = result["oracle"]
    assert oracle["heads_required"] > 0 and oracle["expiring_lists"] > 0
    owned = {n: c for n, c in result["checks"].items() if n not in RESTART_CHECKS}
    assert all(c["failed"] == 0 for c in owned.values()), oracle["checks"]
    assert owned["list_exact"]["checked"] >= oracle["heads_required"]
    assert owned["version_backwards"]["checked"] > owned["list_exact"]["checked"]
    assert result["exit_code"] == 0


def test_bench_faults_restart_checks_expiring_lists_and_orphans(
    restarts: dict[str, Any],
) -> None:
    checks = restarts["checks"]
    assert {n: checks[n]["failed"] for n in RESTART_CHECKS} == dict.fromkeys(RESTART_CHECKS, 0)


def test_bench_faults_kill_between_store_write_and_commit_leaves_no_orphan_list() -> None:
    """Lists stored for heads the changelog never recorded (killed before it) must not stay
    live and unrefreshed after the restart (they did: orphans holding deleted ads)."""
    result = _bench("--commit-kills", "1", "--bad-inputs", "0", "--oversized", "0")
    assert result["faults"][0]["reached"]
    assert {n: c["failed"] for n, c in result["checks"].items()} == dict.fromkeys(CHECKS, 0)
