"""The service under test: a seeded workload, oracles built independently of the service, a
feed through the real broker and a launcher of `annstream run` as a child process.

Shared by the service and fault tests and by `annstream bench faults` / `bench soak` (the
benchmarks cannot import tests/). `workload()` stamps every event with one constant time, so
decay never matters and the head set is exactly the queries whose engagement weights sum to
`ENTER`; its quick oracle (`build_oracle`, `problems`) is the index trained from the same
training file holding the expected final ads, searched with the refresher's nprobe.
`spread_times()` spreads a workload's event times over hours (decay, late events, queries
that must leave the head set); runs judged by the exact oracle (`exact_oracle`, `judge`:
annstream/testing/oracle.py) search with nprobe = nlist so the service is exact too.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from annstream.codec import AdCodec, EngagementCodec
from annstream.config import Config, HeadsConfig, IndexConfig, KafkaConfig, load_config
from annstream.events import AdBatch, EngagementBatch
from annstream.index import LiveIvfIndex
from annstream.kafka import headers_dict, make_consumer, make_producer
from annstream.schemas import HEADER_SIZE, frame, open_registry
from annstream.store.base import NeighbourStore
from annstream.testing.oracle import ExactOracle, HeadRules, OracleReport, read_store
from producers.publish import id_keys
from producers.sources import synthetic_ads, synthetic_engagements

__all__ = [
    "DIM",
    "ENG_PARTITIONS",
    "ENTER",
    "EXIT",
    "HANG_GUARD_S",
    "ICFG",
    "K",
    "MARGIN",
    "NLIST",
    "NPROBE",
    "N_ADS",
    "N_QUERIES",
    "QUERY_BASE",
    "RESTORED",
    "T0",
    "TIE",
    "Feed",
    "Topics",
    "Workload",
    "bad_inputs",
    "build_oracle",
    "committed_offsets",
    "exact_oracle",
    "judge",
    "read_dead_letters",
    "log_tail",
    "oracle_agreement",
    "problems",
    "service_settings",
    "spawn_service",
    "spread_times",
    "sqlite_query_ids",
    "step_until",
    "to_config",
    "to_toml",
    "wait_for_log",
    "wait_until",
    "workload",
]

DIM = 16
NLIST = 16
NPROBE = 4
K = 10
MARGIN = 5
ENTER, EXIT = 4.0, 2.0
T0 = 1_700_000_000_000
N_ADS = 2_000
N_QUERIES = 300
QUERY_BASE = 1_000_000_000
ENG_PARTITIONS = 4
TIE = 1e-5
HANG_GUARD_S = 120.0
ICFG = IndexConfig(dim=DIM, metric="cosine", nlist=NLIST, nprobe=NPROBE)
RESTORED = "head-state chunks of partition"
"""Logged once per engagement partition restored: from then on the service consumes events."""


def _constant_clock() -> int:
    return T0


# ---- the workload --------------------------------------------------------------------------


@dataclass
class Workload:
    """Event batches in publish order and what must hold once all of them are consumed."""

    steps: list[AdBatch | EngagementBatch]
    live: dict[int, np.ndarray]
    heads: np.ndarray
    query_vectors: dict[int, np.ndarray]
    scores: dict[int, float] = field(default_factory=dict)


def workload(
    seed: int,
    engagements: int = 3_000,
    stream_ads: int = 600,
    ads: int = N_ADS,
    queries: int = N_QUERIES,
    dim: int = DIM,
) -> Workload:
    """`ads` initial ads, then engagements interleaved with new, updated and deleted ads."""
    rng = np.random.default_rng([seed, 9])
    initial = list(synthetic_ads(ads, seed=seed, dim=dim, batch_size=250, clock=_constant_clock))
    eng = list(
        synthetic_engagements(
            engagements,
            queries=queries,
            seed=seed,
            dim=dim,
            batch_size=150,
            query_id_start=QUERY_BASE,
            ads=ads,
            clock=_constant_clock,
        )
    )
    changes: list[AdBatch] = []
    next_id = ads + 1
    per = max(1, stream_ads // len(eng))
    for _ in eng:
        new = np.arange(next_id, next_id + per)
        next_id += per
        updated = rng.integers(1, next_id, per)
        deleted = rng.integers(1, next_id, max(1, per // 2))
        ids = np.concatenate([new, updated])
        vectors = rng.standard_normal((len(ids), dim), dtype="float32")
        changes.append(AdBatch.upserts(ids, vectors, T0))
        changes.append(AdBatch.deletes(deleted, dim, T0))
    steps: list[AdBatch | EngagementBatch] = list(initial)
    for i, e in enumerate(eng):
        steps += [e, changes[2 * i], changes[2 * i + 1]]

    live: dict[int, np.ndarray] = {}
    for b in steps:
        if isinstance(b, AdBatch):
            for ad, op, v in zip(b.ad_ids.tolist(), b.ops.tolist(), b.vectors, strict=True):
                if op == 0:
                    live[ad] = v
                else:
                    live.pop(ad, None)
    scores: dict[int, float] = {}
    query_vectors: dict[int, np.ndarray] = {}
    for b in steps:
        if isinstance(b, EngagementBatch):
            for q, w, v in zip(b.query_ids.tolist(), b.weights.tolist(), b.vectors, strict=True):
                scores[q] = scores.get(q, 0.0) + w
                query_vectors[q] = v
    heads = np.array(sorted(q for q, s in scores.items() if s >= ENTER), dtype="int64")
    return Workload(steps, live, heads, query_vectors, scores)


def spread_times(
    work: Workload, hours: float, seed: int, late_fraction: float = 0.1, late_s: float = 3600.0
) -> Workload:
    """The same events with event times rising over `hours` from T0 in publish order; a
    `late_fraction` of engagements arrive up to `late_s` late (an earlier event time). The
    head set then depends on decay: `heads` and `scores` are left to the exact oracle."""
    rng = np.random.default_rng([seed, 17])
    span_ms = hours * 3_600_000.0
    n = len(work.steps)
    steps: list[AdBatch | EngagementBatch] = []
    for i, b in enumerate(work.steps):
        at = T0 + int(span_ms * i / max(1, n - 1))
        times = np.full(len(b), at, dtype=np.int64)
        if isinstance(b, EngagementBatch):
            late = rng.random(len(b)) < late_fraction
            times[late] -= (rng.random(int(late.sum())) * late_s * 1000.0).astype(np.int64)
            steps.append(replace(b, event_time_ms=np.maximum(times, T0)))
        else:
            steps.append(replace(b, event_time_ms=times))
    return Workload(steps, work.live, np.empty(0, np.int64), work.query_vectors, {})


def exact_oracle(
    steps: list[AdBatch | EngagementBatch],
    dim: int = DIM,
    k: int = K,
    margin: int = MARGIN,
    half_life_s: float = HeadsConfig.half_life_s,
) -> ExactOracle:
    """The exact oracle of annstream/testing/oracle.py fed with `steps` (the harness's heads)."""
    oracle = ExactOracle(HeadRules(k, margin, ENTER, EXIT, half_life_s, "cosine"), dim)
    for b in steps:
        oracle.add_batch(b)
    return oracle


def judge(url: str, oracle: ExactOracle, index_ads: int | None = None) -> OracleReport:
    """Every check of the exact oracle against the store at `url` now."""
    return oracle.judge(read_store(url, oracle.query_ids()), index_ads)


# ---- the oracle ------------------------------------------------------------------------------


def build_oracle(training: np.ndarray, live: dict[int, np.ndarray]) -> LiveIvfIndex:
    index = LiveIvfIndex.train(dataclasses.replace(ICFG, dim=training.shape[1]), training)
    ids = np.array(sorted(live), dtype="int64")
    index.upsert(ids, np.stack([live[i] for i in ids.tolist()]))
    return index


def problems(store: NeighbourStore, work: Workload, oracle: LiveIvfIndex) -> list[str]:
    """How the store differs from the oracle's top K of every head query (empty: it does not).

    Ids must match exactly; they may differ only where the oracle has an exact score tie at the
    K-th place, and scores must match up to float rounding.
    """
    return _differences(store, work, oracle)[:5]


def _differences(store: NeighbourStore, work: Workload, oracle: LiveIvfIndex) -> list[str]:
    qids = work.heads
    got = store.lookup(qids)
    out = [f"head query {q} not stored" for q in got.missing[:5].tolist()]
    if out:
        return out
    vecs = np.stack([work.query_vectors[q] for q in qids.tolist()])
    want_s, want_i = oracle.search(vecs, K + 1, nprobe=NPROBE)
    got_i, got_s = got.ids[:, :K], got.scores[:, :K]
    for row in np.flatnonzero(np.any(got_i != want_i[:, :K], axis=1)).tolist():
        extra = set(got_i[row].tolist()) - set(want_i[row, :K].tolist())
        tie = abs(float(want_s[row, K]) - float(want_s[row, K - 1])) <= TIE
        close = np.allclose(got_s[row], want_s[row, :K], atol=TIE)
        if not close or (extra and not tie):
            out.append(
                f"query {qids[row]}: stored {got_i[row].tolist()} {got_s[row].round(5).tolist()}"
                f", oracle {want_i[row, :K].tolist()} {want_s[row, :K].round(5).tolist()}"
            )
    return out


def oracle_agreement(store: NeighbourStore, work: Workload, oracle: LiveIvfIndex) -> dict[str, Any]:
    """The store against the oracle over every expected head query: how many are missing,
    how many hold a top K other than the oracle's (ties at the K-th place allowed), and the
    fraction that match."""
    got = store.lookup(work.heads)
    missing = len(got.missing)
    wrong = 0 if missing else len(_differences(store, work, oracle))
    n = len(work.heads)
    return {
        "head_queries": n,
        "missing": missing,
        "wrong": wrong,
        "oracle_match": (n - missing - wrong) / n if n else 1.0,
    }


def sqlite_query_ids(path: Path) -> set[int]:
    with sqlite3.connect(path) as db:
        return {int(r[0]) for r in db.execute("SELECT query_id FROM neighbour_lists")}


# ---- topics, config, feeding -----------------------------------------------------------------


@dataclass
class Topics:
    ads: str
    engagements: str
    dead_letters: str
    head_state: str


def service_settings(
    bootstrap: str,
    topics: Topics,
    training_file: Path,
    store_url: str,
    snapshot_dir: Path,
    group: str,
    dim: int = DIM,
    **sections: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """The service's settings for the workload; `sections` override some of them."""
    out: dict[str, dict[str, Any]] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "ad_topic": topics.ads,
            "engagement_topic": topics.engagements,
            "dead_letter_topic": topics.dead_letters,
            "head_state_topic": topics.head_state,
            "group_id": group,
            "create_topics": True,
        },
        "index": {
            "dim": dim,
            "nlist": NLIST,
            "nprobe": NPROBE,
            "train_size": 1_000,
            "training_file": str(training_file),
        },
        "refresh": {"k": K, "margin": MARGIN, "nprobe": NPROBE, "batch_ms": 100},
        "heads": {"enter_score": ENTER, "exit_score": EXIT},
        "store": {"url": store_url, "retries": 1, "retry_backoff_s": 0.05},
        "snapshot": {"dir": str(snapshot_dir), "every_events": 1_500, "every_s": 2.0},
        "drift": {"enabled": False},
        "service": {"shutdown_timeout_s": 20.0},
    }
    for name, values in sections.items():
        out[name] = {**out.get(name, {}), **values}
    return out


def to_config(settings: dict[str, dict[str, Any]]) -> Config:
    return load_config(env={}, overrides=settings)


def to_toml(settings: dict[str, dict[str, Any]]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = []
    for section, values in settings.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in values.items() if not isinstance(v, dict)]
        for k, v in values.items():
            if isinstance(v, dict):
                lines.append(f"[{section}.{k}]")
                lines += [f'"{kk}" = {value(vv)}' for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


@dataclass
class Feed:
    """Publishes event batches keyed like the producers do and records where every partition
    ends (from delivery reports: the broker's end offsets are not trusted)."""

    bootstrap: str
    topics: Topics
    ends: dict[str, dict[int, int]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    messages: dict[str, int] = field(default_factory=dict)
    dim: int = DIM

    def __post_init__(self) -> None:
        self.producer = make_producer(KafkaConfig(bootstrap_servers=self.bootstrap))
        registry = open_registry()
        self.ad_codec = AdCodec(registry, self.dim)
        self.eng_codec = EngagementCodec(registry, self.dim)

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.errors.append(str(err))
            return
        ends = self.ends.setdefault(str(msg.topic()), {})
        p, o = int(msg.partition() or 0), int(msg.offset() or 0)
        ends[p] = max(ends.get(p, 0), o + 1)

    def raw(self, topic: str, keys: list[bytes], values: list[bytes | None]) -> None:
        for key, value in zip(keys, values, strict=True):
            self.producer.produce(topic, value=value, key=key, on_delivery=self._delivered)
            self.producer.poll(0)
        self.messages[topic] = self.messages.get(topic, 0) + len(values)

    def send(self, batch: AdBatch | EngagementBatch) -> None:
        if isinstance(batch, AdBatch):
            self.raw(self.topics.ads, id_keys(batch.ad_ids), list(self.ad_codec.encode(batch)))
        else:
            keys = id_keys(batch.query_ids)
            self.raw(self.topics.engagements, keys, list(self.eng_codec.encode(batch)))

    def flush(self, timeout_s: float = 30.0) -> None:
        if self.producer.flush(timeout_s) != 0:
            raise AssertionError(f"events not delivered within {timeout_s:.0f} s")
        if self.errors:
            raise AssertionError(f"delivery failed: {self.errors[:3]}")

    def bad_messages(self) -> int:
        """One undecodable message on each topic: both must be dead-lettered, not stop us."""
        self.raw(self.topics.ads, [b"\x00" * 8], [b"not avro at all"])
        self.raw(self.topics.engagements, [b"\x00" * 8], [b"\x00\x00\x00\x00\x01garbage"])
        return 2

    @property
    def engagement_ends(self) -> dict[int, int]:
        return dict(self.ends.get(self.topics.engagements, {}))


BAD_KINDS = ("null", "short", "magic", "schema", "truncated", "dim", "nan", "weight", "oversized")


def bad_inputs(
    rng: np.random.Generator, feed: Feed, n: int, max_message_bytes: int
) -> list[tuple[str, str, bytes | None]]:
    """`n` messages (topic, kind, value) that no decoder may accept, half per topic: null,
    shorter than the header, bad magic byte, unknown schema id, truncated, wrong dimension,
    NaN embedding, negative weight, over `max_message_bytes`."""
    out: list[tuple[str, str, bytes | None]] = []
    dim = feed.dim
    wide_ad = AdCodec(feed.ad_codec.registry, dim + 1)
    wide_eng = EngagementCodec(feed.eng_codec.registry, dim + 1)
    for i in range(n):
        ads = i % 2 == 0
        topic = feed.topics.ads if ads else feed.topics.engagements
        kind = BAD_KINDS[int(rng.integers(len(BAD_KINDS)))]
        vec = rng.standard_normal((1, dim)).astype("float32")
        one = np.array([int(rng.integers(1, 2**40))])
        eng = EngagementBatch(
            one, one, np.zeros(1, "uint8"), np.ones(1, "float32"), one, vec, np.ones(1, bool)
        )
        valid = (
            feed.ad_codec.encode(AdBatch.upserts(one, vec, T0))
            if ads
            else feed.eng_codec.encode(eng)
        )[0]
        value: bytes | None
        if kind == "null":
            value = None
        elif kind == "short":
            value = rng.bytes(int(rng.integers(0, HEADER_SIZE + 1)))
        elif kind == "magic":
            value = bytes([int(rng.integers(1, 256))]) + rng.bytes(int(rng.integers(5, 80)))
        elif kind == "schema":
            value = frame(int(rng.integers(1_000, 2**31)), rng.bytes(int(rng.integers(1, 80))))
        elif kind == "truncated":
            value = valid[: int(rng.integers(0, len(valid)))]
        elif kind == "dim":
            wide = rng.standard_normal((1, dim + 1)).astype("float32")
            value = (
                wide_ad.encode(AdBatch.upserts(one, wide, T0))
                if ads
                else wide_eng.encode(
                    EngagementBatch(
                        one,
                        one,
                        np.zeros(1, "uint8"),
                        np.ones(1, "float32"),
                        one,
                        wide,
                        np.ones(1, bool),
                    )
                )
            )[0]
        elif kind == "nan":
            vec[0, int(rng.integers(dim))] = np.nan
            eng.vectors[:] = vec
            value = (
                feed.ad_codec.encode(AdBatch.upserts(one, vec, T0))
                if ads
                else feed.eng_codec.encode(eng)
            )[0]
        elif kind == "weight" and not ads:
            eng.weights[0] = -1.0
            value = feed.eng_codec.encode(eng)[0]
        else:
            kind = "oversized"
            value = valid[:HEADER_SIZE] + rng.bytes(max_message_bytes + 1 - HEADER_SIZE)
        out.append((topic, kind, value))
    return out


def read_dead_letters(
    bootstrap: str, topic: str, n: int, guard_s: float = 60.0, drain_s: float = 0.0
) -> list[dict[str, Any]]:
    """The first `n` messages of the dead-letter topic (then any more arriving within `drain_s`
    of each other): value, reason and source of each."""
    consumer: Consumer = make_consumer(
        KafkaConfig(bootstrap_servers=bootstrap), group_id=f"dlq-reader-{os.getpid()}-{time.time()}"
    )
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + guard_s
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        while len(out) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(out)} of {n} dead letters in {guard_s:.0f} s")
            for m in consumer.consume(n - len(out), 0.2):
                if m.error() is not None:
                    continue
                headers = headers_dict(m)
                out.append(
                    {
                        "value": m.value(),
                        "reason": headers.get("annstream.reason", b"").decode(),
                        "source": headers.get("annstream.source", b"").decode(),
                    }
                )
        while drain_s > 0:
            more = [m for m in consumer.consume(1000, drain_s) if m.error() is None]
            if not more:
                break
            for m in more:
                headers = headers_dict(m)
                out.append(
                    {
                        "value": m.value(),
                        "reason": headers.get("annstream.reason", b"").decode(),
                        "source": headers.get("annstream.source", b"").decode(),
                    }
                )
    finally:
        consumer.close()
    return out


def committed_offsets(bootstrap: str, topic: str, group: str) -> dict[int, int]:
    """The group's committed offsets, read by a consumer that never joins the group."""
    probe: Consumer = make_consumer(KafkaConfig(bootstrap_servers=bootstrap), group_id=group)
    try:
        tps = probe.committed([TopicPartition(topic, p) for p in range(ENG_PARTITIONS)], 10)
        return {tp.partition: tp.offset for tp in tps if tp.offset >= 0}
    finally:
        probe.close()


def step_until(
    services: list[Any], done: Callable[[], bool], what: str, guard_s: float = 90.0
) -> None:
    """Step in-process services until `done()`; AssertionError naming `what` after `guard_s`."""
    deadline = time.monotonic() + guard_s
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {guard_s:.0f} s: {what}")
        for s in services:
            s.step()


# ---- the service as a child process ----------------------------------------------------------

_RUN = "import sys; from annstream.cli import main; sys.exit(main(sys.argv[1:]))"


def spawn_service(
    config: Path, log: Path, kill_file: Path | None = None
) -> subprocess.Popen[bytes]:
    """`annstream run --config FILE` in a child process, its output in `log`; with
    `kill_file`, under the crash points of annstream/testing/crash_points.py."""
    launcher = ["-c", _RUN]
    if kill_file is not None:
        launcher = ["-m", "annstream.testing.crash_points", "--kill-file", str(kill_file)]
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, *launcher, "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=config.parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def wait_for_log(
    proc: subprocess.Popen[bytes], log: Path, text: str, count: int, guard_s: float
) -> None:
    """Until `text` appears `count` times in `log` (the service logs progress, we read it)."""
    deadline = time.monotonic() + guard_s
    while log.read_text(errors="replace").count(text) < count:
        if proc.poll() is not None:
            raise AssertionError(f"service exited with {proc.returncode}:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {count} x {text!r} within {guard_s:.0f} s:\n{log_tail(log)}")
        time.sleep(0.1)


def log_tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def wait_until(done: Callable[[], bool], what: str, guard_s: float = HANG_GUARD_S) -> None:
    deadline = time.monotonic() + guard_s
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {guard_s:.0f} s: {what}")
        time.sleep(0.5)
