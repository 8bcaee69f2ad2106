"""`annstream tune` on real GloVe vectors, a .npy file and a snapshot, at small sizes."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from annstream.cli import main
from annstream.cli.tune import choose
from annstream.config import IndexConfig
from annstream.index import LiveIvfIndex
from annstream.snapshot import write_snapshot

SMALL = ["--n", "20000", "--queries", "200", "--nlist", "64,128", "--nprobe", "2,4,8,16,32"]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _tune(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object]]:
    code = main(["tune", "--json", *argv])
    return code, json.loads(capsys.readouterr().out)


def test_tune_reaches_target_on_glove(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    plot = tmp_path / "tune.png"
    code, out = _tune(capsys, *SMALL, "--target", "0.9", "--plot", str(plot))
    assert code == 0 and out["met"] is True
    assert out["target"] == 0.9 and out["k"] == 10 and out["data"]["base"] == 20_000
    assert out["recall"] >= 0.9
    sweep = out["sweep"]
    assert isinstance(sweep, list) and len(sweep) == 10
    meeting = [r for r in sweep if r["recall"] >= 0.9]
    assert min(r["ms_per_query"] for r in meeting) == out["ms_per_query"]
    assert (out["nlist"], out["nprobe"]) in {(r["nlist"], r["nprobe"]) for r in meeting}
    # recall grows with nprobe for a fixed nlist (same index, superset of lists probed)
    for nlist in (64, 128):
        recalls = [r["recall"] for r in sweep if r["nlist"] == nlist]
        assert recalls == sorted(recalls)
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_tune_reports_a_miss_with_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _tune(
        capsys, "--n", "5000", "--queries", "50", "--nlist", "64", "--nprobe", "1",
        "--target", "1.0",
    )  # fmt: skip
    assert code == 1 and out["met"] is False and out["nprobe"] == 1


def test_tune_on_npy_file_and_snapshot(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4_000, 16)).astype("float32")
    np.save(tmp_path / "v.npy", x)
    args = [
        "--n",
        "3000",
        "--queries",
        "100",
        "--nlist",
        "32",
        "--nprobe",
        "4,32",
        "--target",
        "0.99",
    ]
    code, out = _tune(capsys, "--vectors", str(tmp_path / "v.npy"), *args)
    assert code == 0 and out["nprobe"] == 32 and out["recall"] == 1.0  # nprobe = nlist: exact

    cfg = IndexConfig(dim=16, metric="cosine", nlist=16, nprobe=4)
    index = LiveIvfIndex.train(cfg, x)
    index.upsert(np.arange(len(x)), x)
    write_snapshot(tmp_path / "snaps", index, {}, {})
    (tmp_path / "c.toml").write_text("[index]\ndim = 16\nnlist = 16\nnprobe = 4\n")
    code, out = _tune(
        capsys, "--snapshot-dir", str(tmp_path / "snaps"), "--config", str(tmp_path / "c.toml"),
        *args,
    )  # fmt: skip
    assert code == 0 and out["data"]["base"] == 3_000 and out["recall"] == 1.0


def test_choose_prefers_cheapest_meeting_else_best_recall() -> None:
    rows = [
        {"nlist": 1, "nprobe": 1, "recall": 0.8, "ms_per_query": 0.1},
        {"nlist": 1, "nprobe": 2, "recall": 0.96, "ms_per_query": 0.3},
        {"nlist": 2, "nprobe": 4, "recall": 0.97, "ms_per_query": 0.2},
    ]
    assert choose(rows, 0.95) == (rows[2], True)
    assert choose(rows, 0.99) == (rows[2], False)


def test_tune_rejects_a_bad_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", "--target", "1.5"]) == 2
    assert "--target must be in (0, 1]" in capsys.readouterr().err


def test_plot_helpers_write_pngs_and_name_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from annstream.bench.plots import plot_freshness_cdf, plot_ingest
    from annstream.errors import ConfigError

    rng = np.random.default_rng(0)
    cdf = plot_freshness_cdf(
        {"a": rng.exponential(0.3, 500), "b": [0.1, np.nan]}, tmp_path / "f.png"
    )
    ingest = plot_ingest([0.0, 1.0, 2.0, 3.0], [0, 900, 2100, 3000], tmp_path / "i.png")
    assert cdf.read_bytes()[:4] == ingest.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="same length"):
        plot_ingest([0.0], [1], tmp_path / "x.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match=r"pip install 'annstream\[plot\]'"):
        plot_freshness_cdf([0.1, 0.2], tmp_path / "g.png")
