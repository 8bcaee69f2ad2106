"""The service under sustained load, shared by `bench freshness` and `bench load`.

An embedded broker and an in-process `RefresherService` with the production index settings,
primed with an ad catalogue (GloVe 6B 50-d at `--dim 50`, clustered Gaussian-mixture vectors
at any other dimension) and a population of head queries, then fed a mixed stream
(ad churn over the catalogue, Zipf engagements over the queries) from a thread at set rates.
A phase of the stream is measured from the bench's loop around `service.step()`: freshness of
every ad event (time its micro-batch was stored - its event time), lag (events sent and not yet
consumed, counted on both sides of this process: no broker watermarks), process RSS, and where
the micro-batch time went (the service's own components, timed in place).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import tempfile
import threading
import time
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from annstream.broker import EmbeddedBroker, create_topics
from annstream.codec import AdCodec, EngagementCodec
from annstream.config import Config, load_config
from annstream.errors import AnnstreamError
from annstream.kafka import make_producer
from annstream.schemas import open_registry
from annstream.testing.aerospike_server import child_server
from consumers.service import RefresherService
from producers.publish import Publisher, publish_batches
from producers.sources import MIXTURE_VERSION, glove_vectors, synthetic_ads, synthetic_engagements
from producers.stream import Lane, MixedStream, ad_churn, head_warmup

__all__ = [
    "FreshnessHistogram",
    "Phase",
    "RigOptions",
    "ServiceRig",
    "add_rig_arguments",
    "parse_settings",
    "rss_mb",
]

logger = logging.getLogger(__name__)

_HIST_MS = 120_000
_AD_BATCH = 50
_ENGAGEMENT_BATCH = 100


def add_rig_arguments(parser: argparse.ArgumentParser) -> None:
    """The index, refresher and set-up options both load benchmarks share."""
    parser.add_argument("--nlist", type=int, default=1024, help="IVF lists (default 1024)")
    parser.add_argument("--nprobe", type=int, default=32, help="IVF lists probed (default 32)")
    parser.add_argument("--k", type=int, default=100, help="neighbours per head query (100)")
    parser.add_argument("--margin", type=int, default=20, help="extra neighbours kept (20)")
    parser.add_argument(
        "--dim",
        type=int,
        default=50,
        help="dimension: 50 = GloVe 6B 50-d; any other = clustered synthetic vectors (50)",
    )
    parser.add_argument("--partitions", type=int, default=3, help="partitions per topic (3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--timeout", type=float, default=900, help="bound on the set-up (seconds, default 900)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a service setting for the run, TOML value (e.g. store.neighbour_metadata=false); "
        "repeatable",
    )
    parser.add_argument(
        "--store",
        default="sqlite",
        help="sqlite (a temp file, default), aerospike-test (the project's test server in a "
        "child process) or a store URL",
    )


def parse_settings(items: tuple[str, ...] | list[str]) -> dict[str, dict[str, Any]]:
    """`section.key=value` items (TOML values; a bare word is a string) as config overrides."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not section or not key:
            raise AnnstreamError(f"--set takes SECTION.KEY=VALUE, got {item!r}")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        out.setdefault(section, {})[key] = value
    return out


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size (VmRSS) of a process in MB, or NaN when unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return float("nan")


class FreshnessHistogram:
    """Freshness in 1 ms bins up to 120 s (fixed memory however long the run)."""

    def __init__(self) -> None:
        self.counts = np.zeros(_HIST_MS + 1, dtype="int64")

    def add(self, ms: list[float]) -> None:
        if ms:
            bins = np.clip(np.asarray(ms), 0, _HIST_MS).astype("int64")
            self.counts += np.bincount(bins, minlength=len(self.counts))

    def merge(self, other: FreshnessHistogram) -> None:
        self.counts += other.counts

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def percentile(self, q: float) -> float:
        n = self.n
        if not n:
            return float("nan")
        return float(np.searchsorted(np.cumsum(self.counts), q / 100.0 * n))

    def summary(self) -> dict[str, float]:
        return {"p50": self.percentile(50), "p99": self.percentile(99), "n": self.n}


@dataclass(frozen=True)
class RigOptions:
    ads: int = 200_000
    queries: int = 60_000
    partitions: int = 3
    nlist: int = 1024
    nprobe: int = 32
    k: int = 100
    margin: int = 20
    seed: int = 0
    timeout_s: float = 900.0
    dim: int = 50
    store: str = "sqlite"
    settings: tuple[str, ...] = ()

    @property
    def vectors(self) -> str:
        """What the ads and queries are: GloVe at 50 dimensions, the mixture otherwise."""
        return "glove-6B-50d" if self.dim == 50 else MIXTURE_VERSION


@dataclass
class Phase:
    """What one measured stretch of the stream did."""

    ad_rate: float
    engagement_rate: float
    duration_s: float
    sample_every_s: float
    freshness: FreshnessHistogram = field(default_factory=FreshnessHistogram)
    samples: list[dict[str, float]] = field(default_factory=list)
    ads_sent: int = 0
    engagements_sent: int = 0
    ads_consumed: int = 0
    engagements_consumed: int = 0
    stream_s: float = 0.0
    drain_s: float = 0.0
    drained: bool = False
    micro_batches: int = 0
    batch_s_sum: float = 0.0
    batch_s_max: float = 0.0
    records_written: int = 0
    profile: dict[str, float] = field(default_factory=dict)

    def lag_growth(self) -> float:
        """Mean ad lag over the last quarter of the samples minus over the first quarter."""
        lags = [s["ad_lag"] for s in self.samples]
        if len(lags) < 4:
            return 0.0
        q = max(1, len(lags) // 4)
        return float(np.mean(lags[-q:]) - np.mean(lags[:q]))

    def lag_slope(self) -> float:
        """Least-squares slope of the ad lag over time, events per second."""
        if len(self.samples) < 3:
            return 0.0
        t = np.array([s["t_s"] for s in self.samples])
        lag = np.array([s["ad_lag"] for s in self.samples])
        return float(np.polyfit(t, lag, 1)[0])

    def achieved(self) -> float:
        """Ad events sent per second over the target rate (the feeder shares the machine)."""
        if self.ad_rate <= 0:
            return 1.0
        return self.ads_sent / max(self.stream_s, 1e-9) / self.ad_rate

    def lag_grows(self) -> bool:
        """Falling behind: the lag rose by more than half a second of ad events."""
        return self.lag_growth() > 0.5 * self.ad_rate

    def summary(self) -> dict[str, Any]:
        f = self.freshness.summary()
        return {
            "ad_rate_target": self.ad_rate,
            "ad_events_per_s": round(self.ads_sent / max(self.stream_s, 1e-9), 1),
            "ad_events_consumed_per_s": round(
                self.ads_consumed / max(self.stream_s + self.drain_s, 1e-9), 1
            ),
            "engagement_events_per_s": round(self.engagements_sent / max(self.stream_s, 1e-9), 1),
            "freshness_ms": {"p50": f["p50"], "p99": f["p99"]},
            "freshness_events": int(f["n"]),
            "ad_lag_growth": round(self.lag_growth(), 1),
            "ad_lag_slope_per_s": round(self.lag_slope(), 2),
            "ad_lag_max": max((s["ad_lag"] for s in self.samples), default=0),
            "drain_s": round(self.drain_s, 2),
            "drained": self.drained,
            "micro_batches": self.micro_batches,
            "micro_batch_ms_mean": round(1000 * self.batch_s_sum / max(self.micro_batches, 1), 1),
            "micro_batch_ms_max": round(1000 * self.batch_s_max, 1),
            "records_written": self.records_written,
            "profile_s_per_batch": {
                k: round(v / max(self.micro_batches, 1), 4) for k, v in self.profile.items()
            },
        }


class _Profiler:
    """Wall time per call of some of the service's components, wrapped on the instances."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def wrap(self, obj: Any, method: str, label: str) -> None:
        inner: Callable[..., Any] = getattr(obj, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                out = inner(*args, **kwargs)
            finally:
                self.totals[label] = self.totals.get(label, 0.0) + time.perf_counter() - t0
            stats = getattr(out, "stats", None)
            if isinstance(stats, dict):
                for key, value in stats.items():
                    if key.endswith("_s"):
                        name = f"refresh.{key}"
                        self.totals[name] = self.totals.get(name, 0.0) + float(value)
            return out

        setattr(obj, method, timed)

    def take(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out


class ServiceRig:
    """Broker + primed service + feeder factory; `close()` stops everything it started."""

    service: RefresherService

    def __init__(self, opts: RigOptions) -> None:
        self.opts = opts
        self.workdir = Path(tempfile.mkdtemp(prefix="annstream-load-"))
        self.broker = EmbeddedBroker().start()
        self._started: RefresherService | None = None
        self._stack = contextlib.ExitStack()
        try:
            self.store_url = self._store_url()
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        opts = self.opts
        if opts.dim <= 0:
            raise AnnstreamError(f"--dim must be positive, got {opts.dim}")
        self.pool: np.ndarray | None = None
        if opts.dim == 50:
            self.pool = np.ascontiguousarray(glove_vectors(), dtype="float32")
        self.dim = None if self.pool is not None else opts.dim
        self.cfg = self._config()
        k = self.cfg.kafka
        create_topics(
            self.broker.bootstrap_servers,
            [k.ad_topic, k.engagement_topic, k.dead_letter_topic],
            partitions=opts.partitions,
        )
        self.registry = open_registry()
        self.producer = make_producer(k)
        self._deadline = time.monotonic() + opts.timeout_s
        t0 = time.monotonic()
        publish_batches(
            Publisher(self.producer, k.ad_topic),
            AdCodec(self.registry, opts.dim),
            synthetic_ads(
                opts.ads, seed=opts.seed, pool=self.pool, dim=self.dim, queries=opts.queries
            ),
        )
        self.service = RefresherService.from_config(self.cfg)
        self._started = self.service
        self.step_until(
            lambda s: (
                s.stats.ad_events >= opts.ads
                and s.engagements is not None
                and bool(s.engagements.assigned)
                and s.idle
            ),
            "index the ad catalogue and join the engagement group",
        )
        self.setup_s = {"catalogue_s": round(time.monotonic() - t0, 1)}
        self.profiler = _Profiler()
        s = self.service
        assert s.refresher is not None and s.engagements is not None
        self.profiler.wrap(s.refresher, "apply", "refresher.apply")
        self.profiler.wrap(s.sink, "write", "sink.write")
        self.profiler.wrap(s.head_log, "flush", "head_state.flush")
        self.profiler.wrap(s.engagements, "commit", "engagements.commit")
        self.profiler.wrap(s, "snapshot", "snapshot")
        self.profiler.wrap(s.ads, "poll", "ads.poll")
        self.profiler.wrap(s.engagements, "poll", "engagements.poll")

    def _store_url(self) -> str:
        store = self.opts.store
        if store == "sqlite":
            return f"sqlite:///{self.workdir / 'neighbours.db'}"
        if store == "aerospike-test":
            host = self._stack.enter_context(child_server())
            return f"aerospike://{host}/test/neighbours"
        if store.startswith(("sqlite://", "aerospike://")):
            return store
        raise AnnstreamError(
            f"--store must be sqlite, aerospike-test or a store URL, got {store!r}"
        )

    def _config(self) -> Config:
        o = self.opts
        overrides: dict[str, dict[str, Any]] = {
            "kafka": {
                "bootstrap_servers": self.broker.bootstrap_servers,
                "group_id": f"annstream-load-{uuid.uuid4().hex[:8]}",
                "create_topics": True,
            },
            "index": {
                "dim": o.dim,
                "nlist": o.nlist,
                "nprobe": o.nprobe,
                "train_size": min(o.ads, 50_000),
            },
            "refresh": {"k": o.k, "margin": o.margin},
            "store": {"url": self.store_url},
            "snapshot": {"dir": str(self.workdir / "snapshots")},
        }
        for section, values in parse_settings(o.settings).items():
            overrides[section] = {**overrides.get(section, {}), **values}
        return load_config(env={}, overrides=overrides)

    def step_until(self, done: Callable[[RefresherService], bool], what: str) -> None:
        while not done(self.service):
            if time.monotonic() > self._deadline:
                raise AnnstreamError(f"timed out waiting to {what} (--timeout)")
            self.service.step()

    def warm_heads(self) -> int:
        """Make every query of the population a head query; waits for their first lists."""
        t0 = time.monotonic()
        k = self.cfg.kafka
        publish_batches(
            Publisher(self.producer, k.engagement_topic),
            EngagementCodec(self.registry, self.opts.dim),
            head_warmup(
                self.opts.queries,
                self.cfg.heads.enter_score,
                seed=self.opts.seed,
                pool=self.pool,
                dim=self.dim,
            ),
        )
        want = self.opts.queries * 0.99
        self.step_until(
            lambda s: s.stats.head_queries >= want and not s.refresher_pending and s.idle,
            f"warm up {self.opts.queries} head queries",
        )
        self.setup_s["heads_s"] = round(time.monotonic() - t0, 1)
        self.profiler.take()
        return self.service.stats.head_queries

    def stream(self, ad_rate: float, engagement_rate: float, stop: threading.Event) -> MixedStream:
        """Endless ad churn and Zipf engagements at the given rates (0 = no such lane)."""
        o, k = self.opts, self.cfg.kafka
        lanes: dict[str, Lane] = {}
        if ad_rate > 0:
            lanes["ads"] = Lane(
                Publisher(self.producer, k.ad_topic, rate=ad_rate),
                AdCodec(self.registry, o.dim),
                ad_churn(
                    o.ads,
                    seed=o.seed,
                    pool=self.pool,
                    dim=self.dim,
                    queries=o.queries,
                    batch_size=_AD_BATCH,
                ),
                share=ad_rate,
                stamp=True,
            )
        if engagement_rate > 0:
            lanes["engagements"] = Lane(
                Publisher(self.producer, k.engagement_topic, rate=engagement_rate),
                EngagementCodec(self.registry, o.dim),
                synthetic_engagements(
                    1 << 62,
                    queries=o.queries,
                    seed=o.seed,
                    pool=self.pool,
                    dim=self.dim,
                    batch_size=_ENGAGEMENT_BATCH,
                    ads=o.ads,
                ),
                share=engagement_rate,
                stamp=True,
            )
        return MixedStream(lanes, stop=stop, name="load-feeder")

    def run_phase(
        self,
        ad_rate: float,
        engagement_rate: float,
        duration_s: float,
        sample_every_s: float = 1.0,
        drain_timeout_s: float = 30.0,
        on_sample: Callable[[dict[str, float]], None] | None = None,
    ) -> Phase:
        """Stream for `duration_s`, sampling every `sample_every_s`, then drain (bounded)."""
        s = self.service
        phase = Phase(ad_rate, engagement_rate, duration_s, sample_every_s)
        fresh_mark = s.metrics.freshness_mark()
        ads0, eng0 = s.stats.ad_events, s.stats.engagement_events
        batches0, records0 = s.stats.micro_batches, s.stats.records_written
        window = FreshnessHistogram()
        stop = threading.Event()
        feeder = self.stream(ad_rate, engagement_rate, stop)
        last_batches = batches0

        def sent(lane: str) -> int:
            return feeder.sent(lane) if lane in feeder.lanes else 0

        def observe() -> None:
            nonlocal last_batches, fresh_mark
            if s.stats.micro_batches != last_batches:
                last_batches = s.stats.micro_batches
                phase.batch_s_sum += s.stats.last_batch_s
                phase.batch_s_max = max(phase.batch_s_max, s.stats.last_batch_s)
            fresh, fresh_mark = s.metrics.freshness_since(fresh_mark)
            if fresh.size:
                window.add((fresh * 1000.0).tolist())

        start = time.monotonic()
        feeder.start()
        next_sample = start + sample_every_s
        try:
            while (now := time.monotonic()) < start + duration_s:
                if feeder.error is not None:
                    raise feeder.error
                s.step()
                observe()
                if now >= next_sample:
                    next_sample += sample_every_s
                    sample = {
                        "t_s": round(now - start, 2),
                        "rss_mb": round(rss_mb(), 1),
                        "ad_lag": sent("ads") - (s.stats.ad_events - ads0),
                        "engagement_lag": sent("engagements") - (s.stats.engagement_events - eng0),
                        "freshness_p99_ms": window.percentile(99),
                        "freshness_p50_ms": window.percentile(50),
                        "head_queries": s.stats.head_queries,
                    }
                    phase.samples.append(sample)
                    if on_sample is not None:
                        on_sample(sample)
                    phase.freshness.merge(window)
                    window = FreshnessHistogram()
        finally:
            stop.set()
            feeder.join(30)
        phase.stream_s = (feeder.finished_at or time.monotonic()) - start
        phase.ads_sent, phase.engagements_sent = sent("ads"), sent("engagements")
        t_drain = time.monotonic()
        while time.monotonic() - t_drain < drain_timeout_s:
            caught_up = (
                s.stats.ad_events - ads0 >= phase.ads_sent
                and s.stats.engagement_events - eng0 >= phase.engagements_sent
            )
            if caught_up and s.idle:
                phase.drained = True
                break
            s.step()
            observe()
        phase.drain_s = time.monotonic() - t_drain
        phase.freshness.merge(window)
        phase.ads_consumed = s.stats.ad_events - ads0
        phase.engagements_consumed = s.stats.engagement_events - eng0
        phase.micro_batches = s.stats.micro_batches - batches0
        phase.records_written = s.stats.records_written - records0
        phase.profile = self.profiler.take()
        return phase

    def close(self) -> None:
        try:
            if self._started is not None:
                self._started.shutdown()
        finally:
            if hasattr(self, "producer"):
                self.producer.flush(10)
            self.broker.stop()
            self._stack.close()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ServiceRig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
