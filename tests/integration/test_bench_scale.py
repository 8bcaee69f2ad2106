"""`annstream bench scale` at a tiny size: one JSON object with the growth figures and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from annstream.cli import main


def test_bench_scale_prints_growth_memory_and_catch_up(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plot = tmp_path / "scale.png"
    argv = ["bench", "scale", "--json", "--ads", "8000,16000", "--ads-384", "4000"]
    argv += ["--heads", "300,600", "--heads-base", "300", "--nlist", "64", "--nprobe", "8"]
    argv += ["--events", "300", "--batches", "2", "--catchup", "3000", "--catchup-heads", "300"]
    argv += ["--catchup-batches", "500,3000", "--catchup-scan-k", "1000000", "--plot", str(plot)]
    main(argv)
    result = json.loads(capsys.readouterr().out)
    assert result["benchmark"] == "scale"
    assert result["incremental_growth"] > 0 and result["full_growth"] > 0
    assert [(p["dim"], p["ads"]) for p in result["catalogue"]] == [
        (50, 8000),
        (50, 16000),
        (384, 4000),
    ]
    assert [p["heads"] for p in result["heads"]] == [300, 600]
    for p in result["catalogue"] + result["heads"]:
        assert p["incremental_s"] > 0 and p["full_s"] > 0
        assert p["bytes_per_ad"] >= 4 * p["dim"] + 8 and p["bytes_per_head"] > 12 * 120
    assert result["retrain"]["slots_after"] == result["retrain"]["slots_before"]
    catch = result["catch_up"]
    small, large = catch["batch_500_scan_k_1000000"], catch["batch_3000_scan_k_1000000"]
    assert large["lists_per_ad"] < small["lists_per_ad"] and large["full_searches"] == 0
    assert plot.stat().st_size > 0
