"""`annstream tune`: the cheapest nlist/nprobe that reaches a recall target on your data.

A sample of the vectors (the newest snapshot, a .npy file, or GloVe 6B 50-d by default) is split
into a base and held-out queries; exact ground truth comes from a brute-force search. For each
nlist an IVFFlat index is trained and filled once, then every nprobe is timed on all queries
(best of `--repeats`). The chosen setting is the one with the lowest measured search time per
query whose recall@K reaches the target. Exit status 1 when no setting does.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from annstream.ann import build_ivf, knn_exact, normalize, recall_at_k, train_ivf
from annstream.config import load_config
from annstream.errors import ConfigError

__all__ = ["HELP", "add_arguments", "choose", "load_vectors", "run", "sweep"]

logger = logging.getLogger(__name__)

HELP = "sweep nlist/nprobe on a sample of the data and pick the cheapest meeting a recall target"

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

_TRAIN_PER_LIST = 40


def _ints(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None
    if not values or values[0] <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--snapshot-dir", help="tune on the ads of the newest snapshot in this dir")
    src.add_argument("--vectors", help="tune on a .npy file of vectors (n, d)")
    parser.add_argument("--config", help="TOML config (index.metric; index.dim for --snapshot-dir)")
    parser.add_argument("--metric", help="cosine, ip or l2 (default: index.metric)")
    parser.add_argument("--n", type=int, default=100_000, help="base vectors sampled (100000)")
    parser.add_argument("--queries", type=int, default=1_000, help="held-out queries (1000)")
    parser.add_argument("--k", type=int, default=10, help="recall@K (10)")
    parser.add_argument("--target", type=float, default=0.95, help="recall target (0.95)")
    parser.add_argument("--nlist", type=_ints, default=[256, 1024], help="e.g. 256,1024")
    parser.add_argument(
        "--nprobe", type=_ints, default=[8, 16, 32, 64, 128], help="e.g. 8,16,32,64,128"
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting (2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--plot", metavar="PATH", help="write recall vs cost as a PNG")


def load_vectors(args: argparse.Namespace) -> npt.NDArray[Any]:
    """The candidate vectors: snapshot ads, a .npy file, or GloVe (may be memory-mapped)."""
    if args.snapshot_dir:
        from annstream.snapshot import load_latest_snapshot

        cfg = load_config(args.config).index
        snap = load_latest_snapshot(args.snapshot_dir, cfg)
        if snap is None:
            raise ConfigError(f"no usable snapshot in {args.snapshot_dir}: pass --snapshot-dir")
        return snap.index.export()[1]
    if args.vectors:
        p = Path(args.vectors)
        if p.suffix != ".npy" or not p.is_file():
            raise ConfigError(f"--vectors {p}: pass an existing .npy file of shape (n, d)")
        x: npt.NDArray[Any] = np.load(p, mmap_mode="r")
        if x.ndim != 2:
            raise ConfigError(f"--vectors {p} has shape {x.shape}: expected (n, d)")
        return x
    from producers.sources import glove_vectors

    return glove_vectors()


def _split(x: npt.NDArray[Any], n: int, queries: int, seed: int, metric: str) -> tuple[F32, F32]:
    total = x.shape[0]
    if total < queries + 2:
        raise ConfigError(f"{total} vectors are too few for {queries} held-out queries")
    nb = min(n, total - queries)
    rows = np.random.default_rng(seed).permutation(total)[: nb + queries]
    order = np.argsort(rows)
    picked = np.empty((rows.size, x.shape[1]), dtype="float32")
    picked[order] = x[rows[order]]
    if metric == "cosine":
        picked = normalize(picked)
    return np.ascontiguousarray(picked[queries:]), np.ascontiguousarray(picked[:queries])


def sweep(
    xb: npt.ArrayLike,
    xq: npt.ArrayLike,
    k: int,
    metric: str,
    nlists: list[int],
    nprobes: list[int],
    *,
    repeats: int = 2,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """(one row per (nlist, nprobe): recall, ms_per_query, qps; timings of the phases).

    `xb`, `xq` are prepared (unit norm under cosine) float32; nlists larger than a 39th of the
    base are skipped (too few points to train them).
    """
    b = np.ascontiguousarray(xb, dtype="float32")
    q = np.ascontiguousarray(xq, dtype="float32")
    nb, d = b.shape
    if k <= 0 or repeats <= 0:
        raise ConfigError(f"--k ({k}) and --repeats ({repeats}) must be positive")
    t0 = time.perf_counter()
    ids = np.arange(nb, dtype="int64")
    _, truth = knn_exact(b, ids, q, k, metric)
    timings = {"ground_truth_s": time.perf_counter() - t0, "train_s": 0.0, "add_s": 0.0}
    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(seed)
    for nlist in nlists:
        if nlist * 39 > nb:
            logger.warning("nlist %d skipped: %d base vectors are too few to train it", nlist, nb)
            continue
        ivf = build_ivf(d, metric, "ivfflat", nlist)
        ntrain = min(nb, _TRAIN_PER_LIST * nlist)
        t = time.perf_counter()
        train_ivf(ivf, b[np.sort(rng.choice(nb, ntrain, replace=False))])
        timings["train_s"] += time.perf_counter() - t
        t = time.perf_counter()
        ivf.add(b)
        timings["add_s"] += time.perf_counter() - t
        for nprobe in nprobes:
            if nprobe > nlist:
                continue
            params = faiss.SearchParametersIVF()
            params.nprobe = nprobe
            best = float("inf")
            labels = truth
            for _ in range(repeats):
                t = time.perf_counter()
                _, labels = ivf.search(q, k, params=params)
                best = min(best, time.perf_counter() - t)
            recall = recall_at_k(labels, truth, k)
            ms = 1000.0 * best / max(q.shape[0], 1)
            rows.append(
                {
                    "nlist": nlist,
                    "nprobe": nprobe,
                    "recall": round(recall, 5),
                    "ms_per_query": round(ms, 5),
                    "qps": round(1000.0 / ms, 1) if ms > 0 else None,
                }
            )
            logger.info("nlist %d nprobe %d: recall %.4f, %.4f ms/query", nlist, nprobe, recall, ms)
    if not rows:
        raise ConfigError(
            f"no setting could be tried on {nb} base vectors: lower --nlist or raise --n"
        )
    return rows, timings


def choose(rows: list[dict[str, Any]], target: float) -> tuple[dict[str, Any], bool]:
    """(the cheapest row reaching `target`, True), or (the best-recall row, False)."""
    meeting = [r for r in rows if r["recall"] >= target]
    if meeting:
        return min(meeting, key=lambda r: (r["ms_per_query"], r["nprobe"])), True
    return max(rows, key=lambda r: (r["recall"], -r["ms_per_query"])), False


def run(args: argparse.Namespace) -> int:
    if not 0.0 < args.target <= 1.0:
        raise ConfigError(f"--target must be in (0, 1], got {args.target}")
    if args.n <= 0 or args.queries <= 0:
        raise ConfigError(f"--n ({args.n}) and --queries ({args.queries}) must be positive")
    index_cfg = load_config(args.config).index
    metric = args.metric or index_cfg.metric
    t0 = time.perf_counter()
    x = load_vectors(args)
    xb, xq = _split(x, args.n, args.queries, args.seed, metric)
    rows, timings = sweep(
        xb, xq, args.k, metric, args.nlist, args.nprobe, repeats=args.repeats, seed=args.seed
    )
    best, met = choose(rows, args.target)
    source = args.snapshot_dir or args.vectors or "glove-6b-50d"
    result: dict[str, Any] = {
        "nlist": best["nlist"],
        "nprobe": best["nprobe"],
        "recall": best["recall"],
        "target": args.target,
        "met": met,
        "k": args.k,
        "ms_per_query": best["ms_per_query"],
        "qps": best["qps"],
        "metric": metric,
        "data": {"source": str(source), "base": int(xb.shape[0]), "queries": int(xq.shape[0])},
        "timings_s": {name: round(v, 3) for name, v in timings.items()}
        | {"total_s": round(time.perf_counter() - t0, 3)},
        "sweep": rows,
    }
    if args.plot:
        from annstream.bench.plots import plot_recall_cost

        result["plot"] = str(plot_recall_cost(rows, args.target, args.plot, best, args.k))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'nlist':>6} {'nprobe':>6} {'recall':>8} {'ms/query':>9} {'qps':>9}")
        for r in rows:
            mark = "  <- chosen" if r is best else ""
            print(
                f"{r['nlist']:>6} {r['nprobe']:>6} {r['recall']:>8.4f} "
                f"{r['ms_per_query']:>9.4f} {r['qps'] or 0:>9.0f}{mark}"
            )
        verdict = "meets" if met else "MISSES"
        print(
            f"nlist={best['nlist']} nprobe={best['nprobe']} recall@{args.k}={best['recall']:.4f} "
            f"{verdict} target={args.target} on {xb.shape[0]} vectors of {source}"
        )
    sys.stdout.flush()
    return 0 if met else 1
