"""The crash points' arming file: counted down per hit of its own point only, refused when
unknown. (Reaching zero kills the process: the fault bench and its test exercise that.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from annstream.testing.crash_points import _hit, arm


def test_a_point_counts_down_only_on_its_own_hits(tmp_path: Path) -> None:
    kill_file = tmp_path / "kill-at"
    arm(kill_file, "store_written", 3)
    _hit(kill_file, "snapshot")
    _hit(kill_file, "restore")
    assert kill_file.read_text().split() == ["store_written", "3"]
    _hit(kill_file, "store_written")
    assert kill_file.read_text().split() == ["store_written", "2"]


def test_no_file_or_a_bad_file_does_nothing(tmp_path: Path) -> None:
    _hit(tmp_path / "absent", "snapshot")
    garbage = tmp_path / "garbage"
    garbage.write_text("nonsense")
    _hit(garbage, "snapshot")
    assert garbage.read_text() == "nonsense"


def test_unknown_points_and_counts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="point must be one of"):
        arm(tmp_path / "k", "commit", 1)
    with pytest.raises(ValueError, match="hits >= 1"):
        arm(tmp_path / "k", "snapshot", 0)
