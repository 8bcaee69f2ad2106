"""The service at real embedding sizes (issue 12): d = 384 through a restart (snapshot,
head-state changelog, refresher, SQLite round trip) and one end-to-end run at d = 768 into
Aerospike (the real client against the test server), on clustered vectors (a Gaussian
mixture), checked against the same independent oracle as the d = 16 tests."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

from annstream.events import AdBatch, EngagementBatch
from annstream.snapshot import load_latest_snapshot
from annstream.testing.aerospike_server import AerospikeTestServer
from annstream.testing.harness import (
    ICFG,
    Feed,
    Topics,
    build_oracle,
    committed_offsets,
    problems,
    service_settings,
    sqlite_query_ids,
    step_until,
    to_config,
    workload,
)
from consumers.service import RefresherService
from producers.sources import clustered_vectors

pytest_plugins = ["service_harness"]


def _training(tmp_path: Path, dim: int) -> tuple[Path, np.ndarray]:
    vectors = clustered_vectors(1_000, dim, np.random.default_rng(99))
    path = tmp_path / "training.npy"
    np.save(path, vectors)
    return path, vectors


def _run_until_consumed(service: RefresherService, ads: int, engagements: int) -> None:
    step_until(
        [service],
        lambda: (
            service.stats.ad_events >= ads
            and service.stats.engagement_events >= engagements
            and service.idle
        ),
        "every event consumed",
    )


def test_service_at_384_dimensions_restarts_from_its_snapshot_and_changelog(
    bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    dim = 384
    work = workload(seed=5, engagements=1_500, stream_ads=300, ads=1_500, queries=200, dim=dim)
    training_file, training = _training(tmp_path, dim)
    group = f"d384-{uuid.uuid4().hex[:8]}"
    db = tmp_path / "store.db"
    settings = service_settings(
        bootstrap, topics, training_file, f"sqlite:///{db}", tmp_path / "snap", group, dim=dim
    )
    feed = Feed(bootstrap, topics, dim=dim)
    half = len(work.steps) // 2
    for b in work.steps[:half]:
        feed.send(b)
    feed.flush()
    first_ads, first_eng = feed.messages[topics.ads], feed.messages[topics.engagements]
    service = RefresherService.from_config(to_config(settings))
    try:
        _run_until_consumed(service, first_ads, first_eng)
        assert service.refresher is not None and len(service.refresher) > 0
    finally:
        service.shutdown()
    snap = load_latest_snapshot(str(tmp_path / "snap"), to_config(settings).index)
    assert snap is not None and snap.index.dim == dim and snap.index.ntotal > 0

    for b in work.steps[half:]:
        feed.send(b)
    feed.flush()
    service = RefresherService.from_config(to_config(settings))
    try:
        assert service.index is not None and service.index.ntotal == snap.index.ntotal
        _run_until_consumed(
            service,
            feed.messages[topics.ads] - first_ads,
            feed.messages[topics.engagements] - first_eng,
        )
        assert service.index is not None and service.refresher is not None
        np.testing.assert_array_equal(service.index.ids(), sorted(work.live))
        # queries whose engagements span both runs are heads only if the changelog carried
        # their first-run scores over the restart
        np.testing.assert_array_equal(service.refresher.head_ids(), work.heads)
        assert sqlite_query_ids(db) == set(work.heads.tolist())
        assert problems(service.store, work, build_oracle(training, work.live)) == []
    finally:
        service.shutdown()
    assert committed_offsets(bootstrap, topics.engagements, group) == feed.engagement_ends


def test_end_to_end_at_768_dimensions_on_clustered_vectors_into_aerospike(
    bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    """The real Aerospike client against the test server: lists of 768-d ads round-trip."""
    dim = 768
    work = workload(seed=6, engagements=1_500, stream_ads=300, ads=1_500, queries=200, dim=dim)
    assert any(isinstance(b, EngagementBatch) for b in work.steps)
    assert all(b.dim == dim for b in work.steps if isinstance(b, AdBatch))
    training_file, training = _training(tmp_path, dim)
    with AerospikeTestServer(namespaces=["test"]) as server:
        settings = service_settings(
            bootstrap,
            topics,
            training_file,
            f"aerospike://{server.url_host}/test/neighbours",
            tmp_path / "snap",
            f"d768-{uuid.uuid4().hex[:8]}",
            dim=dim,
        )
        feed = Feed(bootstrap, topics, dim=dim)
        for b in work.steps:
            feed.send(b)
        feed.flush()
        service = RefresherService.from_config(to_config(settings))
        try:
            _run_until_consumed(
                service, feed.messages[topics.ads], feed.messages[topics.engagements]
            )
            assert service.index is not None and service.index.dim == dim
            assert int(service.index.ivf.nlist) == ICFG.nlist
            np.testing.assert_array_equal(service.index.ids(), sorted(work.live))
            assert service.store.lookup(work.heads).missing.size == 0
            assert problems(service.store, work, build_oracle(training, work.live)) == []
        finally:
            service.shutdown()
