"""`annstream tune`: the cheapest nlist/nprobe that reaches a recall target on your data.

The corpus is the newest snapshot's ads, a .npy/.npz file of vectors, or GloVe 6B 50-d. The
queries are either held out of a sample of the corpus (`--queries N`, ground truth by exact
brute force), or yours (`--queries FILE.npy`, searched against the whole corpus) with your
ground truth (`--truth FILE.npy`: each query's true neighbours as corpus ids, best first) or
exact brute force. For each nlist an IVFFlat index is trained and filled once, then every
nprobe is timed on all queries (best of `--repeats`). The chosen setting is the one with the
lowest measured search time per query whose recall@K reaches the target; it is printed with a
config snippet to paste into annstream.toml. Exit status 1 when no setting reaches the target.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
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

__all__ = [
    "HELP",
    "add_arguments",
    "choose",
    "config_snippet",
    "load_corpus",
    "load_vectors",
    "run",
    "sweep",
    "truth_rows",
]

logger = logging.getLogger(__name__)

HELP = "sweep nlist/nprobe on a sample of the data and pick the cheapest meeting a recall target"

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

_TRAIN_PER_LIST = 40
_DEFAULT_N = 100_000
_DEFAULT_K = 10
# recall_warn_below sits this far under the tuned recall: the monitor's sample of ~100 head
# queries scatters by a point or two, and a drop of 5 points is worth a warning.
_WARN_MARGIN = 0.05
_TRUTH_CHECK = 50
_TRUTH_AGREEMENT_WARN = 0.9

EPILOG = """\
your own queries and ground truth:
  annstream tune --vectors corpus.npy --queries queries.npy --truth truth.npy --k 100
  corpus.npy (n, d) float; queries.npy (q, d) float; truth.npy (q, >= K) integer: each
  query's true nearest neighbours, best first, as row numbers of corpus.npy (0-based), or as
  ids when the corpus is an .npz with an 'ids' (or 'ad_ids') array next to 'vectors', or a
  snapshot (ad ids); -1 pads short rows. --k defaults to the width of truth.npy. Without
  --truth, exact brute force over the corpus is the ground truth. A few queries are checked
  against exact search under --metric: a low 'truth_agreement' means the ids or the metric
  differ from what the truth was computed with.

output: the sweep, the chosen setting, and a snippet for annstream.toml:
  [index] nlist, nprobe (and, commented, recall_target: the service then raises nprobe
  itself); [service] recall_warn_below (the tuned recall - 0.05)
"""


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


def _queries(text: str) -> int | str:
    """A count of held-out queries, or the path of a .npy file of query vectors."""
    if text.strip().isdigit():
        return int(text)
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--snapshot-dir", help="tune on the ads of the newest snapshot in this dir")
    src.add_argument(
        "--vectors",
        help="tune on a .npy file of vectors (n, d), or an .npz with 'vectors' [and 'ids']",
    )
    parser.add_argument("--config", help="TOML config (index.metric; index.dim for --snapshot-dir)")
    parser.add_argument("--metric", help="cosine, ip or l2 (default: index.metric)")
    parser.add_argument(
        "--n", type=int, help=f"base vectors sampled ({_DEFAULT_N}; not with --queries FILE)"
    )
    parser.add_argument(
        "--queries",
        type=_queries,
        default=1_000,
        metavar="N|FILE.npy",
        help="N held-out queries (1000), or a .npy file of your query vectors (q, d)",
    )
    parser.add_argument(
        "--truth",
        metavar="FILE.npy",
        help="with --queries FILE: (q, >= K) ids of each query's true neighbours, best first",
    )
    parser.add_argument("--k", type=int, help=f"recall@K ({_DEFAULT_K}; with --truth: its width)")
    parser.add_argument("--target", type=float, default=0.95, help="recall target (0.95)")
    parser.add_argument("--nlist", type=_ints, default=[256, 1024], help="e.g. 256,1024")
    parser.add_argument(
        "--nprobe", type=_ints, default=[8, 16, 32, 64, 128], help="e.g. 8,16,32,64,128"
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting (2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--plot", metavar="PATH", help="write recall vs cost as a PNG")


def _load_npy(path: str, what: str) -> npt.NDArray[Any]:
    p = Path(path)
    if p.suffix != ".npy" or not p.is_file():
        raise ConfigError(f"{what} {p}: pass an existing .npy file")
    try:
        return np.asarray(np.load(p, mmap_mode="r", allow_pickle=False))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {p}: not a readable .npy file ({exc})") from None


def load_corpus(args: argparse.Namespace) -> tuple[npt.NDArray[np.int64] | None, npt.NDArray[Any]]:
    """(ids, vectors) of the corpus: snapshot ads, a .npy/.npz file, or GloVe (vectors may be
    memory-mapped); ids None means row numbers (a .npy file, an .npz without ids, GloVe)."""
    if args.snapshot_dir:
        from annstream.snapshot import load_latest_snapshot

        cfg = load_config(args.config).index
        snap = load_latest_snapshot(args.snapshot_dir, cfg)
        if snap is None:
            raise ConfigError(f"no usable snapshot in {args.snapshot_dir}: pass --snapshot-dir")
        snap_ids, vectors = snap.index.export()
        return np.asarray(snap_ids, dtype="int64"), vectors
    if not args.vectors:
        from producers.sources import glove_vectors

        return None, glove_vectors()
    p = Path(args.vectors)
    if p.suffix not in (".npy", ".npz") or not p.is_file():
        raise ConfigError(f"--vectors {p}: pass an existing .npy file of shape (n, d) or an .npz")
    ids: npt.NDArray[np.int64] | None = None
    if p.suffix == ".npy":
        x: npt.NDArray[Any] = np.load(p, mmap_mode="r")
    else:
        with np.load(p, allow_pickle=False) as npz:
            if "vectors" not in npz.files:
                raise ConfigError(f"--vectors {p}: no 'vectors' array (found {npz.files})")
            x = npz["vectors"]
            names = [name for name in ("ids", "ad_ids") if name in npz.files]
            if names:
                ids = np.asarray(npz[names[0]], dtype="int64")
    if x.ndim != 2:
        raise ConfigError(f"--vectors {p} has shape {x.shape}: expected (n, d)")
    if ids is not None and ids.shape != (len(x),):
        raise ConfigError(f"--vectors {p}: 'ids' {ids.shape} must hold one id per vector")
    return ids, x


def load_vectors(args: argparse.Namespace) -> npt.NDArray[Any]:
    """The corpus vectors (see `load_corpus`)."""
    return load_corpus(args)[1]


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
    truth: npt.ArrayLike | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """(one row per (nlist, nprobe): recall, ms_per_query, qps; timings of the phases).

    `xb`, `xq` are prepared (unit norm under cosine) float32; `truth` (q, >= k) holds row
    numbers of `xb` (-1 pads), exact brute force when None. nlists larger than a 39th of the
    base are skipped (too few points to train them).
    """
    b = np.ascontiguousarray(xb, dtype="float32")
    q = np.ascontiguousarray(xq, dtype="float32")
    nb, d = b.shape
    if k <= 0 or repeats <= 0:
        raise ConfigError(f"--k ({k}) and --repeats ({repeats}) must be positive")
    t0 = time.perf_counter()
    if truth is None:
        _, true_rows = knn_exact(b, np.arange(nb, dtype="int64"), q, k, metric)
    else:
        true_rows = np.asarray(truth, dtype="int64")[:, :k]
        if true_rows.shape != (q.shape[0], k):
            raise ConfigError(f"truth {true_rows.shape} must have one row of >= {k} per query")
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
            labels = true_rows
            for _ in range(repeats):
                t = time.perf_counter()
                _, labels = ivf.search(q, k, params=params)
                best = min(best, time.perf_counter() - t)
            recall = recall_at_k(labels, true_rows, k)
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


def truth_rows(
    truth: npt.ArrayLike, ids: npt.NDArray[np.int64] | None, n: int, k: int
) -> npt.NDArray[np.int64]:
    """Ground-truth ids (q, >= k) as row numbers of the corpus (`ids` None: they already are);
    -1 stays -1. An id the corpus does not have is a ConfigError naming it."""
    t = np.asarray(truth)
    if t.ndim != 2 or t.dtype.kind not in "iu":
        raise ConfigError(f"--truth must be a 2-d integer array (q, K), got {t.dtype} {t.shape}")
    if t.shape[1] < k:
        raise ConfigError(f"--truth has {t.shape[1]} neighbours per query: fewer than --k {k}")
    t = np.asarray(t[:, :k], dtype="int64")
    pad = t == -1
    if ids is None:
        rows = t
        bad = ~pad & ((t < 0) | (t >= n))
    else:
        order = np.argsort(ids, kind="stable")
        pos = np.minimum(np.searchsorted(ids[order], t), n - 1)
        rows = np.where(pad, -1, order[pos])
        bad = ~pad & (ids[order][pos] != t)
    if bad.any():
        q, j = (int(v) for v in np.argwhere(bad)[0])
        space = "row numbers of --vectors (0-based)" if ids is None else "ids of the corpus"
        raise ConfigError(
            f"--truth[{q}, {j}] = {t[q, j]} is not one of the {n} {space}; "
            "see `annstream tune --help` for what the ids refer to"
        )
    return np.asarray(rows, dtype="int64")


def config_snippet(best: dict[str, Any], k: int, met: bool, target: float, about: str) -> str:
    """Lines to paste into annstream.toml for the chosen setting."""
    warn = math.floor(max(0.0, best["recall"] - _WARN_MARGIN) * 100) / 100
    verdict = "meets" if met else "MISSES"
    return "\n".join(
        [
            f"# annstream tune: recall@{k} {best['recall']:.4f} {verdict} target {target} "
            f"at nlist {best['nlist']}, nprobe {best['nprobe']}",
            f"# on {about}",
            "[index]",
            f"nlist = {best['nlist']}",
            f"nprobe = {best['nprobe']}",
            f"# or let the service raise nprobe itself until recall@refresh.k holds {target}:",
            f"# recall_target = {target}",
            "",
            "[service]",
            f"# the recall monitor measures recall@refresh.k: tuned at K = {k}",
            f"recall_warn_below = {warn:.2f}",
        ]
    )


def _prepare(x: npt.ArrayLike, metric: str) -> F32:
    a = np.ascontiguousarray(x, dtype="float32")
    return normalize(a) if metric == "cosine" else a


def _own_queries(
    args: argparse.Namespace, metric: str, k: int
) -> tuple[F32, F32, npt.NDArray[np.int64] | None, dict[str, Any]]:
    """(corpus, your queries, truth rows or None, what to report) for --queries FILE."""
    if args.n is not None:
        raise ConfigError("--n samples the corpus; with --queries FILE the whole corpus is used")
    ids, x = load_corpus(args)
    xb = _prepare(x, metric)
    q = _load_npy(str(args.queries), "--queries")
    if q.ndim != 2 or q.shape[1] != xb.shape[1]:
        raise ConfigError(
            f"--queries {args.queries} has shape {q.shape}: expected (q, {xb.shape[1]}), "
            "the corpus dimension"
        )
    xq = _prepare(q, metric)
    info: dict[str, Any] = {"queries_source": str(args.queries), "truth": "exact"}
    if not args.truth:
        return xb, xq, None, info
    truth = _load_npy(args.truth, "--truth")
    if truth.ndim != 2 or truth.shape[0] != xq.shape[0]:
        raise ConfigError(
            f"--truth {args.truth} has shape {truth.shape}: expected one row per query "
            f"({xq.shape[0]}, >= {k})"
        )
    rows = truth_rows(truth, ids, xb.shape[0], k)
    check = np.random.default_rng(args.seed).permutation(xq.shape[0])[:_TRUTH_CHECK]
    _, exact = knn_exact(xb, np.arange(xb.shape[0], dtype="int64"), xq[check], k, metric)
    agreement = recall_at_k(exact, rows[check], k)
    if agreement < _TRUTH_AGREEMENT_WARN:
        logger.warning(
            "--truth agrees with an exact %s search on only %.1f%% of the top %d of %d queries: "
            "check that its ids are what `--help` says and that --metric is the one it used",
            metric,
            100 * agreement,
            k,
            len(check),
        )
    info |= {"truth": str(args.truth), "truth_agreement": round(agreement, 4)}
    return xb, xq, rows, info


def run(args: argparse.Namespace) -> int:
    if not 0.0 < args.target <= 1.0:
        raise ConfigError(f"--target must be in (0, 1], got {args.target}")
    own = isinstance(args.queries, str)
    if args.truth and not own:
        raise ConfigError("--truth needs --queries FILE.npy: the queries the truth belongs to")
    n = _DEFAULT_N if args.n is None else args.n
    if n <= 0 or (not own and args.queries <= 0):
        raise ConfigError(f"--n ({n}) and --queries ({args.queries}) must be positive")
    k = args.k
    if k is None:
        k = _DEFAULT_K
        if args.truth:
            k = int(_load_npy(args.truth, "--truth").shape[-1])
    index_cfg = load_config(args.config).index
    metric = args.metric or index_cfg.metric
    t0 = time.perf_counter()
    source = args.snapshot_dir or args.vectors or "glove-6b-50d"
    if own:
        xb, xq, truth, info = _own_queries(args, metric, k)
    else:
        xb, xq = _split(load_vectors(args), n, args.queries, args.seed, metric)
        truth, info = None, {"queries_source": "held-out", "truth": "exact"}
    rows, timings = sweep(
        xb,
        xq,
        k,
        metric,
        args.nlist,
        args.nprobe,
        repeats=args.repeats,
        seed=args.seed,
        truth=truth,
    )
    best, met = choose(rows, args.target)
    about = f"{xb.shape[0]} vectors of {source}, {xq.shape[0]} queries ({metric})"
    snippet = config_snippet(best, k, met, args.target, about)
    warn = float(snippet.rsplit("= ", 1)[1])
    result: dict[str, Any] = {
        "nlist": best["nlist"],
        "nprobe": best["nprobe"],
        "recall": best["recall"],
        "target": args.target,
        "met": met,
        "k": k,
        "ms_per_query": best["ms_per_query"],
        "qps": best["qps"],
        "metric": metric,
        "data": {"source": str(source), "base": int(xb.shape[0]), "queries": int(xq.shape[0])}
        | info,
        "config": {
            "index": {"nlist": best["nlist"], "nprobe": best["nprobe"]},
            "service": {"recall_warn_below": warn},
        },
        "config_toml": snippet,
        "timings_s": {name: round(v, 3) for name, v in timings.items()}
        | {"total_s": round(time.perf_counter() - t0, 3)},
        "sweep": rows,
    }
    if args.plot:
        from annstream.bench.plots import plot_recall_cost

        result["plot"] = str(plot_recall_cost(rows, args.target, args.plot, best, k))
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
            f"nlist={best['nlist']} nprobe={best['nprobe']} recall@{k}={best['recall']:.4f} "
            f"{verdict} target={args.target} on {about}"
        )
        if "truth_agreement" in info:
            print(f"--truth agrees with exact search on {info['truth_agreement']:.1%} of a sample")
        print(f"\nfor annstream.toml:\n{snippet}")
    sys.stdout.flush()
    return 0 if met else 1
