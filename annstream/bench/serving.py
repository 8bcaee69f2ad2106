"""`annstream bench serving`: a stored lookup vs an online IVF search of the same head queries.

The point of precomputed neighbour lists is that serving becomes one key lookup instead of an
ANN search. For each catalogue size (`--sizes`) this builds an IVF index of that many ads,
picks the smallest nprobe whose recall@K (against exact brute force on a sample) reaches
`--target-recall`, stores the head queries' K + margin lists searched at that nprobe (what
the refresher writes), and then times, interleaved in rounds on one thread:
- `NeighbourReader.lookup_one` against one online search (`index.search` of one query, one
  Faiss thread) for the same head queries: `lookup_vs_search`;
- `NeighbourReader.lookup` of `--batch` keys against a search of `--batch` queries;
- the raw client's `get` and `batch_read` of the same keys (the same bins the reader asks
  for) against the reader: `one_vs_get`, `batch_vs_batch_read` (issue 14's goals: >= 0.8).
Both sides return the same lists (`agreement`), so they are compared at the same recall.
The ways compared run in turns (50 single calls, or one batch call, each) within a round;
every figure is the median over `--rounds`, ratios taken within a round (this machine is
shared and noisy). Vectors are a clustered Gaussian mixture (as hard for IVF as GloVe at 200k ads) or
GloVe (`--vectors glove`, up to 400k ads).

`--store aerospike-test` (default) runs the project's test server in a child process (it
measures the client and the protocol, not a real server); pass `aerospike://host:port/ns/set`
for a real server, or `sqlite` for a temporary SQLite file.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from annstream.ann import build_ivf, knn_exact, normalize, recall_at_k, train_ivf
from annstream.config import StoreConfig
from annstream.errors import StoreError
from annstream.serving import NeighbourReader, exclude
from annstream.store import NeighbourLists, NeighbourStore, open_store, parse_aerospike_url
from annstream.store.record import CORE_BINS
from annstream.testing.aerospike_server import child_server
from producers.sources import glove_vectors

__all__ = ["HELP", "add_arguments", "clustered_vectors", "run"]

HELP = "serving: stored lookup vs online IVF search at the same recall, and vs the raw client"

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated ad counts, got {text!r}"
        ) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"ad counts must be positive, got {text!r}")
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes", type=_sizes, default=[200_000, 2_000_000], help="catalogue sizes (ads)"
    )
    parser.add_argument("--heads", type=int, default=10_000, help="head queries stored")
    parser.add_argument("--queries", type=int, default=2_000, help="lookups/searches per round")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (median reported)")
    parser.add_argument("--batch", type=int, default=100, help="keys / queries per batch call")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--margin", type=int, default=20)
    parser.add_argument("--dim", type=int, default=50, help="dimension of clustered vectors")
    parser.add_argument(
        "--nlist",
        type=int,
        default=0,
        help="IVF lists (default: 1024 at 200k ads, scaled with the square root of the size)",
    )
    parser.add_argument(
        "--target-recall",
        type=float,
        default=0.8,
        help="recall@K both sides reach (default 0.8: the default index, IVF1024 nprobe 32, "
        "on GloVe at 200k ads)",
    )
    parser.add_argument("--recall-sample", type=int, default=200, help="queries for recall")
    parser.add_argument("--vectors", choices=("clustered", "glove"), default="clustered")
    parser.add_argument(
        "--store",
        default="aerospike-test",
        help="aerospike-test (a test server in a child process), sqlite (a temp file) or a URL",
    )
    parser.add_argument("--seed", type=int, default=14)


# --- data -----------------------------------------------------------------------------------


def clustered_vectors(n: int, dim: int, seed: int, queries: int) -> tuple[F32, F32]:
    """(ads, queries): unit vectors from one Gaussian mixture, ~200 ads per cluster, skewed
    cluster sizes; the spread is set so that IVF needs as many probes as on GloVe."""
    rng = np.random.default_rng(seed)
    clusters = max(16, n // 200)
    centers = rng.standard_normal((clusters, dim), dtype=np.float32)
    weights = rng.lognormal(0.0, 1.0, clusters)
    weights /= weights.sum()
    spread = rng.uniform(0.8, 1.6, clusters).astype(np.float32)

    def sample(m: int) -> F32:
        out = np.empty((m, dim), dtype=np.float32)
        for i0 in range(0, m, 100_000):
            rows = min(100_000, m - i0)
            which = rng.choice(clusters, size=rows, p=weights)
            noise = rng.standard_normal((rows, dim), dtype=np.float32)
            out[i0 : i0 + rows] = normalize(centers[which] + spread[which, None] * noise)
        return out

    return sample(n), sample(queries)


def _vectors(args: argparse.Namespace, n: int) -> tuple[F32, F32]:
    if args.vectors == "clustered":
        return clustered_vectors(n, args.dim, args.seed, args.heads)
    data = glove_vectors()
    if n + args.heads > len(data):
        raise SystemExit(f"--vectors glove has {len(data)} vectors: fewer than ads + heads")
    rows = np.random.default_rng(args.seed).permutation(len(data))[: n + args.heads]
    picked = normalize(np.ascontiguousarray(data[np.sort(rows)], dtype=np.float32))
    return picked[:n], picked[n:]


def _nlist(args: argparse.Namespace, n: int) -> int:
    if args.nlist:
        return int(args.nlist)
    return int(2 ** round(math.log2(1024 * math.sqrt(n / 200_000))))


def _nprobes(nlist: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, ... up to nlist: steps of about 1.4x."""
    steps = sorted({min(nlist, v) for e in range(32) for v in (2**e, 3 * 2**e // 2) if v >= 1})
    return [v for v in steps if v <= nlist]


# --- timing ---------------------------------------------------------------------------------


Ways = dict[str, tuple[Callable[[Any], Any], list[Any]]]


def _interleaved(calls: Ways, count: int, chunk: int) -> dict[str, float]:
    """Calls per second (`count` units per pass over the items) of each named way, run in
    turns of `chunk` items so that a burst of load on this shared machine hits them all."""
    spent = dict.fromkeys(calls, 0.0)
    size = len(next(iter(calls.values()))[1])
    for i0 in range(0, size, chunk):
        for name, (fn, items) in calls.items():
            start = time.perf_counter()
            for item in items[i0 : i0 + chunk]:
                fn(item)
            spent[name] += time.perf_counter() - start
    return {name: count / seconds for name, seconds in spent.items()}


@contextlib.contextmanager
def _faiss_threads(n: int) -> Iterator[None]:
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3 if max(values, default=0) < 100 else 1)


@dataclass
class Raw:
    """The raw client over the same records: what a lookup costs without annstream."""

    get: Callable[[int], Any]
    batch: Callable[[list[int]], Any]
    batch_all_bins: Callable[[list[int]], Any]
    close: Callable[[], None]


def _raw_client(url: str) -> Raw:
    if url.startswith("aerospike://"):
        import aerospike

        hosts, ns, set_name = parse_aerospike_url(url)
        client = aerospike.client({"hosts": hosts})
        keys: dict[int, tuple[str, str, int]] = {}
        few = list(CORE_BINS)

        def key(q: int) -> tuple[str, str, int]:
            return keys.setdefault(q, (ns, set_name, q))

        return Raw(
            get=lambda q: client.get(key(q)),
            batch=lambda qs: client.batch_read([key(q) for q in qs], few),
            batch_all_bins=lambda qs: client.batch_read([key(q) for q in qs]),
            close=client.close,
        )
    path = url[len("sqlite:///") :]
    db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    core = "query_id, fmt, version, computed_at_ms, k, ids, scores"
    one = f"SELECT {core} FROM neighbour_lists WHERE query_id = ?"

    def many(columns: str) -> Callable[[list[int]], Any]:
        return lambda qs: db.execute(
            f"SELECT {columns} FROM neighbour_lists WHERE query_id IN ({','.join('?' * len(qs))})",
            qs,
        ).fetchall()

    return Raw(
        get=lambda q: db.execute(one, (q,)).fetchone(),
        batch=many(core),
        batch_all_bins=many("*"),
        close=db.close,
    )


# --- one catalogue size ---------------------------------------------------------------------


def _stored_lists(qids: I64, ids: I64, scores: F32, k: int, version: int) -> NeighbourLists:
    n = qids.size
    return NeighbourLists(
        query_ids=qids,
        ids=ids,
        scores=scores,
        versions=np.full(n, version, dtype=np.int64),
        computed_at_ms=np.full(n, int(time.time() * 1000), dtype=np.int64),
        k=k,
        campaign_ids=np.where(ids >= 0, ids % 5_000, -1),
        advertiser_ids=np.where(ids >= 0, ids % 500, -1),
    )


def _measure_size(
    args: argparse.Namespace, n: int, url: str, store: NeighbourStore, raw: Raw
) -> dict[str, Any]:
    out: dict[str, Any] = {"ads": n}
    t = time.perf_counter()
    ads, heads = _vectors(args, n)
    nlist = min(_nlist(args, n), max(1, n // 39))
    index = build_ivf(ads.shape[1], "cosine", nlist=nlist)
    index.cp.niter = 10
    rng = np.random.default_rng(args.seed)
    train_ivf(index, ads[rng.choice(n, min(n, max(39 * nlist, 50_000)), replace=False)])
    index.add(ads)
    out.update(nlist=nlist, build_s=round(time.perf_counter() - t, 1))

    width = args.k + args.margin
    sample = heads[: args.recall_sample]
    _, true = knn_exact(ads, np.arange(n), sample, args.k, "ip")
    del ads
    recall = 0.0
    for nprobe in _nprobes(nlist):
        index.nprobe = nprobe
        recall = recall_at_k(index.search(sample, args.k)[1], true, args.k)
        if recall >= args.target_recall:
            break
    out.update(nprobe=nprobe, recall_at_k=round(recall, 4))

    qids = np.arange(args.heads, dtype=np.int64)
    scores, ids = index.search(heads, width)
    version = int(time.time() * 1000)
    for i0 in range(0, args.heads, 500):
        rows = slice(i0, i0 + 500)
        result = store.upsert(_stored_lists(qids[rows], ids[rows], scores[rows], args.k, version))
        if not result.done.all():
            raise StoreError(
                f"could not store the head lists: {next(iter(result.errors.values()))}"
            )

    reader = NeighbourReader(store)
    picked = rng.choice(args.heads, min(args.queries, args.heads), replace=False)
    keys = picked.tolist()
    vectors = [heads[q : q + 1] for q in keys]
    batches = [picked[i : i + args.batch] for i in range(0, picked.size, args.batch)]
    batch_keys = [b.tolist() for b in batches]
    batch_vectors = [heads[b] for b in batches]
    n_one, n_batched = len(keys), sum(b.size for b in batches)
    unwanted = exclude(campaigns=range(0, 5_000, 10))  # drops about one neighbour in ten

    agree = sum(
        np.array_equal(reader.lookup_one(q).ids, ids[q, : args.k]) for q in keys[:200]
    ) / len(keys[:200])
    out["agreement"] = round(agree, 4)

    def search(v: F32) -> Any:
        return index.search(v, width)

    def filtered(q: int) -> Any:
        return reader.lookup_one(q, predicate=unwanted)

    singles: Ways = {
        "raw_get_per_s": (raw.get, keys),
        "lookups_per_s": (reader.lookup_one, keys),
        "searches_per_s": (search, vectors),
        "filtered_lookups_per_s": (filtered, keys),
    }
    batched: Ways = {
        "raw_batch_read_per_s": (raw.batch, batch_keys),
        "batch_lookups_per_s": (reader.lookup, batches),
        "batch_searches_per_s": (search, batch_vectors),
        "raw_batch_read_all_bins_per_s": (raw.batch_all_bins, batch_keys),
    }
    timed: dict[str, list[float]] = {}
    with _faiss_threads(1):
        for _ in range(args.rounds):
            rates = {
                **_interleaved(singles, n_one, chunk=50),
                **_interleaved(batched, n_batched, chunk=1),
            }
            rates.update(
                lookup_vs_search=rates["lookups_per_s"] / rates["searches_per_s"],
                batch_lookup_vs_search=rates["batch_lookups_per_s"] / rates["batch_searches_per_s"],
                one_vs_get=rates["lookups_per_s"] / rates["raw_get_per_s"],
                batch_vs_batch_read=rates["batch_lookups_per_s"] / rates["raw_batch_read_per_s"],
                batch_vs_batch_read_all_bins=rates["batch_lookups_per_s"]
                / rates["raw_batch_read_all_bins_per_s"],
            )
            for name, value in rates.items():
                timed.setdefault(name, []).append(value)
    out.update({name: _median(values) for name, values in timed.items()})
    found = reader.lookup(picked).found
    out["found"] = int(found.sum())
    return out


# --- the run --------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "benchmark": "serving",
        "vectors": args.vectors,
        "k": args.k,
        "margin": args.margin,
        "heads": args.heads,
        "batch": args.batch,
        "target_recall": args.target_recall,
        "search_threads": 1,
    }
    with contextlib.ExitStack() as stack:
        url = args.store
        if url == "aerospike-test":
            url = f"aerospike://{stack.enter_context(child_server())}/test/serving"
            result["store"] = "aerospike-test"
        elif url == "sqlite":
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="annstream-bench-"))
            url = f"sqlite:///{Path(tmp) / 'serving.db'}"
            result["store"] = "sqlite"
        else:
            result["store"] = url.split("://")[0]
        result["url"] = url
        try:
            store = open_store(url, StoreConfig(url=url, timeout_ms=5_000))
            stack.callback(store.close)
            raw = _raw_client(url)
            stack.callback(raw.close)
            result["sizes"] = [_measure_size(args, n, url, store, raw) for n in args.sizes]
        except StoreError as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
    problems = [
        f"{size['ads']} ads: {what}"
        for size in result.get("sizes", [])
        for what in (
            f"lookups found {size['found']} of the stored lists"
            if size["found"] != min(args.queries, args.heads)
            else "",
            f"stored and searched lists agree for {size['agreement']:.0%} of queries"
            if size["agreement"] < 0.99
            else "",
        )
        if what
    ]
    if problems:
        result["error"] = "; ".join(problems)
    result["ok"] = "error" not in result
    return result
