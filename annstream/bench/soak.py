"""`annstream bench soak`: days of traffic in compressed event time, restarts at intervals.

One run: an embedded broker, a SQLite store and `annstream run` as a child process. Event time
spans `--hours` (default 168: 7 days): every hour of it brings `--engagements-per-hour`
Zipf-distributed engagements (the popularity ranking of the queries is reshuffled every day,
so head queries enter and leave) with event times spread over that hour, some of them late,
and `--ad-changes-per-hour` new, updated and deleted ads. The hours are published
one every `--hour-s` wall seconds (so each is at least one micro-batch and one head-state
changelog record per partition), in `--restarts` + 1 slices; after each slice the service is
caught up (every engagement committed), its RSS read, and it is restarted (SIGTERM and SIGKILL
alternately). Each restart reports its wall time to restored, the restore time and the records
and bytes the head-state restore read (from the service's log): restore time must not grow
with uptime, so `restore_ratio` (last / first, each at least 50 ms) stays near 1.
At the end: the head-state changelog's size (records and bytes on the topic) and every check
of the exact oracle (annstream/testing/oracle.py) over the store.
"""

from __future__ import annotations

import argparse
import re
import signal
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import TopicPartition

from annstream.bench.faults import Service, caught_up, status
from annstream.broker import EmbeddedBroker, create_topics, free_port
from annstream.config import KafkaConfig
from annstream.events import AdBatch, EngagementBatch
from annstream.kafka import make_consumer
from annstream.testing.harness import (
    ENG_PARTITIONS,
    HANG_GUARD_S,
    NLIST,
    QUERY_BASE,
    T0,
    Feed,
    Topics,
    exact_oracle,
    judge,
    service_settings,
    to_toml,
)
from annstream.testing.oracle import CHECKS
from producers.sources import clustered_vectors, synthetic_ads, zipf_probabilities

__all__ = ["HELP", "add_arguments", "run", "traffic"]

HELP = "days of compressed event time with restarts: restore time, RSS, changelog, oracle"

HOUR_MS = 3_600_000
_RESTORE = re.compile(
    r"restored (\d+) head-state chunks of partition (\d+) \((\d+) head queries, (\d+) bytes, "
    r"offsets (\d+)\.\.(\d+)\) in ([0-9.]+)s"
)
_FLOOR_S = 0.05


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hours", type=float, default=168.0, help="event time (168 h = 7 d)")
    parser.add_argument("--restarts", type=int, default=6, help="restarts at even intervals")
    parser.add_argument("--ads", type=int, default=2_000, help="initial ads (default 2000)")
    parser.add_argument("--queries", type=int, default=300, help="distinct queries (300)")
    parser.add_argument("--engagements-per-hour", type=int, default=150)
    parser.add_argument("--ad-changes-per-hour", type=int, default=10)
    parser.add_argument("--dim", type=int, default=384, help="embedding dimension (384)")
    parser.add_argument("--batch-ms", type=int, default=100, help="refresh.batch_ms (100)")
    parser.add_argument(
        "--hour-s", type=float, default=0.15, help="wall seconds per hour of event time (0.15)"
    )
    parser.add_argument("--seed", type=int, default=0)


def traffic(
    hours: int, ads: int, queries: int, per_hour: int, ad_changes: int, dim: int, seed: int
) -> tuple[list[AdBatch], list[list[AdBatch | EngagementBatch]]]:
    """(initial ads, then the events of each hour of event time in publish order)."""
    rng = np.random.default_rng([seed, 7])
    initial = [
        AdBatch.upserts(b.ad_ids, b.vectors, T0)
        for b in synthetic_ads(ads, seed=seed, dim=dim, batch_size=500)
    ]
    qvec = clustered_vectors(queries, dim, np.random.default_rng([seed, 8]))
    cdf = np.cumsum(zipf_probabilities(queries, 1.1))
    weights = np.array([1.0, 2.0, 4.0], dtype="float32")
    next_id = ads + 1
    out: list[list[AdBatch | EngagementBatch]] = []
    ranking = rng.permutation(queries)
    for h in range(hours):
        if h % 24 == 0:
            ranking = rng.permutation(queries)
        start = T0 + h * HOUR_MS
        q = ranking[np.minimum(np.searchsorted(cdf, rng.random(per_hour)), queries - 1)]
        times = start + np.sort(rng.integers(0, HOUR_MS, per_hour))
        late = rng.random(per_hour) < 0.1
        times[late] = np.maximum(T0, times[late] - rng.integers(0, HOUR_MS, int(late.sum())))
        eng = EngagementBatch(
            query_ids=(QUERY_BASE + q).astype("int64"),
            item_ids=np.full(per_hour, -1, "int64"),
            event_types=np.zeros(per_hour, "uint8"),
            weights=weights[rng.integers(0, len(weights), per_hour)],
            event_time_ms=times.astype("int64"),
            vectors=np.ascontiguousarray(qvec[q]),
            has_vector=np.ones(per_hour, bool),
        )
        new = np.arange(next_id, next_id + ad_changes, dtype="int64")
        next_id += ad_changes
        updated = rng.integers(1, next_id, ad_changes // 2 + 1).astype("int64")
        ids = np.concatenate([new, updated])
        vecs = clustered_vectors(len(ids), dim, rng)
        deleted = rng.integers(1, next_id, ad_changes // 2 + 1).astype("int64")
        out.append(
            [
                eng,
                AdBatch.upserts(ids, vecs, start + HOUR_MS // 2),
                AdBatch.deletes(deleted, dim, start + HOUR_MS // 2),
            ]
        )
    return initial, out


def _restores(log: Path) -> dict[str, float]:
    """What the head-state restores of one run read, summed over partitions."""
    found = _RESTORE.findall(log.read_text(errors="replace"))
    return {
        "records": sum(int(m[0]) for m in found),
        "bytes": sum(int(m[3]) for m in found),
        "head_queries": sum(int(m[2]) for m in found),
        "changelog_end": sum(int(m[5]) for m in found),
        "seconds": round(sum(float(m[6]) for m in found), 3),
    }


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def _changelog(bootstrap: str, topic: str) -> dict[str, int]:
    """Records and bytes on the head-state topic, read from the beginning (bounded)."""
    consumer = make_consumer(
        KafkaConfig(bootstrap_servers=bootstrap), group_id=f"soak-{uuid.uuid4().hex[:8]}"
    )
    records = size = 0
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(ENG_PARTITIONS)])
        deadline = time.monotonic() + HANG_GUARD_S
        idle = 0
        while idle < 3 and time.monotonic() < deadline:
            got = [m for m in consumer.consume(1_000, 0.3) if m.error() is None]
            idle = 0 if got else idle + 1
            records += len(got)
            size += sum(len(m.value() or b"") + len(m.key() or b"") for m in got)
    finally:
        consumer.close()
    return {"records": records, "bytes": size}


def run(args: argparse.Namespace) -> dict[str, Any]:
    hours = int(args.hours)
    if hours < 1 or args.restarts < 0:
        raise ValueError("--hours must be at least 1 and --restarts >= 0")
    initial, by_hour = traffic(
        hours,
        args.ads,
        args.queries,
        args.engagements_per_hour,
        args.ad_changes_per_hour,
        args.dim,
        args.seed,
    )
    steps: list[AdBatch | EngagementBatch] = [*initial]
    for hour in by_hour:
        steps += hour
    oracle = exact_oracle(steps, args.dim)
    training = np.random.default_rng([args.seed, 99]).standard_normal((1_000, args.dim))
    t_start = time.perf_counter()
    restarts: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="annstream-soak-") as tmpdir,
        EmbeddedBroker() as broker,
    ):
        tmp = Path(tmpdir)
        bootstrap = broker.bootstrap_servers
        tag = uuid.uuid4().hex[:8]
        topics = Topics(f"ads-{tag}", f"eng-{tag}", f"dlq-{tag}", f"head-state-{tag}")
        create_topics(bootstrap, [topics.ads], partitions=2)
        create_topics(bootstrap, [topics.engagements], partitions=ENG_PARTITIONS)
        create_topics(bootstrap, [topics.dead_letters], partitions=1)
        training_file = tmp / "training.npy"
        np.save(training_file, training.astype("float32"))
        group = f"soak-{tag}"
        url = f"sqlite:///{tmp / 'store.db'}"
        port = free_port()
        settings = service_settings(
            bootstrap,
            topics,
            training_file,
            url,
            tmp / "snap",
            group,
            dim=args.dim,
            kafka={"client": {"session.timeout.ms": "3000", "heartbeat.interval.ms": "1000"}},
            index={"nprobe": NLIST},
            refresh={"nprobe": NLIST, "batch_ms": args.batch_ms},
            service={"log_level": "INFO", "metrics_port": port, "recall_every_batches": 0},
        )
        config = tmp / "annstream.toml"
        config.write_text(to_toml(settings))
        feed = Feed(bootstrap, topics, dim=args.dim)
        for b in initial:
            feed.send(b)
        feed.flush()
        service = Service(config, tmp, port)
        first_start_s = service.start()
        slices = np.array_split(np.arange(hours), args.restarts + 1)
        try:
            for n, hs in enumerate(slices):
                for h in hs.tolist():
                    paced = time.monotonic() + args.hour_s
                    for b in by_hour[h]:
                        feed.send(b)
                    feed.producer.poll(0)
                    time.sleep(max(0.0, paced - time.monotonic()))
                feed.flush()
                ok = _wait(lambda: caught_up(feed, bootstrap, topics, group, port, None))
                if n == len(slices) - 1:
                    break
                assert service.proc is not None
                rss = _rss_mb(service.proc.pid)
                sig = signal.SIGTERM if n % 2 == 0 else signal.SIGKILL
                service.stop(sig)
                restart_s = service.start()
                restarts.append(
                    {
                        "after_event_hours": int(hs[-1]) + 1,
                        "signal": sig.name,
                        "caught_up": ok,
                        "rss_mb_before": rss,
                        "restart_s": round(restart_s, 3),
                        "restore": _restores(service.logs[-1]),
                    }
                )
            _wait(lambda: caught_up(feed, bootstrap, topics, group, port, len(oracle.live_ids)))
            doc = status(port)
            index_ads = None if doc is None else int(doc["index"].get("ads", -1))
            report = judge(url, oracle, index_ads)
            deadline = time.monotonic() + 20.0
            while not report.ok(("head_missing", "list_exact")) and time.monotonic() < deadline:
                time.sleep(0.5)
                report = judge(url, oracle, index_ads)
            assert service.proc is not None
            rss_end = _rss_mb(service.proc.pid)
            code = service.stop(signal.SIGTERM)
        finally:
            if service.alive():
                service.stop(signal.SIGKILL)
        changelog = _changelog(bootstrap, topics.head_state)
    seconds = [max(r["restore"]["seconds"], _FLOOR_S) for r in restarts]
    walls = [r["restart_s"] for r in restarts]
    c = report.checks
    return {
        "benchmark": "soak",
        "event_hours": hours,
        "event_days": round(hours / 24, 2),
        "restarts": restarts,
        "first_start_s": round(first_start_s, 3),
        "restore_s_first": restarts[0]["restore"]["seconds"] if restarts else None,
        "restore_s_last": restarts[-1]["restore"]["seconds"] if restarts else None,
        "restore_ratio": round(seconds[-1] / seconds[0], 3) if restarts else None,
        "restart_s_first": walls[0] if walls else None,
        "restart_s_last": walls[-1] if walls else None,
        "restart_ratio": round(walls[-1] / walls[0], 3) if walls else None,
        "restore_records_first": restarts[0]["restore"]["records"] if restarts else None,
        "restore_records_last": restarts[-1]["restore"]["records"] if restarts else None,
        "rss_mb": [r["rss_mb_before"] for r in restarts] + [rss_end],
        "changelog_records": changelog["records"],
        "changelog_bytes": changelog["bytes"],
        "engagements": sum(len(h[0]) for h in by_hour),
        "ad_events": sum(len(b) for b in initial) + sum(len(h[1]) + len(h[2]) for h in by_hour),
        "index_ads": index_ads,
        "live_ads": len(oracle.live_ids),
        "checks": {n: {"checked": c[n].checked, "failed": c[n].failed} for n in CHECKS},
        "oracle": report.as_dict(),
        "exit_code": code,
        "total_s": round(time.perf_counter() - t_start, 3),
    }


def _wait(done: Any, guard_s: float = HANG_GUARD_S) -> bool:
    deadline = time.monotonic() + guard_s
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True
