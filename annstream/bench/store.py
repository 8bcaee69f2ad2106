"""`annstream bench store`: batch upserts and batch lookups vs one record at a time.

Writes `--records` neighbour lists of K + margin neighbours (with campaign and advertiser ids)
in micro-batches of `--batch`, replays them (every row stale: the guard's cost), then looks
them up in batches of `--lookup-batch` keys. The baseline, in the same run and through the
same store interface, upserts and looks up `--single` records one at a time; the ratios say
what batching buys. `--store aerospike-test` starts the project's in-memory test server (it
measures the client and the protocol, not a real server's storage).

Versions are wall-clock milliseconds, so a rerun on an existing set writes newer lists; rows
are counted as stored, stale, failed or permanent, never one for another. The result has
`ok`: false (and `annstream bench` exits 1) when the store refused or failed any write, a
replay was not all stale, or a lookup did not find what was written; `error` says why.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from annstream.config import StoreConfig
from annstream.errors import StoreError
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


OUTCOMES = ("stored", "stale", "failed", "permanent")


@dataclass
class Tally:
    """Rows per upsert outcome over a phase, and the first reason a row was not written."""

    seconds: float = 0.0
    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    first_error: str = ""


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


def _timed_upserts(store: NeighbourStore, batches: list[NeighbourLists]) -> Tally:
    tally = Tally()
    start = time.perf_counter()
    for lists in batches:
        result = store.upsert(lists)
        for outcome in OUTCOMES:
            tally.rows[outcome] += int(getattr(result, outcome).sum())
        if result.errors and not tally.first_error:
            tally.first_error = next(iter(result.errors.values()))
    tally.seconds = time.perf_counter() - start
    return tally


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


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


def _measure(store: NeighbourStore, args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    m = args.k + args.margin
    version = int(time.time() * 1000)  # newer than any earlier run's lists in the same set
    qids = rng.permutation(args.records * 4)[: args.records].astype(np.int64)
    batches = [
        _lists(rng, qids[i : i + args.batch], args.k, m, version)
        for i in range(0, qids.size, args.batch)
    ]
    out: dict[str, Any] = {"bytes_per_record": round(_bytes_per_record(batches[0]), 1)}
    first = _timed_upserts(store, batches)
    out.update({f"upsert_{k}": v for k, v in first.rows.items()})
    out["upserts_per_s"] = _rate(first.rows["stored"], first.seconds)
    replay = _timed_upserts(store, batches)
    out.update({f"replay_{k}": v for k, v in replay.rows.items()})
    out["stale_replays_per_s"] = _rate(replay.rows["stale"], replay.seconds)
    order = rng.permutation(qids)
    keys = [order[i : i + args.lookup_batch] for i in range(0, order.size, args.lookup_batch)]
    lookup_s, found = _timed_lookups(store, keys)
    out.update(
        found=found,
        lookups_per_s=_rate(found, lookup_s),
        lookup_batches_per_s=_rate(len(keys), lookup_s),
    )

    single_ids = qids.max() + 1 + np.arange(args.single, dtype=np.int64)
    singles = [_lists(rng, single_ids[i : i + 1], args.k, m, version) for i in range(args.single)]
    single = _timed_upserts(store, singles)
    single_lookup_s, single_found = _timed_lookups(
        store, [single_ids[i : i + 1] for i in range(args.single)]
    )
    out.update(
        single_stored=single.rows["stored"],
        single_found=single_found,
        baseline_single_upserts_per_s=_rate(single.rows["stored"], single.seconds),
        baseline_single_lookups_per_s=_rate(single_found, single_lookup_s),
    )
    if out["baseline_single_upserts_per_s"] and out["baseline_single_lookups_per_s"]:
        out["upsert_batch_vs_single"] = round(
            out["upserts_per_s"] / out["baseline_single_upserts_per_s"], 2
        )
        out["lookup_batch_vs_single"] = round(
            out["lookups_per_s"] / out["baseline_single_lookups_per_s"], 2
        )
    problems = []
    if first.rows["stored"] != args.records or single.rows["stored"] != args.single:
        problems.append(
            f"stored {first.rows['stored']} of {args.records} records and "
            f"{single.rows['stored']} of {args.single} single ones"
        )
    if replay.rows["stale"] != args.records:
        problems.append(f"the replay was stale for {replay.rows['stale']} of {args.records}")
    if found != args.records or single_found != args.single:
        problems.append(f"lookups found {found + single_found} of {args.records + args.single}")
    reason = first.first_error or replay.first_error or single.first_error
    if problems:
        out["error"] = "; ".join(problems) + (f" (first row error: {reason})" if reason else "")
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    server: AerospikeTestServer | None = None
    tmp: tempfile.TemporaryDirectory[str] | None = None
    url = args.store
    if url == "aerospike-test":
        server = AerospikeTestServer(namespaces=["test"]).start()
        url = f"aerospike://{server.url_host}/test/neighbours"
    elif not url:
        tmp = tempfile.TemporaryDirectory(prefix="annstream-bench-")
        url = f"sqlite:///{Path(tmp.name) / 'store.db'}"
    result: dict[str, Any] = {
        "store": url.split("://")[0] + ("-test" if server is not None else ""),
        "url": url,
        "records": args.records,
        "k": args.k,
        "margin": args.margin,
        "batch": args.batch,
        "lookup_batch": args.lookup_batch,
    }
    try:
        store = open_store(url, StoreConfig(url=url, timeout_ms=5_000))
        try:
            result.update(_measure(store, args))
        finally:
            store.close()
    except StoreError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if server is not None:
            server.stop()
    result["ok"] = "error" not in result
    if tmp is not None:
        db = Path(tmp.name) / "store.db"
        wal = db.with_name("store.db-wal")
        if db.exists():
            size = db.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
            result["file_bytes_per_record"] = round(size / (args.records + args.single), 1)
        tmp.cleanup()
    return result
