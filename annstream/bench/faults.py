"""`annstream bench faults`: `annstream run` under a random schedule of faults, then the store
against the exact oracle of annstream/testing/oracle.py.

One run: an embedded broker and an Aerospike test server of its own, the seeded workload of the
service tests at `--dim` (initial ads, then engagements interleaved with new, updated and
deleted ads) with event times spread over `--hours` of event time (decay, late events, queries
that must leave the head set), `--bad-inputs` hostile messages mixed into both topics (the
oversized ones over the real default limit of 1,000,000 bytes), and the service as a child
process under the crash points of annstream/testing/crash_points.py. The refresher searches
with nprobe = nlist, so its lists must equal numpy brute force. The events after the initial
ads are published in one chunk per fault; each fault from a shuffled schedule hits the
service while it works on its chunk:
- kill: SIGKILL at a random moment, then a restart;
- startup_kill: SIGKILL within 1.5 s of starting (before or while it restores), then a restart;
- restore_kill: killed right after restoring one of its engagement partitions' head state;
- snapshot_kill: killed in the middle of writing an index snapshot (a torn temporary file);
- commit_kill: killed after a store write, before its changelog records and offset commit;
- idle_restart: SIGTERM once everything is committed, an idle pause, then a restart;
- corrupt: SIGTERM, the newest snapshot overwritten in its middle, then a restart;
- pause: the broker SIGSTOPped for a random `--fault-min-s`..`--fault-max-s`, then SIGCONT;
- outage: the store server stopped for as long, then started again on the same port.
A fault is survived when the service is alive (or restarted) and restores its partitions again.
Between faults the store is read and no list's version may go backwards.

The result lists every oracle check (`checks`: checked, failed; `oracle` adds examples).
`messages_lost` = ads whose final state is wrong in the index of the final snapshot + engagement
events never committed (published end offset minus committed offset, per partition) + head
queries with no live list + lists not equal to the oracle's. 0 is the only acceptable value.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from annstream.broker import EmbeddedBroker, create_topics, free_port
from annstream.config import IndexConfig, KafkaConfig
from annstream.events import AdBatch, EngagementBatch
from annstream.kafka import make_producer
from annstream.schemas import HEADER_SIZE
from annstream.snapshot import list_snapshots, load_latest_snapshot
from annstream.testing.aerospike_server import AerospikeTestServer
from annstream.testing.crash_points import REACHED, arm
from annstream.testing.harness import (
    ENG_PARTITIONS,
    HANG_GUARD_S,
    NLIST,
    RESTORED,
    Feed,
    Topics,
    bad_inputs,
    committed_offsets,
    exact_oracle,
    judge,
    log_tail,
    read_dead_letters,
    service_settings,
    spawn_service,
    spread_times,
    to_toml,
    wait_for_log,
    workload,
)
from annstream.testing.oracle import CHECKS, ExactOracle, OracleReport, read_store

__all__ = ["HELP", "Service", "add_arguments", "caught_up", "run", "status"]

logger = logging.getLogger(__name__)

HELP = "annstream run under kill -9 points, restarts, broker pauses, store outages, bad input"

FAULTS = (
    "kill",
    "startup_kill",
    "restore_kill",
    "snapshot_kill",
    "commit_kill",
    "idle_restart",
    "corrupt",
    "pause",
    "outage",
)
_ARMED = {"snapshot_kill": "snapshot", "commit_kill": "store_written"}
_MAX_MESSAGE_BYTES = KafkaConfig().max_message_bytes
"""The real default limit; the feed's producer may write larger messages, as a broker allows."""
_SETTLE_S = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kills", type=int, default=5, help="kill -9 at random (default 5)")
    for kind, what in (
        ("startup-kills", "kill -9 while starting"),
        ("restore-kills", "kill -9 after a partition's head state is restored"),
        ("snapshot-kills", "kill -9 while writing a snapshot"),
        ("commit-kills", "kill -9 between store write and commit"),
        ("idle-restarts", "SIGTERM, idle, restart"),
        ("corrupts", "corrupt snapshots"),
        ("pauses", "broker SIGSTOPs"),
        ("outages", "store outages"),
    ):
        parser.add_argument(f"--{kind}", type=int, default=1, help=f"{what} (default 1)")
    parser.add_argument("--fault-min-s", type=float, default=10.0, help="pause/outage min")
    parser.add_argument("--fault-max-s", type=float, default=30.0, help="pause/outage max")
    parser.add_argument("--idle-s", type=float, default=2.0, help="idle before an idle restart")
    parser.add_argument("--bad-inputs", type=int, default=200, help="hostile messages")
    parser.add_argument(
        "--oversized", type=int, default=2, help="more messages over 1,000,000 bytes (2)"
    )
    parser.add_argument("--ads", type=int, default=2_000, help="initial ads (default 2000)")
    parser.add_argument("--engagements", type=int, default=3_000, help="engagement events")
    parser.add_argument("--stream-ads", type=int, default=600, help="ad changes among them")
    parser.add_argument("--queries", type=int, default=300, help="distinct queries")
    parser.add_argument("--dim", type=int, default=384, help="embedding dimension (384)")
    parser.add_argument("--hours", type=float, default=6.0, help="event time spanned (6 h)")
    parser.add_argument("--late", type=float, default=0.1, help="fraction of late engagements")
    parser.add_argument("--seed", type=int, default=0)


def _topics(bootstrap: str) -> Topics:
    tag = uuid.uuid4().hex[:8]
    t = Topics(f"ads-{tag}", f"eng-{tag}", f"dlq-{tag}", f"head-state-{tag}")
    create_topics(bootstrap, [t.ads], partitions=2)
    create_topics(bootstrap, [t.engagements], partitions=ENG_PARTITIONS)
    create_topics(bootstrap, [t.dead_letters], partitions=1)
    return t


def _oversized(rng: np.random.Generator, feed: Feed, n: int) -> list[tuple[str, str, bytes | None]]:
    """`n` messages just over the real default limit, alternating topics, with a valid header."""
    one = AdBatch.upserts(np.array([1]), np.ones((1, feed.dim), dtype="float32"), 0)
    header = feed.ad_codec.encode(one)[0][:HEADER_SIZE]
    topics = (feed.topics.ads, feed.topics.engagements)
    return [
        (topics[i % 2], "oversized", header + rng.bytes(_MAX_MESSAGE_BYTES + 1 - len(header)))
        for i in range(n)
    ]


def status(port: int) -> dict[str, Any] | None:
    """The service's /status document, or None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as r:
            doc: dict[str, Any] = json.loads(r.read())
            return doc
    except OSError:
        return None


class Service:
    """The service child process across restarts (under crash points), with its logs."""

    def __init__(self, config: Path, tmp: Path, metrics_port: int) -> None:
        self.config, self.tmp, self.port = config, tmp, metrics_port
        self.kill_file = tmp / "kill-at"
        self.logs: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def spawn(self) -> None:
        self.logs.append(self.tmp / f"run-{len(self.logs)}.log")
        self.proc = spawn_service(self.config, self.logs[-1], self.kill_file)
        self.starts += 1

    def start(self) -> float:
        """Spawn and wait until every engagement partition is restored; seconds it took."""
        t0 = time.perf_counter()
        self.spawn()
        assert self.proc is not None
        wait_for_log(self.proc, self.logs[-1], RESTORED, ENG_PARTITIONS, HANG_GUARD_S)
        return time.perf_counter() - t0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: signal.Signals, guard_s: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return int(self.proc.wait(guard_s))

    def died_at_crash_point(self, point: str, guard_s: float) -> bool:
        """Wait (bounded) for the armed crash point to kill the process; disarm and SIGKILL it
        when the point was not reached in time. True when the point was reached."""
        assert self.proc is not None
        try:
            self.proc.wait(guard_s)
        except subprocess.TimeoutExpired:
            self.kill_file.unlink(missing_ok=True)
            self.stop(signal.SIGKILL)
            return False
        return REACHED.format(point) in self.logs[-1].read_text(errors="replace")


def caught_up(
    feed: Feed, bootstrap: str, topics: Topics, group: str, port: int, ads: int | None
) -> bool:
    """Every published engagement committed, nothing pending and (unless None) the index
    holding `ads` ads."""
    if committed_offsets(bootstrap, topics.engagements, group) != feed.engagement_ends:
        return False
    doc = status(port)
    if doc is None or doc["checkpoint"].get("waiting_for"):
        return False
    return ads is None or doc["index"].get("ads") == ads


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.fault_min_s > args.fault_max_s or args.fault_min_s < 0:
        raise ValueError("--fault-min-s must be between 0 and --fault-max-s")
    rng = np.random.default_rng(args.seed)
    base = workload(args.seed, args.engagements, args.stream_ads, args.ads, args.queries, args.dim)
    work = spread_times(base, args.hours, args.seed, args.late)
    oracle = exact_oracle(work.steps, args.dim)
    counts = {
        "kill": args.kills,
        "startup_kill": args.startup_kills,
        "restore_kill": args.restore_kills,
        "snapshot_kill": args.snapshot_kills,
        "commit_kill": args.commit_kills,
        "idle_restart": args.idle_restarts,
        "corrupt": args.corrupts,
        "pause": args.pauses,
        "outage": args.outages,
    }
    schedule = [k for k in FAULTS for _ in range(counts[k])]
    schedule = [schedule[i] for i in rng.permutation(len(schedule)).tolist()]
    training = np.random.default_rng([args.seed, 99]).standard_normal((1_000, args.dim))
    t_start = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="annstream-faults-") as tmpdir,
        EmbeddedBroker() as broker,
        AerospikeTestServer(namespaces=["test"]) as server,
    ):
        tmp = Path(tmpdir)
        bootstrap = broker.bootstrap_servers
        topics = _topics(bootstrap)
        training_file = tmp / "training.npy"
        np.save(training_file, training.astype("float32"))
        group = f"faults-{uuid.uuid4().hex[:8]}"
        url = f"aerospike://{server.url_host}/test/neighbours"
        port = free_port()
        settings = service_settings(
            bootstrap,
            topics,
            training_file,
            url,
            tmp / "snap",
            group,
            dim=args.dim,
            kafka={
                "client": {"session.timeout.ms": "3000", "heartbeat.interval.ms": "1000"},
                "max_message_bytes": _MAX_MESSAGE_BYTES,
            },
            index={"nprobe": NLIST},
            refresh={"nprobe": NLIST},
            store={"timeout_ms": 500},
            service={
                "log_level": "INFO",
                "shutdown_timeout_s": 20.0,
                "metrics_port": port,
                "recall_every_batches": 0,
            },
        )
        config = tmp / "annstream.toml"
        config.write_text(to_toml(settings))
        feed = Feed(bootstrap, topics, dim=args.dim)
        feed.producer = make_producer(
            KafkaConfig(bootstrap_servers=bootstrap, max_message_bytes=2 * _MAX_MESSAGE_BYTES)
        )
        bad = bad_inputs(rng, feed, args.bad_inputs, _MAX_MESSAGE_BYTES)
        bad += _oversized(rng, feed, args.oversized)
        first = next(i for i, b in enumerate(work.steps) if isinstance(b, EngagementBatch))
        for b in work.steps[:first]:
            feed.send(b)
        feed.flush()
        chunks = np.array_split(np.arange(first, len(work.steps)), len(schedule) + 1)
        bad_at = np.sort(rng.integers(first, len(work.steps), len(bad)))
        service = Service(config, tmp, port)
        service.start()
        faults: list[dict[str, Any]] = []
        sent_bad = 0
        qids = oracle.query_ids()

        def publish(rows: np.ndarray) -> None:
            nonlocal sent_bad
            for i in rows.tolist():
                while sent_bad < len(bad) and bad_at[sent_bad] == i:
                    topic, _, value = bad[sent_bad]
                    feed.raw(topic, [rng.bytes(8)], [value])
                    sent_bad += 1
                feed.send(work.steps[i])
            feed.flush()

        def settled(guard_s: float) -> bool:
            deadline = time.monotonic() + guard_s
            while time.monotonic() < deadline and service.alive():
                if caught_up(feed, bootstrap, topics, group, port, None):
                    return True
                time.sleep(0.2)
            return False

        try:
            for n, chunk in enumerate(chunks):
                kind = schedule[n] if n < len(schedule) else ""
                if kind in _ARMED:
                    if kind == "snapshot_kill":  # due at the chunk's first durable micro-batch
                        time.sleep(settings["snapshot"]["every_s"] + 0.2)
                    arm(service.kill_file, _ARMED[kind], int(rng.integers(1, 3)))
                half = len(chunk) // 2
                publish(chunk[:half])
                if not kind:
                    publish(chunk[half:])
                    break
                time.sleep(float(rng.uniform(0.0, 0.5)))
                publish(chunk[half:])
                time.sleep(float(rng.uniform(0.0, 0.4)))
                faults.append(_inject(kind, rng, args, broker, server, service, tmp, settled))
                oracle.observe_versions(read_store(url, qids))
            t_caught_up = time.perf_counter()
            report, index_ads, uncommitted = _settle(
                oracle, feed, bootstrap, topics, group, url, service, len(work.live)
            )
            catch_up_s = time.perf_counter() - t_caught_up
            code = service.stop(signal.SIGTERM) if service.alive() else -1
        finally:
            if service.alive():
                service.stop(signal.SIGKILL)
        snap = load_latest_snapshot(tmp / "snap", IndexConfig(dim=args.dim, nlist=NLIST))
        ids = set() if snap is None else set(snap.index.ids().tolist())
        letters = read_dead_letters(bootstrap, topics.dead_letters, len(bad), drain_s=1.0)
    live = set(work.live)
    ads_wrong = len(live - ids) + len(ids - live)
    # A dead letter of a message over the limit does not fit either: it is a reference.
    references = [d for d in letters if "max_message_bytes" in d["reason"]]
    values = {d["value"] for d in letters if d not in references}
    oversized = sum(k == "oversized" for _, k, _ in bad)
    bad_values = [v for _, k, v in bad if k != "oversized"]
    c = report.checks
    judged = c["list_exact"].checked
    return {
        "benchmark": "faults",
        "faults_injected": len(faults),
        "faults_survived": sum(f["survived"] for f in faults),
        "faults": faults,
        "restarts": service.starts - 1,
        "bad_inputs": len(bad),
        "oversized_inputs": oversized,
        "max_message_bytes": _MAX_MESSAGE_BYTES,
        "bad_inputs_dead_lettered": sum(v in values for v in bad_values)
        + min(oversized, len(references)),
        "dead_letters_without_reason": sum(not d["reason"].strip() for d in letters),
        "dead_letters": len(letters),
        "messages_lost": ads_wrong
        + uncommitted
        + c["head_missing"].failed
        + c["list_exact"].failed,
        "ads_wrong_in_index": ads_wrong,
        "engagements_uncommitted": uncommitted,
        "index_ads": index_ads,
        "live_ads": len(live),
        "oracle_match": (judged - c["list_exact"].failed) / judged if judged else 1.0,
        "checks": {n: {"checked": c[n].checked, "failed": c[n].failed} for n in CHECKS},
        "oracle": report.as_dict(),
        "event_hours": args.hours,
        "dim": args.dim,
        "exit_code": code,
        "events": sum(len(b) for b in work.steps),
        "catch_up_s": round(catch_up_s, 3),
        "total_s": round(time.perf_counter() - t_start, 3),
    }


def _inject(
    kind: str,
    rng: np.random.Generator,
    args: argparse.Namespace,
    broker: EmbeddedBroker,
    server: AerospikeTestServer,
    service: Service,
    tmp: Path,
    settled: Callable[[float], bool],
) -> dict[str, Any]:
    """Apply one fault and bring the service back where the fault needs it; say if it survived."""
    t0 = time.perf_counter()
    fault: dict[str, Any] = {"kind": kind}
    if kind in ("pause", "outage"):
        seconds = float(rng.uniform(args.fault_min_s, args.fault_max_s))
        fault["seconds"] = round(seconds, 2)
        if kind == "pause":
            broker.pause()
            try:
                time.sleep(seconds)
            finally:
                broker.resume()
        else:
            server.stop()
            try:
                time.sleep(seconds)
            finally:
                server.start()
        fault["survived"] = service.alive()
        if not service.alive():
            logger.warning("service died under %s:\n%s", kind, log_tail(service.logs[-1]))
            service.start()
        fault["s"] = round(time.perf_counter() - t0, 3)
        return fault
    if kind in _ARMED:
        fault["reached"] = service.died_at_crash_point(_ARMED[kind], guard_s=30.0)
        fault["exit"] = service.proc.returncode if service.proc else None
    elif kind == "kill":
        fault["exit"] = service.stop(signal.SIGKILL)
    elif kind == "startup_kill":
        service.stop(signal.SIGKILL)
        service.spawn()
        time.sleep(float(rng.uniform(0.2, 1.5)))
        fault["restored"] = service.logs[-1].read_text(errors="replace").count(RESTORED)
        fault["exit"] = service.stop(signal.SIGKILL)
    elif kind == "restore_kill":
        service.stop(signal.SIGKILL)
        arm(service.kill_file, "restore", int(rng.integers(1, ENG_PARTITIONS + 1)))
        service.spawn()
        fault["reached"] = service.died_at_crash_point("restore", guard_s=HANG_GUARD_S)
        fault["exit"] = service.proc.returncode if service.proc else None
    elif kind == "idle_restart":
        fault["caught_up"] = settled(_SETTLE_S)
        fault["exit"] = service.stop(signal.SIGTERM)
        time.sleep(args.idle_s)
    else:  # corrupt
        fault["exit"] = service.stop(signal.SIGTERM)
        snaps = list_snapshots(tmp / "snap")
        if snaps:
            data = bytearray(snaps[0].read_bytes())
            mid = len(data) // 2
            data[mid : mid + 64] = bytes(64)
            snaps[0].write_bytes(bytes(data))
        fault["corrupted"] = snaps[0].name if snaps else None
    try:
        fault["restart_s"] = round(service.start(), 3)
        fault["survived"] = True
    except AssertionError as exc:
        logger.warning("no restart after %s: %s", kind, exc)
        fault["survived"] = False
        service.start()
    fault["s"] = round(time.perf_counter() - t0, 3)
    return fault


def _settle(
    oracle: ExactOracle,
    feed: Feed,
    bootstrap: str,
    topics: Topics,
    group: str,
    url: str,
    service: Service,
    live_ads: int,
) -> tuple[OracleReport, int | None, int]:
    """Wait (bounded) until every engagement is committed, the index holds every live ad and
    nothing is pending, then until the lists equal the oracle's (or the guard passes)."""
    deadline = time.monotonic() + HANG_GUARD_S
    while service.alive() and time.monotonic() < deadline:
        if caught_up(feed, bootstrap, topics, group, service.port, live_ads):
            break
        time.sleep(0.3)
    doc = status(service.port)
    index_ads = None if doc is None else int(doc["index"].get("ads", -1))
    stable = time.monotonic() + _SETTLE_S
    while True:
        report = judge(url, oracle, index_ads)
        if report.ok(("head_missing", "list_exact", "score_stale", "deleted_ad_live")):
            break
        if time.monotonic() > min(stable, deadline) or not service.alive():
            break
        time.sleep(0.5)
        doc = status(service.port)
        index_ads = None if doc is None else int(doc["index"].get("ads", -1))
    committed = committed_offsets(bootstrap, topics.engagements, group)
    ends = feed.engagement_ends
    uncommitted = sum(max(0, o - committed.get(p, 0)) for p, o in ends.items())
    return report, index_ads, uncommitted
