"""`annstream bench soak` at a tiny size: 7 days of compressed event time (d = 384, a small
catalogue), three restarts (SIGTERM and SIGKILL), restore time flat, the exact oracle agrees."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pytest

from annstream.cli import main

RESTART_CHECKS = ("deleted_ad_expiring", "orphan_live_list")


@pytest.fixture(scope="module")
def soak() -> dict[str, Any]:
    argv = ["bench", "soak", "--json", "--hours", "168", "--restarts", "3", "--ads", "500"]
    argv += ["--queries", "100", "--engagements-per-hour", "40", "--ad-changes-per-hour", "4"]
    argv += ["--hour-s", "0.05", "--batch-ms", "50", "--dim", "384"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    result: dict[str, Any] = json.loads(out.getvalue())
    return result


def test_bench_soak_restore_time_stays_flat_over_7_days_and_the_oracle_agrees(
    soak: dict[str, Any],
) -> None:
    assert soak["benchmark"] == "soak" and soak["event_days"] == 7.0
    restarts = soak["restarts"]
    assert len(restarts) == 3 and {r["signal"] for r in restarts} == {"SIGTERM", "SIGKILL"}
    assert all(r["caught_up"] for r in restarts), restarts
    # restore time does not grow with uptime (generous: CI machines are noisy)
    assert soak["restore_ratio"] <= 3.0, restarts
    assert soak["restart_ratio"] <= 3.0, restarts
    # the restore reads a bounded part of a changelog that keeps growing
    assert restarts[-1]["restore"]["changelog_end"] > restarts[0]["restore"]["changelog_end"]
    assert soak["restore_records_last"] <= 3 * max(soak["restore_records_first"], 50)
    assert soak["changelog_records"] > 0 and soak["changelog_bytes"] > 0
    assert all(mb is not None and mb > 0 for mb in soak["rss_mb"])
    assert soak["index_ads"] == soak["live_ads"]
    owned = {n: c for n, c in soak["checks"].items() if n not in RESTART_CHECKS}
    assert all(c["failed"] == 0 for c in owned.values()), soak["oracle"]["checks"]
    assert owned["list_exact"]["checked"] > 0
    assert soak["exit_code"] == 0


def test_bench_soak_restart_checks_expiring_lists_and_orphans(soak: dict[str, Any]) -> None:
    checks = soak["checks"]
    assert {n: checks[n]["failed"] for n in RESTART_CHECKS} == dict.fromkeys(RESTART_CHECKS, 0)
