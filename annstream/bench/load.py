"""`annstream bench load`: minutes of ad + engagement traffic; does memory stay flat, lag bounded?

The same rig as `bench freshness` (embedded broker, in-process service, a catalogue of `--ads`
ads with ad churn over it, `--heads` head queries with Zipf engagements over them; GloVe 6B
50-d at `--dim 50`, clustered synthetic vectors at other dimensions), run for `--minutes` at
`--rate` ad events/s. Every `--sample-every` seconds: the process RSS (VmRSS:
service, feeder and their clients), the broker's RSS (Tansu keeps every message in RAM and
applies no retention, so it grows by design), ad and engagement lag (sent - consumed), and the
freshness p50/p99 of that window.

`rss_growth_mb` = mean RSS over the last minute - mean over the first minute after warm-up
(warm-up and windows are a fifth of the run when it is shorter than five minutes). The baseline
is that first minute itself: `rss_growth_ratio` = last / first. `lag_growth` = mean ad lag in the
last window - in the first; flat means RSS grew by under 5% (at least 20 MB) and the lag by under
one second of ad events.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import numpy as np

from annstream.bench.rig import RigOptions, ServiceRig, add_rig_arguments, rss_mb

__all__ = ["HELP", "add_arguments", "run"]

logger = logging.getLogger(__name__)

HELP = "sustained ad + engagement traffic: RSS and consumer lag over time (flat or not)"

RSS_SLACK_FRACTION = 0.05
RSS_SLACK_MB = 20.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=10, help="run length (default 10)")
    parser.add_argument("--rate", type=float, default=2000, help="ad events/s (default 2000)")
    parser.add_argument(
        "--engagement-rate",
        type=float,
        default=1000,
        help="engagement events/s (default 1000)",
    )
    parser.add_argument("--heads", type=int, default=50_000, help="head queries (default 50000)")
    parser.add_argument("--ads", type=int, default=200_000, help="ad catalogue (default 200000)")
    parser.add_argument(
        "--sample-every", type=float, default=5, help="seconds between samples (default 5)"
    )
    add_rig_arguments(parser)
    parser.add_argument("--plot", help="write RSS and lag over time to this PNG")


def _check(args: argparse.Namespace) -> None:
    for name in ("minutes", "rate", "heads", "ads", "sample_every", "nlist", "nprobe", "k"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive")
    if args.ads < args.nlist:
        raise SystemExit(f"--ads ({args.ads}) must be at least --nlist ({args.nlist})")


def _window_mean(samples: list[dict[str, float]], key: str, lo: float, hi: float) -> float:
    values = [s[key] for s in samples if lo <= s["t_s"] < hi]
    return float(np.mean(values)) if values else float("nan")


def run(args: argparse.Namespace) -> dict[str, Any]:
    _check(args)
    duration = args.minutes * 60.0
    window = min(60.0, duration / 5)
    warmup = window
    opts = RigOptions(
        ads=args.ads,
        queries=args.heads,
        partitions=args.partitions,
        nlist=args.nlist,
        nprobe=args.nprobe,
        k=args.k,
        margin=args.margin,
        seed=args.seed,
        timeout_s=args.timeout,
        dim=args.dim,
        store=args.store,
        settings=tuple(args.set),
    )
    with ServiceRig(opts) as rig:
        heads = rig.warm_heads()
        broker_pid = rig.broker.pid
        rss_start = rss_mb()

        def more(sample: dict[str, float]) -> None:
            sample["broker_rss_mb"] = round(rss_mb(broker_pid), 1) if broker_pid else float("nan")
            if not args.json:
                print(f"[load] {sample}", file=sys.stderr, flush=True)

        phase = rig.run_phase(
            args.rate, args.engagement_rate, duration, args.sample_every, on_sample=more
        )
        setup = dict(rig.setup_s)
    samples = phase.samples
    first = (warmup, warmup + window)
    last = (duration - window, duration + 1)
    rss_first = _window_mean(samples, "rss_mb", *first)
    rss_last = _window_mean(samples, "rss_mb", *last)
    lag_first = _window_mean(samples, "ad_lag", *first)
    lag_last = _window_mean(samples, "ad_lag", *last)
    elag_first = _window_mean(samples, "engagement_lag", *first)
    elag_last = _window_mean(samples, "engagement_lag", *last)
    rss_growth = rss_last - rss_first
    after = [s for s in samples if s["t_s"] >= warmup]
    slope = (
        float(np.polyfit([s["t_s"] for s in after], [s["ad_lag"] for s in after], 1)[0])
        if len(after) >= 3
        else 0.0
    )
    rss_flat = rss_growth < max(RSS_SLACK_MB, RSS_SLACK_FRACTION * rss_first)
    lag_flat = lag_last - lag_first < args.rate
    summary = phase.summary()
    result: dict[str, Any] = {
        "benchmark": "load",
        "minutes": args.minutes,
        "rate": args.rate,
        "dim": opts.dim,
        "store": opts.store,
        "settings": list(opts.settings),
        "vectors": opts.vectors,
        "ad_events_per_s": summary["ad_events_per_s"],
        "engagement_events_per_s": summary["engagement_events_per_s"],
        "head_queries": heads,
        "rss_mb": {
            "start": round(rss_start, 1),
            "first_window": round(rss_first, 1),
            "last_window": round(rss_last, 1),
            "max": max((s["rss_mb"] for s in samples), default=float("nan")),
        },
        "rss_growth_mb": round(rss_growth, 1),
        "rss_growth_ratio": round(rss_last / rss_first, 3) if rss_first > 0 else None,
        "lag_growth": {
            "ad_first_window": round(lag_first, 1),
            "ad_last_window": round(lag_last, 1),
            "ad": round(lag_last - lag_first, 1),
            "ad_slope_per_s": round(slope, 2),
            "engagement": round(elag_last - elag_first, 1),
        },
        "flat": {"rss": bool(rss_flat), "lag": bool(lag_flat)},
        "freshness_ms": summary["freshness_ms"],
        "totals": {
            "ads_sent": phase.ads_sent,
            "ads_consumed": phase.ads_consumed,
            "engagements_sent": phase.engagements_sent,
            "engagements_consumed": phase.engagements_consumed,
            "micro_batches": phase.micro_batches,
            "records_written": phase.records_written,
            "drained": phase.drained,
            "drain_s": summary["drain_s"],
        },
        "micro_batch_ms_mean": summary["micro_batch_ms_mean"],
        "micro_batch_ms_max": summary["micro_batch_ms_max"],
        "profile_s_per_batch": summary["profile_s_per_batch"],
        "windows_s": {"warmup": warmup, "window": window},
        "setup_s": setup,
        "samples": samples,
    }
    if args.plot:
        _plot(samples, args.plot)
    return result


def _plot(samples: list[dict[str, float]], path: str) -> None:
    from pathlib import Path

    from annstream.bench.plots import pyplot

    plt = pyplot()
    t = [s["t_s"] for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(t, [s["rss_mb"] for s in samples], label="service process")
    top.set_ylabel("RSS (MB)")
    top.grid(True, alpha=0.3)
    top.legend(loc="best")
    bottom.plot(t, [s["ad_lag"] for s in samples], label="ad lag")
    bottom.plot(t, [s["engagement_lag"] for s in samples], label="engagement lag")
    bottom.set_xlabel("time (s)")
    bottom.set_ylabel("events behind")
    bottom.grid(True, alpha=0.3)
    bottom.legend(loc="best")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
