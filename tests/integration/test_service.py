"""The refresher service against the real broker: end to end, crash recovery, two replicas and
store backpressure.

Every check is differential against an oracle built independently of the service: the index
trained from the same training file holding the expected final ads, searched with the
refresher's nprobe for the vectors of the expected head queries. Event times are one constant,
so decay never matters and the head set is exactly the queries whose engagement weights sum to
`enter_score`, whatever the micro-batch boundaries, crashes and rebalances were.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aerospike
import numpy as np
import pytest
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from annstream.codec import AdCodec, EngagementCodec
from annstream.config import Config, IndexConfig, KafkaConfig, load_config
from annstream.events import AdBatch, EngagementBatch
from annstream.index import LiveIvfIndex
from annstream.kafka import DeadLetterPublisher, make_consumer, make_producer
from annstream.schemas import open_registry
from annstream.snapshot import load_latest_snapshot
from annstream.store import open_store
from annstream.store.base import NeighbourStore
from annstream.testing.aerospike_server import AerospikeTestServer, Fault
from consumers.engagements import EngagementStream
from consumers.service import RefresherService
from producers.publish import id_keys
from producers.sources import synthetic_ads, synthetic_engagements

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


def _workload(seed: int, engagements: int = 3_000, stream_ads: int = 600) -> Workload:
    """N_ADS initial ads, then engagements interleaved with new, updated and deleted ads."""
    rng = np.random.default_rng([seed, 9])
    initial = list(synthetic_ads(N_ADS, seed=seed, dim=DIM, batch_size=250, clock=_constant_clock))
    eng = list(
        synthetic_engagements(
            engagements,
            queries=N_QUERIES,
            seed=seed,
            dim=DIM,
            batch_size=150,
            query_id_start=QUERY_BASE,
            ads=N_ADS,
            clock=_constant_clock,
        )
    )
    changes: list[AdBatch] = []
    next_id = N_ADS + 1
    per = max(1, stream_ads // len(eng))
    for _ in eng:
        new = np.arange(next_id, next_id + per)
        next_id += per
        updated = rng.integers(1, next_id, per)
        deleted = rng.integers(1, next_id, max(1, per // 2))
        ids = np.concatenate([new, updated])
        vectors = rng.standard_normal((len(ids), DIM), dtype="float32")
        changes.append(AdBatch.upserts(ids, vectors, T0))
        changes.append(AdBatch.deletes(deleted, DIM, T0))
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
    return Workload(steps, live, heads, query_vectors)


def test_workload_has_ad_changes_and_many_heads() -> None:
    from annstream.events import OP_DELETE

    w = _workload(1)
    deletes = sum(int((b.ops == OP_DELETE).sum()) for b in w.steps if isinstance(b, AdBatch))
    assert deletes > 100 and len(w.live) > N_ADS
    assert 50 <= len(w.heads) < N_QUERIES


# ---- the oracle ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def training() -> np.ndarray:
    return np.random.default_rng(99).standard_normal((1_000, DIM)).astype("float32")


def _oracle(training: np.ndarray, live: dict[int, np.ndarray]) -> LiveIvfIndex:
    index = LiveIvfIndex.train(ICFG, training)
    ids = np.array(sorted(live), dtype="int64")
    index.upsert(ids, np.stack([live[i] for i in ids.tolist()]))
    return index


def _problems(store: NeighbourStore, work: Workload, oracle: LiveIvfIndex) -> list[str]:
    """How the store differs from the oracle's top K of every head query (empty: it does not).

    Ids must match exactly; they may differ only where the oracle has an exact score tie at the
    K-th place, and scores must match up to float rounding.
    """
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
    return out[:5]


def _sqlite_query_ids(path: Path) -> set[int]:
    with sqlite3.connect(path) as db:
        return {int(r[0]) for r in db.execute("SELECT query_id FROM neighbour_lists")}


# ---- topics, config, feeding -----------------------------------------------------------------


@dataclass
class Topics:
    ads: str
    engagements: str
    dead_letters: str
    head_state: str


@pytest.fixture
def topics(topic_factory: Callable[..., str]) -> Topics:
    return Topics(
        ads=topic_factory("ads", 2),
        engagements=topic_factory("eng", ENG_PARTITIONS),
        dead_letters=topic_factory("dlq"),
        head_state=f"head-state-{uuid.uuid4().hex[:12]}",
    )


@pytest.fixture
def training_file(tmp_path: Path, training: np.ndarray) -> Path:
    path = tmp_path / "training.npy"
    np.save(path, training)
    return path


def _settings(
    bootstrap: str,
    topics: Topics,
    training_file: Path,
    store_url: str,
    snapshot_dir: Path,
    group: str,
    **sections: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "ad_topic": topics.ads,
            "engagement_topic": topics.engagements,
            "dead_letter_topic": topics.dead_letters,
            "head_state_topic": topics.head_state,
            "group_id": group,
        },
        "index": {
            "dim": DIM,
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


def _config(settings: dict[str, dict[str, Any]]) -> Config:
    return load_config(env={}, overrides=settings)


def _toml(settings: dict[str, dict[str, Any]]) -> str:
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

    def __post_init__(self) -> None:
        self.producer = make_producer(KafkaConfig(bootstrap_servers=self.bootstrap))
        registry = open_registry()
        self.ad_codec = AdCodec(registry, DIM)
        self.eng_codec = EngagementCodec(registry, DIM)

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.errors.append(str(err))
            return
        ends = self.ends.setdefault(str(msg.topic()), {})
        p, o = int(msg.partition() or 0), int(msg.offset() or 0)
        ends[p] = max(ends.get(p, 0), o + 1)

    def raw(self, topic: str, keys: list[bytes], values: list[bytes]) -> None:
        for key, value in zip(keys, values, strict=True):
            self.producer.produce(topic, value=value, key=key, on_delivery=self._delivered)
            self.producer.poll(0)
        self.messages[topic] = self.messages.get(topic, 0) + len(values)

    def send(self, batch: AdBatch | EngagementBatch) -> None:
        if isinstance(batch, AdBatch):
            self.raw(self.topics.ads, id_keys(batch.ad_ids), self.ad_codec.encode(batch))
        else:
            keys = id_keys(batch.query_ids)
            self.raw(self.topics.engagements, keys, self.eng_codec.encode(batch))

    def flush(self) -> None:
        assert self.producer.flush(30) == 0, "events not delivered within 30 s"
        assert not self.errors, self.errors[:3]

    def bad_messages(self) -> int:
        """One undecodable message on each topic: both must be dead-lettered, not stop us."""
        self.raw(self.topics.ads, [b"\x00" * 8], [b"not avro at all"])
        self.raw(self.topics.engagements, [b"\x00" * 8], [b"\x00\x00\x00\x00\x01garbage"])
        return 2

    @property
    def engagement_ends(self) -> dict[int, int]:
        return dict(self.ends.get(self.topics.engagements, {}))


def _committed(bootstrap: str, topic: str, group: str) -> dict[int, int]:
    """The group's committed offsets, read by a consumer that never joins the group."""
    probe: Consumer = make_consumer(KafkaConfig(bootstrap_servers=bootstrap), group_id=group)
    try:
        tps = probe.committed([TopicPartition(topic, p) for p in range(ENG_PARTITIONS)], 10)
        return {tp.partition: tp.offset for tp in tps if tp.offset >= 0}
    finally:
        probe.close()


def _step_until(
    services: list[RefresherService], done: Callable[[], bool], what: str, guard_s: float = 90.0
) -> None:
    deadline = time.monotonic() + guard_s
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {guard_s:.0f} s: {what}")
        for s in services:
            s.step()


# ---- 1. end to end ---------------------------------------------------------------------------


def test_end_to_end_store_holds_the_exact_top_k_of_every_head_query(
    bootstrap: str, topics: Topics, training_file: Path, training: np.ndarray, tmp_path: Path
) -> None:
    work = _workload(seed=1)
    group = f"e2e-{uuid.uuid4().hex[:8]}"
    db = tmp_path / "store.db"
    settings = _settings(
        bootstrap, topics, training_file, f"sqlite:///{db}", tmp_path / "snap", group
    )
    feed = Feed(bootstrap, topics)
    service = RefresherService(_config(settings))
    try:
        half = len(work.steps) // 2
        for b in work.steps[:half]:
            feed.send(b)
        bad = feed.bad_messages()
        for b in work.steps[half:]:
            feed.send(b)
        feed.flush()
        n_ads = feed.messages[topics.ads]
        n_eng = feed.messages[topics.engagements]
        _step_until(
            [service],
            lambda: (
                service.stats.ad_events >= n_ads
                and service.stats.engagement_events >= n_eng
                and service.idle
            ),
            "every event consumed",
        )
        assert service.stats.dead_letters == bad
        assert service.index is not None and service.refresher is not None
        np.testing.assert_array_equal(service.index.ids(), sorted(work.live))
        np.testing.assert_array_equal(service.refresher.head_ids(), work.heads)
        assert _sqlite_query_ids(db) == set(work.heads.tolist())
        oracle = _oracle(training, work.live)
        assert _problems(service.store, work, oracle) == []
    finally:
        service.shutdown()
    assert _committed(bootstrap, topics.engagements, group) == feed.engagement_ends


# ---- 2. crash recovery -----------------------------------------------------------------------

_RUN = "import sys; from annstream.cli import main; sys.exit(main(sys.argv[1:]))"


def _spawn(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """`annstream run --config FILE` in a child process, its output in `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", _RUN, "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=config.parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def _wait_for_log(
    proc: subprocess.Popen[bytes], log: Path, text: str, count: int, guard_s: float
) -> None:
    """Until `text` appears `count` times in `log` (the service logs progress, we read it)."""
    deadline = time.monotonic() + guard_s
    while log.read_text(errors="replace").count(text) < count:
        if proc.poll() is not None:
            raise AssertionError(f"service exited with {proc.returncode}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {count} x {text!r} within {guard_s:.0f} s:\n{_tail(log)}")
        time.sleep(0.1)


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _wait_until(done: Callable[[], bool], what: str, guard_s: float = HANG_GUARD_S) -> None:
    deadline = time.monotonic() + guard_s
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {guard_s:.0f} s: {what}")
        time.sleep(0.5)


def test_kill_9_at_random_points_then_restart_ends_like_an_uninterrupted_run(
    bootstrap: str, topics: Topics, training_file: Path, training: np.ndarray, tmp_path: Path
) -> None:
    rng = np.random.default_rng(2024)
    work = _workload(seed=2)
    group = f"crash-{uuid.uuid4().hex[:8]}"
    db = tmp_path / "store.db"
    settings = _settings(
        bootstrap,
        topics,
        training_file,
        f"sqlite:///{db}",
        tmp_path / "snap",
        group,
        kafka={"client": {"session.timeout.ms": "3000"}},
        service={"log_level": "INFO", "shutdown_timeout_s": 20.0},
    )
    config = tmp_path / "annstream.toml"
    config.write_text(_toml(settings))
    feed = Feed(bootstrap, topics)
    first_eng = next(i for i, b in enumerate(work.steps) if isinstance(b, EngagementBatch))
    for b in work.steps[:first_eng]:
        feed.send(b)
    feed.flush()
    chunks = np.array_split(np.arange(first_eng, len(work.steps)), 4)
    oracle = _oracle(training, work.live)
    logs: list[Path] = []
    proc: subprocess.Popen[bytes] | None = None
    try:
        for run, chunk in enumerate(chunks):
            logs.append(tmp_path / f"run-{run}.log")
            proc = _spawn(config, logs[-1])
            # every partition restored: from here on each kill lands while events flow
            restored = "head-state chunks of partition"
            _wait_for_log(proc, logs[-1], restored, ENG_PARTITIONS, HANG_GUARD_S)
            half = len(chunk) // 2
            for i in chunk[:half].tolist():
                feed.send(work.steps[i])
            feed.flush()
            if run < 3:
                time.sleep(float(rng.uniform(0.0, 0.5)))
            for i in chunk[half:].tolist():
                feed.send(work.steps[i])
            feed.flush()
            if run < 3:
                time.sleep(float(rng.uniform(0.0, 0.4)))
                proc.send_signal(signal.SIGKILL)
                assert proc.wait(30) == -signal.SIGKILL
        assert proc is not None
        store = open_store(f"sqlite:///{db}")
        try:
            _wait_until(
                lambda: (
                    proc.poll() is None
                    and _committed(bootstrap, topics.engagements, group) == feed.engagement_ends
                    and _sqlite_query_ids(db) == set(work.heads.tolist())
                    and not _problems(store, work, oracle)
                ),
                "the store equal to the oracle after the last restart",
            )
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, _tail(logs[-1])
            assert _problems(store, work, oracle) == []
        finally:
            store.close()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert _committed(bootstrap, topics.engagements, group) == feed.engagement_ends
    snap = load_latest_snapshot(tmp_path / "snap", ICFG)
    assert snap is not None
    assert {p: o for (t, p), o in snap.offsets.items() if t == topics.ads} == feed.ends[topics.ads]
    np.testing.assert_array_equal(snap.index.ids(), sorted(work.live))
    assert _sqlite_query_ids(db) == set(work.heads.tolist())


# ---- 3. two replicas -------------------------------------------------------------------------


def _owned_heads(service: RefresherService) -> np.ndarray:
    return np.empty(0, "int64") if service.refresher is None else service.refresher.head_ids()


def test_two_replicas_shard_head_queries_and_the_survivor_takes_over(
    bootstrap: str, topics: Topics, training_file: Path, training: np.ndarray, tmp_path: Path
) -> None:
    work = _workload(seed=3)
    group = f"replicas-{uuid.uuid4().hex[:8]}"
    db = tmp_path / "store.db"

    def replica(name: str) -> RefresherService:
        settings = _settings(
            bootstrap,
            topics,
            training_file,
            f"sqlite:///{db}",
            tmp_path / f"snap-{name}",
            group,
            kafka={"client": {"session.timeout.ms": "3000"}},
        )
        return RefresherService(_config(settings))

    feed = Feed(bootstrap, topics)
    n = len(work.steps)
    phases = [work.steps[: n // 3], work.steps[n // 3 : 2 * n // 3], work.steps[2 * n // 3 :]]
    a = replica("a")
    b: RefresherService | None = None
    try:
        for batch in phases[0]:
            feed.send(batch)
        feed.flush()
        ends = feed.engagement_ends
        _step_until(
            [a],
            lambda: a.idle and _committed(bootstrap, topics.engagements, group) == ends,
            "replica a alone consumed the first events",
        )
        assert a.engagements is not None and a.engagements.assigned == set(range(ENG_PARTITIONS))
        assert len(_owned_heads(a))

        b = replica("b")
        both = [a, b]

        def sharded() -> bool:
            pa = a.engagements.assigned if a.engagements else set()
            pb = b.engagements.assigned if b.engagements else set()
            return bool(pa) and bool(pb) and not pa & pb and len(pa | pb) == ENG_PARTITIONS

        def check_disjoint_shards() -> None:
            """Each replica's head queries come from the partitions it owns, none from both.

            Checked once both ran a micro-batch after the rebalance: a replica forgets the
            head queries of revoked partitions in its next micro-batch, and the new owner
            re-enters them in its next one."""
            assert not len(np.intersect1d(_owned_heads(a), _owned_heads(b)))
            for s in both:
                owned = s.engagements.assigned if s.engagements else set()
                parts = {s._query_partition[q] for q in _owned_heads(s).tolist()}
                assert parts <= owned, (parts, owned)

        _step_until(both, sharded, "the partitions split between the two replicas")
        for batch in phases[1]:
            feed.send(batch)
        feed.flush()
        ends = feed.engagement_ends
        _step_until(
            both,
            lambda: (
                sharded()
                and a.idle
                and b.idle
                and _committed(bootstrap, topics.engagements, group) == ends
            ),
            "both replicas consumed their shards",
        )
        check_disjoint_shards()
        assert len(_owned_heads(a)) and len(_owned_heads(b))

        a.shutdown()
        survivor = b
        _step_until(
            [survivor],
            lambda: (
                survivor.engagements is not None
                and survivor.engagements.assigned == set(range(ENG_PARTITIONS))
            ),
            "the survivor owning every partition",
        )
        for batch in phases[2]:
            feed.send(batch)
        feed.flush()
        ends = feed.engagement_ends
        _step_until(
            [survivor],
            lambda: (
                survivor.idle
                and survivor.stats.ad_events >= feed.messages[topics.ads]
                and _committed(bootstrap, topics.engagements, group) == ends
            ),
            "the survivor consumed the rest",
        )
        np.testing.assert_array_equal(_owned_heads(survivor), work.heads)
        assert _sqlite_query_ids(db) == set(work.heads.tolist())
        assert _problems(survivor.store, work, _oracle(training, work.live)) == []
    finally:
        if b is not None:
            b.shutdown()


# ---- 4. backpressure -------------------------------------------------------------------------


def test_store_outage_pauses_consumption_and_commits_nothing_past_unstored_results(
    bootstrap: str, topics: Topics, training_file: Path, training: np.ndarray, tmp_path: Path
) -> None:
    work = _workload(seed=4)
    first = [i for i, b in enumerate(work.steps) if isinstance(b, EngagementBatch)][8]
    group = f"bp-{uuid.uuid4().hex[:8]}"
    with AerospikeTestServer(namespaces=["test"]) as server:
        url = f"aerospike://{server.url_host}/test/neighbours"
        settings = _settings(
            bootstrap,
            topics,
            training_file,
            url,
            tmp_path / "snap",
            group,
            store={"timeout_ms": 500},
        )
        feed = Feed(bootstrap, topics)
        service = RefresherService(_config(settings))
        try:
            for b in work.steps[:first]:
                feed.send(b)
            feed.flush()
            before = feed.engagement_ends
            _step_until(
                [service],
                lambda: service.idle and _committed(bootstrap, topics.engagements, group) == before,
                "the events before the outage stored and committed",
            )
            stored_before = server.record_count()
            assert stored_before > 0

            digests = frozenset(
                bytes(aerospike.calc_digest("test", "neighbours", QUERY_BASE + q))
                for q in range(N_QUERIES)
            )
            server.inject(Fault(digests, result=14))  # KEY_BUSY on every write: transient
            for b in work.steps[first:]:
                feed.send(b)
            feed.flush()
            _step_until(
                [service],
                lambda: service.stats.store_failures >= 1,
                "a micro-batch hitting the outage",
            )
            consumed = service.stats.engagement_events
            seen_ads = service.stats.ad_events
            while service.stats.store_failures < 3:
                service.step()
                # one pending micro-batch, nothing buffered behind it, no more consumption
                assert service._pending is not None and not service._eng_buf
                assert not service._ad_buf
                assert service.stats.engagement_events == consumed
                assert service.stats.ad_events == seen_ads
                assert _committed(bootstrap, topics.engagements, group) == before
            assert server.record_count() == stored_before

            server.clear_faults()
            _step_until(
                [service],
                lambda: (
                    service.idle
                    and _committed(bootstrap, topics.engagements, group) == feed.engagement_ends
                ),
                "every event stored and committed after the store came back",
            )
            assert service.stats.ad_events == feed.messages[topics.ads]
            assert server.record_count() == len(work.heads)
            assert _problems(service.store, work, _oracle(training, work.live)) == []
        finally:
            service.shutdown()


class _Listener:
    def partitions_assigned(self, partitions: list[int]) -> dict[int, int]:
        return {}

    def partitions_revoked(self, partitions: list[int], lost: bool) -> None:
        pass


def test_partitions_assigned_while_paused_deliver_nothing(bootstrap: str, topics: Topics) -> None:
    """The service keeps the consumer alive with `consume()` while a micro-batch waits for the
    store and drops whatever that returns: a partition gained then must start paused."""
    feed = Feed(bootstrap, topics)
    for b in _workload(seed=5, engagements=600).steps:
        if isinstance(b, EngagementBatch):
            feed.send(b)
    feed.flush()
    cfg = KafkaConfig(
        bootstrap_servers=bootstrap,
        engagement_topic=topics.engagements,
        dead_letter_topic=topics.dead_letters,
        group_id=f"paused-{uuid.uuid4().hex[:8]}",
    )
    codec = EngagementCodec(open_registry(), DIM)
    stream = EngagementStream(
        cfg, codec, DeadLetterPublisher(feed.producer, cfg.dead_letter_topic), _Listener()
    )
    try:
        stream.pause()
        deadline = time.monotonic() + HANG_GUARD_S
        while stream.assigned != set(range(ENG_PARTITIONS)):
            assert time.monotonic() < deadline, "no assignment"
            assert stream.consumer.consume(10, 0.1) == []
        for _ in range(10):
            assert stream.consumer.consume(10, 0.1) == []
        stream.resume()
        got = 0
        while got < feed.messages[topics.engagements]:
            assert time.monotonic() < deadline, f"only {got} events after resume"
            got += stream.poll(1000, 0.2).messages
    finally:
        stream.close()
