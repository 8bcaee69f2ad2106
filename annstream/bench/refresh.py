"""`annstream bench refresh`: incremental micro-batch refresh vs re-searching every head query.

Real vectors (GloVe 6B 50-d): ads, head queries and the ads that arrive are disjoint slices of
one shuffled copy. Each micro-batch changes `--churn` of the ads (a third deleted, a third
re-embedded, a third new). Three ways to get every head query's top K after a batch:
- incremental: `Refresher.apply` (index updates included);
- full: apply the same ad changes to a twin of the index, then search every head query again;
- touched: the twin's index updates plus a search of only the head queries probing a list that
  gained or lost an ad.
All three pay for the index updates, so the ratios compare the refresh work alone. `agreement`
is the fraction of head queries whose incremental top K (ids and order) equals the full
search's, over all batches; `list_agreement` the same for every valid entry of the K + margin.

Rows written per micro-batch: `changed_queries` is what the refresher emits (every list whose
stored K + margin changed: ids, order or scores); `topk_changed_queries` is how many of those
changed their top K ids (what was written before the whole list became the contract).
`--retired N` first lets N more queries enter and leave, so the refresher maintains N retired
lists (their deleted ads removed each micro-batch); `retired_rewrites` counts those rewritten.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from annstream.config import IndexConfig, RefreshConfig
from annstream.heads import HeadChanges
from annstream.index import LiveIvfIndex
from annstream.refresher import AdChanges, Refresher
from producers.sources import glove_vectors

__all__ = ["HELP", "add_arguments", "run"]

HELP = "incremental head-query refresh vs full and touched-only re-search (GloVe 50-d)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ads", type=int, default=200_000, help="live ads (default 200000)")
    parser.add_argument("--heads", type=int, default=20_000, help="head queries (default 20000)")
    parser.add_argument("--batches", type=int, default=3, help="micro-batches (default 3)")
    parser.add_argument("--churn", type=float, default=0.01, help="ads changed per batch")
    parser.add_argument("--k", type=int, default=100, help="neighbours per head query")
    parser.add_argument("--margin", type=int, default=20, help="extra neighbours kept")
    parser.add_argument("--nlist", type=int, default=1024, help="IVF lists")
    parser.add_argument("--nprobe", type=int, default=32, help="lists probed per query")
    parser.add_argument("--metric", default="cosine", choices=("cosine", "ip", "l2"))
    parser.add_argument("--retired", type=int, default=0, help="retired lists kept (default 0)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    data = np.ascontiguousarray(glove_vectors(), dtype=np.float32)
    n_change = max(3, int(args.ads * args.churn))
    n_new = args.batches * (2 * (n_change // 3) + n_change)
    if args.ads + args.heads + args.retired + n_new > len(data):
        raise SystemExit(
            f"--ads + --heads + --retired + arriving ads exceed the {len(data)} GloVe vectors"
        )
    data = data[rng.permutation(len(data))]
    n_q = args.heads + args.retired
    ads, heads = data[: args.ads], data[args.ads : args.ads + n_q]
    pool = data[args.ads + n_q :]

    cfg = IndexConfig(dim=data.shape[1], metric=args.metric, nlist=args.nlist, nprobe=args.nprobe)
    t = time.perf_counter()
    index = LiveIvfIndex.train(cfg, ads[rng.choice(args.ads, min(args.ads, 50_000), False)])
    index.upsert(np.arange(args.ads, dtype=np.int64), ads)
    build_s = time.perf_counter() - t

    twin = LiveIvfIndex.deserialize(index.cfg, *index.serialize(), version=index.version)
    rcfg = RefreshConfig(k=args.k, margin=args.margin, nprobe=args.nprobe)
    refresher = Refresher(index, rcfg, retired_ttl_s=86_400 if args.retired else None)
    head_ids = np.arange(args.heads, dtype=np.int64)
    t = time.perf_counter()
    refresher.apply(
        AdChanges.empty(cfg.dim), HeadChanges(entered=head_ids), lambda q: heads[q], version=1
    )
    init_s = time.perf_counter() - t
    version = 1
    if args.retired:
        gone = np.arange(args.heads, n_q, dtype=np.int64)
        for change in (HeadChanges(entered=gone), HeadChanges(exited=gone)):
            version += 1
            refresher.apply(AdChanges.empty(cfg.dim), change, lambda q: heads[q], version)
    heads = heads[: args.heads]
    head_lists = index.probe_lists(heads, args.nprobe)
    width = args.k + args.margin

    next_id, pool_at = args.ads, 0
    inc_s = full_s = touched_s = index_update_s = 0.0
    same = same_list = changed = topk_changed = retired_n = touched_n = 0
    for _ in range(args.batches):
        live = index.ids()
        picked = rng.choice(live, 2 * (n_change // 3), replace=False)
        deletes, updates = picked[: n_change // 3], picked[n_change // 3 :]
        inserts = np.arange(next_id, next_id + n_change - len(picked), dtype=np.int64)
        next_id += len(inserts)
        up_ids = np.concatenate([updates, inserts])
        up_vecs = pool[pool_at : pool_at + len(up_ids)]
        pool_at += len(up_ids)
        old_lists = index.assign_lists(index.vectors(np.concatenate([deletes, updates])))

        _, before_ids = refresher.topk(head_ids)
        version += 1
        t = time.perf_counter()
        res = refresher.apply(
            AdChanges(up_ids, up_vecs, deletes), HeadChanges(), lambda q: heads[q], version
        )
        inc_s += time.perf_counter() - t
        changed += len(res.query_ids)
        retired_n += len(res.retired)

        t = time.perf_counter()
        twin.upsert(up_ids, up_vecs)
        twin.delete(deletes)
        update_s = time.perf_counter() - t
        t = time.perf_counter()
        _, full_ids = twin.search(heads, width, nprobe=args.nprobe)
        full_s += update_s + time.perf_counter() - t
        _, inc_ids = refresher.topk(head_ids)
        same += int(np.all(inc_ids[:, : args.k] == full_ids[:, : args.k], axis=1).sum())
        valid = inc_ids >= 0
        same_list += int(np.all((inc_ids == full_ids) | ~valid, axis=1).sum())
        top = args.k
        topk_changed += int(np.any(inc_ids[:, :top] != before_ids[:, :top], axis=1).sum())

        lists = np.unique(np.concatenate([old_lists, index.assign_lists(up_vecs)]))
        touched = np.flatnonzero(np.isin(head_lists, lists).any(axis=1))
        touched_n += len(touched)
        t = time.perf_counter()
        twin.search(heads[touched], width, nprobe=args.nprobe)
        touched_s += update_s + time.perf_counter() - t
        index_update_s += update_s

    nb = args.batches
    return {
        "benchmark": "refresh",
        "head_queries": args.heads,
        "ads": args.ads,
        "churn": args.churn,
        "changes_per_batch": n_change,
        "batches": nb,
        "k": args.k,
        "margin": args.margin,
        "nlist": args.nlist,
        "nprobe": args.nprobe,
        "metric": args.metric,
        "incremental_s": round(inc_s / nb, 4),
        "full_s": round(full_s / nb, 4),
        "touched_s": round(touched_s / nb, 4),
        "index_update_s": round(index_update_s / nb, 4),
        "speedup": round(full_s / inc_s, 2),
        "touched_speedup": round(touched_s / inc_s, 2),
        "agreement": round(same / (nb * args.heads), 6),
        "list_agreement": round(same_list / (nb * args.heads), 6),
        "touched_queries": round(touched_n / nb),
        "changed_queries": round(changed / nb),
        "topk_changed_queries": round(topk_changed / nb),
        "retired": args.retired,
        "retired_rewrites": round(retired_n / nb),
        "retired_bytes_per_list": 16 + 12 * width,
        "build_s": round(build_s, 2),
        "initial_search_s": round(init_s, 2),
        "last_batch": {
            k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.stats.items()
        },
    }
