"""`annstream bench faults`: `annstream run` under a random schedule of faults, then the store
against the oracle of bench/harness.py.

One run: an embedded broker and an Aerospike test server of its own, the seeded workload of the
service tests (initial ads, then engagements interleaved with new, updated and deleted ads) with
`--bad-inputs` hostile messages mixed into both topics, and the service as a child process.
The events after the initial ads are published in one chunk per fault; after each chunk one
fault from a shuffled schedule hits the service while it works:
- kill: SIGKILL, then a restart;
- corrupt: SIGTERM, the newest snapshot overwritten in its middle, then a restart (it must fall
  back to an older snapshot or to replaying the topic);
- pause: the broker SIGSTOPped for a random `--fault-min-s`..`--fault-max-s`, then SIGCONT;
- outage: the store server stopped for as long, then started again on the same port.
A fault is survived when the service is alive (or restarted) and restores its partitions again.

`messages_lost` = ads whose final state is wrong in the index of the final snapshot (expected
live ads missing plus deleted ads present) + engagement events never committed (published end
offset minus committed offset, per partition; offsets are committed only after the results are
stored) + expected head queries missing from the store or holding a top K other than the
oracle's. 0 is the only acceptable value. `oracle_match` is the fraction of head queries whose
stored top K equals the oracle's (ties at the K-th place allowed).
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from annstream.broker import EmbeddedBroker, create_topics
from annstream.config import KafkaConfig
from annstream.events import EngagementBatch
from annstream.kafka import make_producer
from annstream.snapshot import list_snapshots, load_latest_snapshot
from annstream.store import open_store
from annstream.testing.aerospike_server import AerospikeTestServer
from annstream.testing.harness import (
    DIM,
    ENG_PARTITIONS,
    HANG_GUARD_S,
    ICFG,
    RESTORED,
    Feed,
    Topics,
    bad_inputs,
    build_oracle,
    committed_offsets,
    log_tail,
    oracle_agreement,
    read_dead_letters,
    service_settings,
    spawn_service,
    to_toml,
    wait_for_log,
    workload,
)

__all__ = ["HELP", "add_arguments", "run"]

logger = logging.getLogger(__name__)

HELP = "annstream run under kills, broker pauses, store outages, corrupt snapshots, bad input"

FAULTS = ("kill", "corrupt", "pause", "outage")
_MAX_MESSAGE_BYTES = KafkaConfig().max_message_bytes
"""The real default limit; the feed's producer may write larger messages, as a broker allows."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kills", type=int, default=5, help="kill -9 points (default 5)")
    parser.add_argument("--corrupts", type=int, default=1, help="corrupt snapshots (default 1)")
    parser.add_argument("--pauses", type=int, default=1, help="broker SIGSTOPs (default 1)")
    parser.add_argument("--outages", type=int, default=1, help="store outages (default 1)")
    parser.add_argument("--fault-min-s", type=float, default=10.0, help="pause/outage min")
    parser.add_argument("--fault-max-s", type=float, default=30.0, help="pause/outage max")
    parser.add_argument("--bad-inputs", type=int, default=200, help="hostile messages")
    parser.add_argument("--ads", type=int, default=2_000, help="initial ads (default 2000)")
    parser.add_argument("--engagements", type=int, default=3_000, help="engagement events")
    parser.add_argument("--stream-ads", type=int, default=600, help="ad changes among them")
    parser.add_argument("--queries", type=int, default=300, help="distinct queries")
    parser.add_argument("--seed", type=int, default=0)


def _topics(bootstrap: str) -> Topics:
    tag = uuid.uuid4().hex[:8]
    t = Topics(f"ads-{tag}", f"eng-{tag}", f"dlq-{tag}", f"head-state-{tag}")
    create_topics(bootstrap, [t.ads], partitions=2)
    create_topics(bootstrap, [t.engagements], partitions=ENG_PARTITIONS)
    create_topics(bootstrap, [t.dead_letters], partitions=1)
    return t


class _Run:
    """The service child process across restarts, with its logs."""

    def __init__(self, config: Path, tmp: Path) -> None:
        self.config, self.tmp = config, tmp
        self.logs: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.logs.append(self.tmp / f"run-{len(self.logs)}.log")
        self.proc = spawn_service(self.config, self.logs[-1])
        wait_for_log(self.proc, self.logs[-1], RESTORED, ENG_PARTITIONS, HANG_GUARD_S)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: signal.Signals) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return int(self.proc.wait(60))


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.fault_min_s > args.fault_max_s or args.fault_min_s < 0:
        raise ValueError("--fault-min-s must be between 0 and --fault-max-s")
    rng = np.random.default_rng(args.seed)
    work = workload(args.seed, args.engagements, args.stream_ads, args.ads, args.queries)
    schedule = ["kill"] * args.kills + ["corrupt"] * args.corrupts
    schedule += ["pause"] * args.pauses + ["outage"] * args.outages
    schedule = [schedule[i] for i in rng.permutation(len(schedule)).tolist()]
    training = np.random.default_rng([args.seed, 99]).standard_normal((1_000, DIM))
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
        settings = service_settings(
            bootstrap,
            topics,
            training_file,
            url,
            tmp / "snap",
            group,
            kafka={
                "client": {"session.timeout.ms": "6000"},
                "max_message_bytes": _MAX_MESSAGE_BYTES,
            },
            store={"timeout_ms": 500},
            service={"log_level": "INFO", "shutdown_timeout_s": 20.0},
        )
        config = tmp / "annstream.toml"
        config.write_text(to_toml(settings))
        feed = Feed(bootstrap, topics)
        feed.producer = make_producer(
            KafkaConfig(bootstrap_servers=bootstrap, max_message_bytes=2 * _MAX_MESSAGE_BYTES)
        )
        bad = bad_inputs(rng, feed, args.bad_inputs, _MAX_MESSAGE_BYTES)
        first = next(i for i, b in enumerate(work.steps) if isinstance(b, EngagementBatch))
        for b in work.steps[:first]:
            feed.send(b)
        feed.flush()
        chunks = np.array_split(np.arange(first, len(work.steps)), len(schedule) + 1)
        bad_at = np.sort(rng.integers(first, len(work.steps), len(bad)))
        service = _Run(config, tmp)
        service.start()
        faults: list[dict[str, Any]] = []
        sent_bad = 0

        def publish(rows: np.ndarray) -> None:
            nonlocal sent_bad
            for i in rows.tolist():
                while sent_bad < len(bad) and bad_at[sent_bad] == i:
                    topic, _, value = bad[sent_bad]
                    feed.raw(topic, [rng.bytes(8)], [value])
                    sent_bad += 1
                feed.send(work.steps[i])
            feed.flush()

        try:
            for n, chunk in enumerate(chunks):
                half = len(chunk) // 2
                publish(chunk[:half])
                if n == len(schedule):
                    publish(chunk[half:])
                    break
                time.sleep(float(rng.uniform(0.0, 0.5)))
                publish(chunk[half:])
                time.sleep(float(rng.uniform(0.0, 0.4)))
                faults.append(_inject(schedule[n], rng, args, broker, server, service, tmp))
            t_caught_up = time.perf_counter()
            result = _settle(work, training, feed, bootstrap, topics, group, url, service)
            catch_up_s = time.perf_counter() - t_caught_up
            code = service.stop(signal.SIGTERM) if service.alive() else -1
        finally:
            if service.alive():
                service.stop(signal.SIGKILL)
        snap = load_latest_snapshot(tmp / "snap", ICFG)
        ids = set() if snap is None else set(snap.index.ids().tolist())
        letters = read_dead_letters(bootstrap, topics.dead_letters, len(bad), drain_s=1.0)
    live = set(work.live)
    ads_wrong = len(live - ids) + len(ids - live)
    # A dead letter of a message over the limit does not fit either: it is a reference.
    references = [d for d in letters if "max_message_bytes" in d["reason"]]
    values = {d["value"] for d in letters if d not in references}
    oversized = sum(k == "oversized" for _, k, _ in bad)
    bad_values = [v for _, k, v in bad if k != "oversized"]
    return {
        "benchmark": "faults",
        "faults_injected": len(faults),
        "faults_survived": sum(f["survived"] for f in faults),
        "faults": faults,
        "bad_inputs": len(bad),
        "bad_inputs_dead_lettered": sum(v in values for v in bad_values)
        + min(oversized, len(references)),
        "dead_letters_without_reason": sum(not d["reason"].strip() for d in letters),
        "dead_letters": len(letters),
        "messages_lost": ads_wrong
        + result["engagements_uncommitted"]
        + result["missing"]
        + result["wrong"],
        "ads_wrong_in_index": ads_wrong,
        **result,
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
    service: _Run,
    tmp: Path,
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
    else:
        if kind == "kill":
            fault["exit"] = service.stop(signal.SIGKILL)
        else:
            fault["exit"] = service.stop(signal.SIGTERM)
            snaps = list_snapshots(tmp / "snap")
            if snaps:
                data = bytearray(snaps[0].read_bytes())
                mid = len(data) // 2
                data[mid : mid + 64] = bytes(64)
                snaps[0].write_bytes(bytes(data))
            fault["corrupted"] = snaps[0].name if snaps else None
        try:
            service.start()
            fault["survived"] = True
        except AssertionError as exc:
            logger.warning("no restart after %s: %s", kind, exc)
            fault["survived"] = False
            service.start()
    fault["s"] = round(time.perf_counter() - t0, 3)
    return fault


def _settle(
    work: Any,
    training: np.ndarray,
    feed: Feed,
    bootstrap: str,
    topics: Topics,
    group: str,
    url: str,
    service: _Run,
) -> dict[str, Any]:
    """Wait (bounded) until every engagement is committed and the store equals the oracle."""
    oracle = build_oracle(training.astype("float32"), work.live)
    store = open_store(url)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while True:
            committed = committed_offsets(bootstrap, topics.engagements, group)
            ends = feed.engagement_ends
            agreement = oracle_agreement(store, work, oracle)
            done = committed == ends and agreement["oracle_match"] == 1.0
            if done or time.monotonic() > deadline or not service.alive():
                break
            time.sleep(0.5)
    finally:
        store.close()
    uncommitted = sum(max(0, o - committed.get(p, 0)) for p, o in ends.items())
    return {**agreement, "engagements_uncommitted": uncommitted}
