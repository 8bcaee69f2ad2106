"""`annstream bench scale`: refresh cost and memory as the catalogue and the head set grow.

Synthetic clustered vectors (a mixture of Gaussians around random centres, unit-normalised under
cosine), so catalogues can outgrow GloVe's 400k. For each dimension (`--dims`) and catalogue
size (`--ads`, at `--heads-base` head queries) and each head-set size (`--heads`, at the
smallest catalogue, first dimension), one point:
- build: train IVF (`--nlist`) on a sample, add the catalogue, enter the head queries (their
  first search is a full recompute: `full_s`);
- incremental: `--batches` micro-batches of `--events` ad events (a third deletes, a third
  re-embeds, a third new ads) through `Refresher.apply` (index updates included); the median
  micro-batch is `incremental_s`;
- per ad event: incremental_s / events, and full_s / events (a full recompute per micro-batch
  is what incremental replaces); per head query: the same over the head count;
- memory: `bytes_per_ad` (the index's estimate per live ad, ad metadata not included),
  `bytes_per_head` (the refresher's arrays per head query), and the process RSS over the raw
  data (ad vectors + ids, head vectors + K + margin lists) after a heap trim.

`incremental_growth` / `full_growth`: cost per ad event at the largest catalogue over the
smallest (first dimension, `--heads-base` heads). Then, at the smallest catalogue:
- retrain: RSS and refresher bytes before and after a retrain and its paced recompute
  (flat: recomputed in place);
- catch-up (`--catchup` new ads into the index with `--catchup-heads` head queries present), in
  micro-batches of `--catchup-batches` sizes: ads per second through the refresher and lists
  rewritten per ad; batching by the lag writes each list once per (larger) batch.
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

import numpy as np

from annstream.config import IndexConfig, RefreshConfig
from annstream.events import AdChanges
from annstream.heads import HeadChanges
from annstream.heap import rss_bytes, trim_heap
from annstream.index import LiveIvfIndex
from annstream.refresher import Refresher

__all__ = ["HELP", "add_arguments", "run"]

HELP = "refresh cost per ad event and per head query, and memory, as catalogue and heads grow"

GROWTH_GOAL = 2.0
_CENTRES = 2_000
_CHUNK = 100_000


def _ints(text: str) -> list[int]:
    try:
        out = [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not out or min(out) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ads",
        type=_ints,
        default=[200_000, 1_000_000, 5_000_000],
        help="catalogue sizes (default 200000,1000000,5000000)",
    )
    parser.add_argument(
        "--ads-384",
        type=_ints,
        default=[100_000, 500_000],
        help="catalogue sizes at d 384 (default 100000,500000: 2 GB of vectors at most)",
    )
    parser.add_argument("--dims", type=_ints, default=[50, 384], help="dimensions (default 50,384)")
    parser.add_argument(
        "--heads",
        type=_ints,
        default=[20_000, 50_000, 200_000],
        help="head-set sizes at the smallest catalogue (default 20000,50000,200000)",
    )
    parser.add_argument(
        "--heads-base", type=int, default=20_000, help="head queries on the catalogue axis"
    )
    parser.add_argument("--events", type=int, default=2_000, help="ad events per micro-batch")
    parser.add_argument("--batches", type=int, default=5, help="micro-batches per point")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--margin", type=int, default=20)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--catchup", type=int, default=200_000, help="ads for the catch-up run")
    parser.add_argument(
        "--catchup-heads", type=int, default=50_000, help="head queries during catch-up"
    )
    parser.add_argument(
        "--catchup-batches",
        type=_ints,
        default=[5_000, 50_000],
        help="catch-up micro-batch sizes (default 5000,50000)",
    )
    parser.add_argument(
        "--catchup-scan-k",
        type=_ints,
        default=[16, 1_000_000],
        help="refresh.scan_k values for the catch-up run (default 16 = the config default, "
        "and 1000000: every candidate merged, no re-search)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="write the cost and memory curves to this PNG")


class _Vectors:
    """Clustered synthetic vectors: a fixed mixture of Gaussians, drawn in order by a seed."""

    def __init__(self, dim: int, seed: int) -> None:
        rng = np.random.default_rng([seed, dim])
        self.centres = rng.standard_normal((_CENTRES, dim)).astype(np.float32)
        self.centres /= np.linalg.norm(self.centres, axis=1, keepdims=True)
        self.weights = rng.dirichlet(np.full(_CENTRES, 2.0))
        self.rng = np.random.default_rng([seed, dim, 1])
        self.spread = 0.6 / np.sqrt(dim)

    def draw(self, n: int) -> np.ndarray:
        c = self.rng.choice(_CENTRES, n, p=self.weights)
        x = self.centres[c] + self.spread * self.rng.standard_normal(
            (n, self.centres.shape[1]), dtype=np.float32
        )
        return np.ascontiguousarray(x, dtype=np.float32)


def _rss_mb() -> float:
    gc.collect()
    trim_heap()
    rss = rss_bytes()
    return float("nan") if rss is None else rss / 2**20


class _Point:
    """One index + refresher at (dim, ads, heads)."""

    def __init__(
        self, args: argparse.Namespace, dim: int, n_ads: int, n_heads: int, scan_k: int = 16
    ) -> None:
        self.args, self.dim = args, dim
        self.gen = _Vectors(dim, args.seed)
        rss0 = _rss_mb()
        cfg = IndexConfig(dim=dim, metric="cosine", nlist=args.nlist, nprobe=args.nprobe)
        t = time.perf_counter()
        self.index = LiveIvfIndex.train(cfg, self.gen.draw(min(n_ads, 50 * args.nlist)))
        for a in range(0, n_ads, _CHUNK):
            m = min(_CHUNK, n_ads - a)
            self.index.upsert(np.arange(a, a + m, dtype=np.int64), self.gen.draw(m))
        self.build_s = time.perf_counter() - t
        self.next_id = n_ads
        self.heads = self.gen.draw(n_heads)
        rcfg = RefreshConfig(k=args.k, margin=args.margin, nprobe=args.nprobe, scan_k=scan_k)
        self.refresher = Refresher(self.index, rcfg)
        self.version = 1
        t = time.perf_counter()
        self.refresher.apply(
            AdChanges.empty(dim),
            HeadChanges(entered=np.arange(n_heads, dtype=np.int64)),
            self.lookup,
            self.version,
        )
        self.full_s = time.perf_counter() - t
        self.rss_mb = _rss_mb() - rss0
        width = args.k + args.margin
        self.raw_mb = (n_ads * (4 * dim + 8) + n_heads * (4 * dim + 12 * width)) / 2**20

    def lookup(self, q: np.ndarray) -> np.ndarray:
        return np.asarray(self.heads[q])

    def churn(self, events: int) -> AdChanges:
        third = events // 3
        live = self.index.ids()
        picked = self.index_rng.choice(live, 2 * third, replace=False)
        new = np.arange(self.next_id, self.next_id + events - 2 * third, dtype=np.int64)
        self.next_id += len(new)
        up = np.concatenate([picked[third:], new])
        return AdChanges(up, self.gen.draw(len(up)), picked[:third])

    @property
    def index_rng(self) -> np.random.Generator:
        return self.gen.rng

    def step(self, changes: AdChanges) -> tuple[float, int]:
        self.version += 1
        t = time.perf_counter()
        res = self.refresher.apply(changes, HeadChanges(), self.lookup, self.version)
        return time.perf_counter() - t, len(res.query_ids)

    def incremental(self, batches: int, events: int) -> float:
        times = [self.step(self.churn(events))[0] for _ in range(batches)]
        return float(np.median(times))


def _measure(args: argparse.Namespace, dim: int, n_ads: int, n_heads: int) -> dict[str, Any]:
    p = _Point(args, dim, n_ads, n_heads)
    inc_s = p.incremental(args.batches, args.events)
    out = {
        "dim": dim,
        "ads": n_ads,
        "heads": n_heads,
        "build_s": round(p.build_s, 2),
        "full_s": round(p.full_s, 4),
        "incremental_s": round(inc_s, 4),
        "speedup": round(p.full_s / inc_s, 1),
        "incremental_us_per_ad_event": round(1e6 * inc_s / args.events, 2),
        "full_us_per_ad_event": round(1e6 * p.full_s / args.events, 2),
        "incremental_us_per_head": round(1e6 * inc_s / n_heads, 3),
        "full_us_per_head": round(1e6 * p.full_s / n_heads, 3),
        "bytes_per_ad": round(p.index.memory_bytes() / p.index.ntotal, 1),
        "bytes_per_head": round(p.refresher.nbytes / n_heads, 1),
        "rss_mb": round(p.rss_mb, 1),
        "raw_mb": round(p.raw_mb, 1),
        "rss_over_raw": round(p.rss_mb / p.raw_mb, 2),
    }
    del p
    _rss_mb()
    return out


def _retrain(args: argparse.Namespace, dim: int, n_ads: int, n_heads: int) -> dict[str, Any]:
    """RSS and refresher bytes before and after a retrain and its paced recompute."""
    p = _Point(args, dim, n_ads, n_heads)
    p.incremental(2, args.events)
    before = (_rss_mb(), p.refresher.nbytes, p.refresher.capacity)
    new = p.index.retrained(p.gen.draw(min(n_ads, 50 * args.nlist)))
    p.index = new
    p.refresher.swap_index(new)
    batches = 0
    t = time.perf_counter()
    while True:
        p.step(p.churn(args.events))
        batches += 1
        if not p.refresher.pending_full:
            break
    recompute_s = time.perf_counter() - t
    after = (_rss_mb(), p.refresher.nbytes, p.refresher.capacity)
    del p, new
    _rss_mb()
    return {
        "ads": n_ads,
        "heads": n_heads,
        "recompute_batches": batches,
        "recompute_s": round(recompute_s, 2),
        "rss_mb_before": round(before[0], 1),
        "rss_mb_after": round(after[0], 1),
        "refresher_mb_before": round(before[1] / 2**20, 1),
        "refresher_mb_after": round(after[1] / 2**20, 1),
        "slots_before": before[2],
        "slots_after": after[2],
    }


def _catchup(args: argparse.Namespace, dim: int, n_ads: int) -> dict[str, Any]:
    """New ads arriving faster than real time, with head queries present."""
    out: dict[str, Any] = {"ads": args.catchup, "base_ads": n_ads, "heads": args.catchup_heads}
    for scan_k in args.catchup_scan_k:
        for size in args.catchup_batches:
            p = _Point(args, dim, n_ads, args.catchup_heads, scan_k=scan_k)
            written = searched = 0
            t = time.perf_counter()
            for a in range(0, args.catchup, size):
                m = min(size, args.catchup - a)
                ids = np.arange(p.next_id, p.next_id + m, dtype=np.int64)
                p.next_id += m
                p.version += 1
                res = p.refresher.apply(
                    AdChanges(ids, p.gen.draw(m)), HeadChanges(), p.lookup, p.version
                )
                written += len(res.query_ids)
                searched += int(res.stats["full_searches"])
            elapsed = time.perf_counter() - t
            out[f"batch_{size}_scan_k_{scan_k}"] = {
                "ads_per_s": round(args.catchup / elapsed),
                "lists_written": written,
                "lists_per_ad": round(written / args.catchup, 3),
                "full_searches": searched,
            }
            del p
            _rss_mb()
    return out


def _growth(points: list[dict[str, Any]], key: str) -> float:
    rows = sorted(points, key=lambda r: r["ads"])
    return round(float(rows[-1][key]) / float(rows[0][key]), 2)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.events < 3 or args.batches < 1:
        raise SystemExit("--events must be at least 3 and --batches at least 1")
    started = time.perf_counter()
    _measure(args, args.dims[0], 20 * args.nlist, 1000)  # load kernels and thread pools first
    catalogue: list[dict[str, Any]] = []
    for dim in args.dims:
        for n_ads in args.ads if dim != 384 else args.ads_384:
            catalogue.append(_measure(args, dim, n_ads, args.heads_base))
    d0 = args.dims[0]
    small = min(args.ads if d0 != 384 else args.ads_384)
    done = {(p["dim"], p["ads"], p["heads"]): p for p in catalogue}
    heads = [done.get((d0, small, h)) or _measure(args, d0, small, h) for h in args.heads]
    first = [p for p in catalogue if p["dim"] == d0]
    result: dict[str, Any] = {
        "benchmark": "scale",
        "k": args.k,
        "margin": args.margin,
        "nlist": args.nlist,
        "nprobe": args.nprobe,
        "events_per_batch": args.events,
        "vectors": "synthetic clustered (mixture of 2000 Gaussians), cosine",
        "incremental_growth": _growth(first, "incremental_us_per_ad_event"),
        "full_growth": _growth(first, "full_us_per_ad_event"),
        "catalogue_growth": round(max(p["ads"] for p in first) / min(p["ads"] for p in first), 1),
        "growth_goal": GROWTH_GOAL,
        "catalogue": catalogue,
        "heads": heads,
        "retrain": _retrain(args, d0, small, args.heads_base),
        "catch_up": _catchup(args, d0, small),
    }
    result["ok"] = result["incremental_growth"] <= GROWTH_GOAL
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    if args.plot:
        _plot(result, args.plot)
    return result


def _plot(result: dict[str, Any], path: str) -> None:
    from annstream.bench.plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    for dim in sorted({p["dim"] for p in result["catalogue"]}):
        rows = sorted((p for p in result["catalogue"] if p["dim"] == dim), key=lambda p: p["ads"])
        x = [p["ads"] for p in rows]
        ax.plot(x, [p["full_us_per_ad_event"] for p in rows], "s--", label=f"full, d {dim}")
        ax.plot(
            x, [p["incremental_us_per_ad_event"] for p in rows], "o-", label=f"incremental, d {dim}"
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("catalogue (ads, log)")
    ax.set_ylabel("refresh cost per ad event (µs, log)")
    ax.set_title(f"{result['catalogue'][0]['heads']:,} head queries")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    rows = sorted(result["heads"], key=lambda p: p["heads"])
    x = [p["heads"] for p in rows]
    ax.plot(x, [p["full_us_per_ad_event"] for p in rows], "s--", label="full")
    ax.plot(x, [p["incremental_us_per_ad_event"] for p in rows], "o-", label="incremental")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("head queries (log)")
    ax.set_ylabel("refresh cost per ad event (µs, log)")
    ax.set_title(f"{rows[0]['ads']:,} ads, d {rows[0]['dim']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[2]
    pts = result["catalogue"] + [p for p in result["heads"] if p not in result["catalogue"]]
    labels = [f"{p['ads'] // 1000}k/{p['heads'] // 1000}k d{p['dim']}" for p in pts]
    ax.bar(range(len(pts)), [p["rss_over_raw"] for p in pts])
    ax.axhline(2.0, color="grey", linestyle="--", label="goal 2x")
    ax.set_xticks(range(len(pts)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("RSS / raw data (vectors + lists)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
