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
from annstream.config import IndexConfig, load_config
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


# --- your own queries and ground truth (a small clustered 384-d set) ------------------------

OWN = ["--nlist", "32,64", "--nprobe", "1,4,16,64", "--target", "0.9"]


@pytest.fixture(scope="module")
def own_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """6,000 clustered 384-d vectors, 150 queries near the same centres, and the exact cosine
    top 25 of each query by numpy (row numbers, best first)."""
    from producers.sources import clustered_vectors

    d = tmp_path_factory.mktemp("own")
    corpus = clustered_vectors(6_000, 384, np.random.default_rng(5))
    queries = clustered_vectors(150, 384, np.random.default_rng(6))
    unit = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    truth = np.argsort(-(q @ unit.T), axis=1)[:, :25]
    paths = {name: d / f"{name}.npy" for name in ("corpus", "queries", "truth", "shuffled")}
    np.save(paths["corpus"], corpus)
    np.save(paths["queries"], queries)
    np.save(paths["truth"], truth)
    np.save(paths["shuffled"], np.roll(truth, 1, axis=0))  # every row belongs to another query
    ids = np.arange(6_000) * 7 + 1_000
    paths["corpus_ids"] = d / "corpus_ids.npz"
    np.savez(paths["corpus_ids"], vectors=corpus, ids=ids)
    paths["truth_ids"] = d / "truth_ids.npy"
    np.save(paths["truth_ids"], ids[truth])
    return paths


def _own(data: dict[str, Path], truth: str = "truth", corpus: str = "corpus") -> list[str]:
    return ["--vectors", str(data[corpus]), "--queries", str(data["queries"]),
            "--truth", str(data[truth])]  # fmt: skip


def test_tune_with_your_queries_and_truth_at_your_k_prints_a_config_snippet(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, own_data: dict[str, Path]
) -> None:
    code, out = _tune(capsys, *_own(own_data), *OWN, "--k", "20")
    assert code == 0 and out["met"] is True and out["k"] == 20
    data = out["data"]
    assert data["base"] == 6_000 and data["queries"] == 150
    assert data["truth"] == str(own_data["truth"]) and data["truth_agreement"] == 1.0
    # nprobe = nlist searches every list: exact, so it finds the given truth exactly
    assert [r["recall"] for r in out["sweep"] if r["nprobe"] == r["nlist"]] == [1.0]
    assert min(r["recall"] for r in out["sweep"]) < 0.9  # the sweep has something to choose
    # the snippet is ready to paste: annstream's own config loader reads it
    (tmp_path / "annstream.toml").write_text(out["config_toml"] + "\n")
    cfg = load_config(tmp_path / "annstream.toml", env={})
    assert (cfg.index.nlist, cfg.index.nprobe) == (out["nlist"], out["nprobe"])
    warn = cfg.service.recall_warn_below
    assert warn == out["config"]["service"]["recall_warn_below"]
    assert out["recall"] - 0.06 < warn <= out["recall"] - 0.05
    assert out["config"]["index"] == {"nlist": out["nlist"], "nprobe": out["nprobe"]}

    assert main(["tune", *_own(own_data), *OWN, "--k", "20"]) == 0
    text = capsys.readouterr().out
    snippet = text.split("for annstream.toml:\n", 1)[1]
    assert snippet.startswith("# annstream tune: recall@20 ")
    assert "\n[index]\nnlist = " in snippet and "\n[service]\n" in snippet


def test_tune_k_defaults_to_the_truths_width_and_ids_of_an_npz_corpus(
    capsys: pytest.CaptureFixture[str], own_data: dict[str, Path]
) -> None:
    code, rows_out = _tune(capsys, *_own(own_data), *OWN)
    assert code == 0 and rows_out["k"] == 25
    code, ids_out = _tune(capsys, *_own(own_data, "truth_ids", "corpus_ids"), *OWN)
    assert code == 0 and ids_out["k"] == 25 and ids_out["data"]["truth_agreement"] == 1.0
    recalls = {(r["nlist"], r["nprobe"]): r["recall"] for r in rows_out["sweep"]}
    assert {(r["nlist"], r["nprobe"]): r["recall"] for r in ids_out["sweep"]} == recalls


def test_tune_judges_by_the_given_truth_and_says_when_it_disagrees_with_exact(
    capsys: pytest.CaptureFixture[str], own_data: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        code, out = _tune(capsys, *_own(own_data, "shuffled"), *OWN)
    assert code == 1 and out["met"] is False
    assert out["data"]["truth_agreement"] < 0.2
    assert max(r["recall"] for r in out["sweep"]) < 0.2  # judged by that truth, not our own
    assert "--truth agrees with an exact cosine search on only" in caplog.text


def test_tune_without_truth_uses_exact_search_over_the_whole_corpus(
    capsys: pytest.CaptureFixture[str], own_data: dict[str, Path]
) -> None:
    argv = ["--vectors", str(own_data["corpus"]), "--queries", str(own_data["queries"])]
    code, out = _tune(capsys, *argv, *OWN, "--k", "20")
    assert code == 0 and out["data"]["truth"] == "exact" and out["data"]["base"] == 6_000


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        ("one_based", [], "--truth[0, 0] = 6000 is not one of the 6000 row numbers"),
        (None, ["--k", "30"], "--truth has 25 neighbours per query: fewer than --k 30"),
        ("float", [], "--truth must be a 2-d integer array"),
        ("rows", [], "expected one row per query (150, >= 25)"),
        (None, ["--n", "1000"], "--n samples the corpus"),
        ("wide_queries", [], "expected (q, 384), the corpus dimension"),
    ],
)
def test_tune_rejects_truth_and_queries_that_do_not_fit(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    own_data: dict[str, Path],
    make: str | None,
    extra: list[str],
    message: str,
) -> None:
    data = dict(own_data)
    truth = np.load(own_data["truth"])
    if make == "one_based":
        truth[0, 0] = 6_000
    elif make == "float":
        truth = truth.astype("float64")
    elif make == "rows":
        truth = truth[:-1]
    elif make == "wide_queries":
        data["queries"] = tmp_path / "wide.npy"
        np.save(data["queries"], np.ones((150, 385), "float32"))
    data["truth"] = tmp_path / "bad_truth.npy"
    np.save(data["truth"], truth)
    assert main(["tune", "--json", *_own(data), *OWN, *extra]) == 2
    assert message in capsys.readouterr().err


def test_tune_truth_needs_your_queries(
    capsys: pytest.CaptureFixture[str], own_data: dict[str, Path]
) -> None:
    argv = ["tune", "--vectors", str(own_data["corpus"]), "--truth", str(own_data["truth"])]
    assert main(argv) == 2
    assert "--truth needs --queries FILE.npy" in capsys.readouterr().err
