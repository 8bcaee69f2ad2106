"""`annstream bench serving`: a tiny run of the stored-lookup vs online-search comparison."""

from __future__ import annotations

import json
from typing import Any

import pytest

from annstream.cli import main

TINY = ["--sizes", "3000,6000", "--heads", "300", "--queries", "100", "--rounds", "1",
        "--k", "20", "--margin", "5", "--recall-sample", "50", "--batch", "25"]  # fmt: skip


@pytest.mark.parametrize("store", ["aerospike-test", "sqlite"])
def test_bench_serving_compares_lookups_with_searches_per_catalogue_size(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["bench", "serving", "--json", *TINY, "--store", store])
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert code == 0 and result["ok"] is True, result
    assert result["store"] == store
    assert [size["ads"] for size in result["sizes"]] == [3000, 6000]
    for size in result["sizes"]:
        assert size["recall_at_k"] >= result["target_recall"]
        assert size["agreement"] == 1.0 and size["found"] == 100
        for rate in ("lookups_per_s", "searches_per_s", "batch_lookups_per_s",
                     "batch_searches_per_s", "raw_get_per_s", "raw_batch_read_per_s",
                     "filtered_lookups_per_s"):  # fmt: skip
            assert size[rate] > 0, rate
        assert size["lookup_vs_search"] == pytest.approx(
            size["lookups_per_s"] / size["searches_per_s"], rel=0.5
        )
        assert size["one_vs_get"] > 0 and size["batch_vs_batch_read"] > 0


def test_bench_serving_refuses_bad_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "serving", "--sizes", "10,x"])
    assert "comma-separated ad counts" in capsys.readouterr().err
