"""examples/node-reader: a Node.js reader decodes the records as the Python reader does.

The Node.js reader knows only schemas/neighbour_record.md; the Python reader is the reference.
Both read the same records from the Aerospike test server (or the real server given by
ANNSTREAM_TEST_AEROSPIKE). The example's dependencies are installed by `npm ci` from its
committed package-lock.json, once, into examples/node-reader/node_modules (gitignored).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from annstream.config import StoreConfig
from annstream.serving import NeighbourReader
from annstream.store import open_store

if TYPE_CHECKING:
    from tests.store.conftest import AerospikeTarget

from tests.store.conftest import make_lists

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node-reader"


@pytest.fixture(scope="session")
def node_reader() -> Path:
    """examples/node-reader/reader.js, its dependencies installed; skips without Node.js."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("examples/node-reader needs Node.js >= 20 (node and npm on PATH)")
    installed = EXAMPLE / "node_modules" / ".package-lock.json"
    lock = EXAMPLE / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
            cwd=EXAMPLE,
            check=True,
            capture_output=True,
            timeout=600,
        )
    probe = subprocess.run(
        [node, "-e", "require('aerospike')"], cwd=EXAMPLE, capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(
            "the npm aerospike package has no binding for this Node.js "
            f"({probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else '?'})"
        )
    return EXAMPLE / "reader.js"


def _node(reader: Path, url: str, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["node", str(reader), "--store", url, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_node_reader_decodes_the_records_as_the_python_reader(
    node_reader: Path,
    aerospike_target: AerospikeTarget,
    aerospike_client: Any,
    set_name: str,
) -> None:
    url = aerospike_target.url(set_name)
    store = open_store(url, StoreConfig(url=url, timeout_ms=5_000))
    full = make_lists([1, 2, 3], version=1_700_000_000_123, k=100, margin=20, with_campaigns=True)
    full.ids[0, :3] = [2**62 + 1, 2**53 + 1, 2**63 - 1]  # exact beyond a double's 53 bits
    full.ids[1, 90:], full.scores[1, 90:] = -1, -np.inf  # a short list: 90 neighbours
    bare = make_lists([4], version=7, k=10, margin=2)  # no campaign / advertiser ids
    assert store.upsert(full).stored.all() and store.upsert(bare).stored.all()
    aerospike_client.put((aerospike_target.namespace, set_name, 5), {"fmt": 2, "ids": b""})
    qids = [1, 2, 3, 4, 5, 77]
    reader = NeighbourReader(store)
    try:
        for k in (None, 7, 95):
            lines = _node(node_reader, url, *([] if k is None else ["--k", str(k)]),
                          *map(str, qids))  # fmt: skip
            assert [line["query_id"] for line in lines] == qids
            for line, qid in zip(lines, qids, strict=True):
                want = reader.lookup_one(qid, k=k)
                assert line["found"] == want.found, qid
                if not want.found:
                    assert ("error" in line) == (want.error is not None), line
                    if want.error is not None:
                        assert "format 2" in line["error"] and "format 2" in want.error
                    continue
                assert line["ids"] == want.ids.tolist(), (qid, k)
                np.testing.assert_array_equal(np.array(line["scores"], np.float32), want.scores)
                assert (line["version"], line["computed_at_ms"]) == (
                    want.version,
                    want.computed_at_ms,
                )
                stored = store.lookup_one(qid)
                for name, values in (
                    ("campaign_ids", stored.campaign_ids),
                    ("advertiser_ids", stored.advertiser_ids),
                ):
                    if values is None:
                        assert name not in line
                    else:
                        assert line[name] == values[stored.ids >= 0][: len(want.ids)].tolist()
        assert lines[0]["ids"][:3] == [2**62 + 1, 2**53 + 1, 2**63 - 1]
        assert len(lines[1]["ids"]) == 90  # --k 95 on a list of 90: the padding is skipped
    finally:
        store.close()
