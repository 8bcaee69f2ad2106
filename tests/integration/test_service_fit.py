"""The service fitting its index to the data (issue 12, bring-your-own vectors): the first
training on what is there, and the recall-target loop moving nprobe, against the real broker."""

from __future__ import annotations

import logging
import re
import uuid
from pathlib import Path

import numpy as np
import pytest

from annstream.events import NO_ID, AdBatch, EngagementBatch
from annstream.testing.harness import (
    ENTER,
    N_ADS,
    QUERY_BASE,
    T0,
    Feed,
    Topics,
    service_settings,
    step_until,
    to_config,
    workload,
)
from consumers.service import RefresherService
from producers.sources import clustered_vectors

pytest_plugins = ["service_harness"]


def _settings(
    bootstrap: str, topics: Topics, tmp_path: Path, **sections: dict[str, object]
) -> dict[str, dict[str, object]]:
    group = f"fit-{uuid.uuid4().hex[:8]}"
    out = service_settings(
        bootstrap, topics, Path(), f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "snap", group
    )
    out["index"] = {**out["index"], "training_file": "", "train_size": 50_000}
    for name, values in sections.items():
        out[name] = {**out.get(name, {}), **values}
    return out


def test_first_training_waits_for_nlist_ads_then_trains_once_the_ad_topic_is_caught_up(
    bootstrap: str, topics: Topics, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """50,000 ads configured, 2,000 published: the service trains on them once it has read
    the topic to its end at start, and says in /status what it waits for before."""
    work = workload(seed=3)
    initial = [b for b in work.steps if isinstance(b, AdBatch)][: N_ADS // 250]
    feed = Feed(bootstrap, topics)
    few = initial[0].take(initial[0].ad_ids < 11)  # 10 ads: fewer than nlist 16
    feed.send(few)
    feed.flush()
    service = RefresherService.from_config(to_config(_settings(bootstrap, topics, tmp_path)))
    try:
        with caplog.at_level(logging.INFO, logger="consumers.service"):
            step_until([service], lambda: service.stats.ad_events >= 10, "10 ads consumed")
            service.step()
        training = service.metrics.status()["training"]
        assert service.index is None and training["state"] == "waiting"
        assert "10 of 50,000 ads, waiting for at least 16" in training["message"]
        assert any("index.nlist 16 needs them" in r.getMessage() for r in caplog.records)
        for b in initial:
            feed.send(b)
        feed.flush()
        step_until([service], lambda: service.index is not None, "the index trained")
        training = service.metrics.status()["training"]
        assert training["state"] == "trained" and "caught up" in training["reason"]
        assert training["ads"] == N_ADS
        step_until([service], lambda: service.index.ntotal == N_ADS, "the ads indexed")  # type: ignore[union-attr]
    finally:
        service.shutdown()


def test_first_training_after_train_wait_s_when_the_end_is_unknown(
    bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    """The end offsets could not be read at start (as on a topic empty at start): training
    waits `index.train_wait_s`, then warns that nlist is too large for what it trained on."""
    work = workload(seed=3)
    feed = Feed(bootstrap, topics)
    for b in [b for b in work.steps if isinstance(b, AdBatch)][:4]:
        feed.send(b)
    feed.flush()
    settings = _settings(bootstrap, topics, tmp_path, index={"train_wait_s": 1.0, "nlist": 32})
    service = RefresherService.from_config(to_config(settings))
    service.ads.start_ends = None  # as when the broker did not answer the end offsets
    try:
        step_until([service], lambda: service.stats.ad_events >= 1_000, "1,000 ads consumed")
        if service.index is None:
            message = service.metrics.status()["training"]["message"]
            assert "waiting for more ads or" in message
        step_until([service], lambda: service.index is not None, "trained after the wait", 20)
        status = service.metrics.status()
        assert "index.train_wait_s (1 s) passed" in status["training"]["reason"]
        # at most 1,000 ads in 32 lists: the fit warning names the setting and a value
        (warning,) = status["tuning"]["fit_warnings"]
        assert re.match(r"index\.nlist = 32 is far from [\d,]+ ads \(\d+ per list", warning)
        assert "suggest index.nlist = " in warning and "annstream tune" in warning
    finally:
        service.shutdown()


def test_recall_target_moves_nprobe_from_1_until_the_stored_lists_reach_it(
    bootstrap: str, topics: Topics, training_file: Path, tmp_path: Path
) -> None:
    """Started at nprobe 1 with index.recall_target 0.95: the service raises nprobe from its
    own stored-recall samples, recomputing every list (and halves nlist at a retrain once
    nprobe reached a quarter of the lists), until the target holds; a restart keeps it."""
    work = workload(seed=4)
    settings = _settings(
        bootstrap,
        topics,
        tmp_path,
        index={"training_file": str(training_file), "nprobe": 1, "recall_target": 0.95},
        refresh={"nprobe": 0, "full_recompute_per_batch": 100},
        service={"recall_every_batches": 3, "recall_sample": 200},
    )
    feed = Feed(bootstrap, topics)
    for b in work.steps:
        feed.send(b)
    feed.flush()
    service = RefresherService.from_config(to_config(settings))
    try:
        assert service.tuner is not None and service.metrics.status()["tuning"]["nprobe"] == 1
        tuner = service.tuner
        step_until(
            [service],
            lambda: tuner.last is not None and tuner.last >= 0.95,
            "stored recall at the target",
            guard_s=60,
        )
        first, last = tuner.history[0], tuner.history[-1]
        print(f"recall target 0.95: (nlist, nprobe, recall) {first} -> {last}; {tuner.history}")
        assert first[1] == 1 and first[2] < 0.95
        assert last[2] >= 0.95 and last[1] > 1
        assert service.refresher is not None and service.refresher.nprobe == last[1]
        status = service.metrics.status()
        assert status["tuning"]["recall_target"] == 0.95
        assert status["tuning"]["nprobe"] == last[1]
        assert status["recall"]["value"] == pytest.approx(last[2])
        metrics = service.metrics.render().decode()
        assert "annstream_recall_target 0.95" in metrics
        assert f"annstream_nprobe {float(last[1])}" in metrics
        assert "annstream_recall_warn_below 0.75" in metrics
    finally:
        service.shutdown()
    restarted = RefresherService.from_config(to_config(settings))  # the tuned nprobe is kept
    try:
        assert restarted.index is not None and int(restarted.index.ivf.nlist) == last[0]
        assert restarted.refresher is not None and restarted.refresher.nprobe == last[1]
        assert restarted.tuner is not None and restarted.tuner.nprobe == last[1]
    finally:
        restarted.shutdown()


def test_new_region_ads_some_head_queries_probe_lower_stored_recall_and_the_warning_retrains(
    bootstrap: str, topics: Topics, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 12: 90 ads of a new region, near a third of the head queries. Drift is judged on
    the head queries, and the stored-recall warning asks for the check (scheduled checks
    are off here): it sees the drop from its post-training baseline and retrains."""
    dim = 64
    old = clustered_vectors(4_000, dim, np.random.default_rng(1))
    new = clustered_vectors(90, dim, np.random.default_rng(4), mixture_seed=1)
    head_vectors = np.concatenate(
        [
            clustered_vectors(134, dim, np.random.default_rng(2)),
            clustered_vectors(66, dim, np.random.default_rng(3), mixture_seed=1),
        ]
    )
    training_file = tmp_path / "training.npy"
    np.save(training_file, old)
    settings = _settings(
        bootstrap,
        topics,
        tmp_path,
        index={"training_file": str(training_file), "dim": dim, "nlist": 64, "nprobe": 8},
        refresh={"nprobe": 8},
        drift={"enabled": True, "check_every_batches": 100_000, "recall_sample": 200},
        service={"recall_every_batches": 1, "recall_sample": 200, "recall_warn_below": 0.99},
    )
    feed = Feed(bootstrap, topics, dim=dim)
    feed.send(AdBatch.upserts(np.arange(1, 4_001), old, T0))
    n = len(head_vectors)
    feed.send(
        EngagementBatch(
            query_ids=QUERY_BASE + np.arange(n, dtype="int64"),
            item_ids=np.full(n, NO_ID, "int64"),
            event_types=np.zeros(n, "uint8"),
            weights=np.full(n, ENTER, "float32"),
            event_time_ms=np.full(n, T0, "int64"),
            vectors=head_vectors,
            has_vector=np.ones(n, bool),
        )
    )
    feed.flush()
    service = RefresherService.from_config(to_config(settings))
    try:
        step_until(
            [service],
            lambda: service.drift.baseline is not None and service.idle,
            "the drift baseline on the head queries",
        )
        assert service.refresher is not None and len(service.refresher) == n
        baseline, version = service.drift.baseline, service.index.version  # type: ignore[union-attr]
        with caplog.at_level(logging.INFO):
            feed.send(AdBatch.upserts(np.arange(10_001, 10_091), new, T0))
            feed.flush()
            step_until(
                [service],
                lambda: service.index is not None and service.index.version > version,
                "a retrain swapped in",
            )
        texts = [r.getMessage() for r in caplog.records]
        assert any("drift check requested by the stored-recall warning" in t for t in texts)
        (drift,) = [t for t in texts if t.startswith("index drift:")]
        stored = [t.split(" over ")[0] for t in texts if t.startswith("stored recall@")]
        print(f"head-query baseline {baseline:.3f}; {drift}; {stored[:3]}")
        assert "dropped more than drift.recall_drop" in drift
    finally:
        service.shutdown()
