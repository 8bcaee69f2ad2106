"""`annstream bench store`: batch upserts and batch lookups vs one record at a time.

Writes `--records` neighbour lists of K + margin neighbours (with campaign and advertiser ids)
in micro-batches of `--batch`, replays them (every row stale: the guard's cost), then looks
them up in batches of `--lookup-batch` keys. The baseline, in the same run and through the
same store interface, upserts and looks up `--single` records one at a time; the ratios say
what batching buys. `--store aerospike-test` starts the project's in-memory test server (it
measures the client and the protocol, not a real server's storage).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from annstream.config import StoreConfig
from annstream.store import NeighbourLists, NeighbourStore, open_store, pack_records
from annstream.testing.aerospike_server import AerospikeTestServer

__all__ = ["HELP", "add_arguments", "run"]

HELP = "neighbour store: batch upsert / lookup throughput vs single records, bytes per record"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        default="",
        help="store URL, or aerospike-test for the in-memory test server (default: temp SQLite)",
    )
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500, help="rows per upsert (micro-batch)")
    parser.add_argument("--lookup-batch", type=int, default=100, help="keys per batch lookup")
    parser.add_argument("--single", type=int, default=2_000, help="records for the baseline")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--margin", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1338)


def _lists(
    rng: np.random.Generator, qids: np.ndarray, k: int, m: int, version: int
) -> NeighbourLists:
    n = qids.size
    ids = rng.integers(0, 10_000_000, size=(n, m), dtype=np.int64)
    return NeighbourLists(
        query_ids=qids.astype(np.int64),
        ids=ids,
        scores=-np.sort(-rng.random((n, m), dtype=np.float32), axis=1),
        versions=np.full(n, version, dtype=np.int64),
        computed_at_ms=np.full(n, int(time.time() * 1000), dtype=np.int64),
        k=k,
        campaign_ids=ids % 5_000,
        advertiser_ids=ids % 500,
    )


def _timed_upserts(store: NeighbourStore, batches: list[NeighbourLists]) -> tuple[float, int]:
    start = time.perf_counter()
    done = 0
    for lists in batches:
        done += int(store.upsert(lists).done.sum())
    return time.perf_counter() - start, done


def _timed_lookups(store: NeighbourStore, keys: list[np.ndarray]) -> tuple[float, int]:
    start = time.perf_counter()
    found = 0
    for batch in keys:
        found += int(store.lookup(batch).found.sum())
    return time.perf_counter() - start, found


def _bytes_per_record(lists: NeighbourLists) -> float:
    rows = pack_records(lists)
    sizes = [
        sum(len(k) + (len(v) if isinstance(v, bytes) else 8) for k, v in b.items()) for b in rows
    ]
    return float(np.mean(sizes))


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    m = args.k + args.margin
    server: AerospikeTestServer | None = None
    tmp: tempfile.TemporaryDirectory[str] | None = None
    url = args.store
    if url == "aerospike-test":
        server = AerospikeTestServer(namespaces=["test"]).start()
        url = f"aerospike://{server.url_host}/test/neighbours"
    elif not url:
        tmp = tempfile.TemporaryDirectory(prefix="annstream-bench-")
        url = f"sqlite:///{Path(tmp.name) / 'store.db'}"
    store = open_store(url, StoreConfig(url=url, timeout_ms=5_000))
    try:
        qids = rng.permutation(args.records * 4)[: args.records].astype(np.int64)
        batches = [
            _lists(rng, qids[i : i + args.batch], args.k, m, version=2)
            for i in range(0, qids.size, args.batch)
        ]
        upsert_s, stored = _timed_upserts(store, batches)
        replay_s, stale = _timed_upserts(store, batches)
        order = rng.permutation(qids)
        keys = [order[i : i + args.lookup_batch] for i in range(0, order.size, args.lookup_batch)]
        lookup_s, found = _timed_lookups(store, keys)

        single_ids = qids.max() + 1 + np.arange(args.single, dtype=np.int64)
        singles = [
            _lists(rng, single_ids[i : i + 1], args.k, m, version=2) for i in range(args.single)
        ]
        single_upsert_s, _ = _timed_upserts(store, singles)
        single_lookup_s, single_found = _timed_lookups(
            store, [single_ids[i : i + 1] for i in range(args.single)]
        )
    finally:
        store.close()
        if server is not None:
            server.stop()
    upserts_per_s = stored / upsert_s
    lookups_per_s = found / lookup_s
    single_upserts_per_s = args.single / single_upsert_s
    single_lookups_per_s = single_found / single_lookup_s
    result: dict[str, Any] = {
        "store": url.split("://")[0] + ("-test" if server is not None else ""),
        "url": url,
        "records": args.records,
        "k": args.k,
        "margin": args.margin,
        "batch": args.batch,
        "lookup_batch": args.lookup_batch,
        "upserts_per_s": round(upserts_per_s, 1),
        "stale_replays_per_s": round(stale / replay_s, 1),
        "lookups_per_s": round(lookups_per_s, 1),
        "lookup_batches_per_s": round(len(keys) / lookup_s, 1),
        "bytes_per_record": round(_bytes_per_record(batches[0]), 1),
        "baseline_single_upserts_per_s": round(single_upserts_per_s, 1),
        "baseline_single_lookups_per_s": round(single_lookups_per_s, 1),
        "upsert_batch_vs_single": round(upserts_per_s / single_upserts_per_s, 2),
        "lookup_batch_vs_single": round(lookups_per_s / single_lookups_per_s, 2),
        "all_found": found == args.records and single_found == args.single,
    }
    if tmp is not None:
        db = Path(tmp.name) / "store.db"
        wal = db.with_name("store.db-wal")
        size = db.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
        result["file_bytes_per_record"] = round(size / (args.records + args.single), 1)
        tmp.cleanup()
    return result
