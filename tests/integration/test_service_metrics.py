"""The metrics endpoint of a running service against the real broker: the figures move."""

from __future__ import annotations

import json
import re
import urllib.request
import uuid
from pathlib import Path

import numpy as np

from annstream.ann import knn_exact
from annstream.broker import free_port
from annstream.testing.harness import (
    Feed,
    Topics,
    service_settings,
    step_until,
    to_config,
    workload,
)
from consumers.service import RefresherService

pytest_plugins = ["service_harness"]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def _value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total, seen = 0.0, False
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total, seen = total + float(m.group(2)), True
    assert seen, f"{name} {labels} not in /metrics"
    return total


def index_size(service: RefresherService) -> int:
    assert service.index is not None
    return int(service.index.ntotal)


def test_service_metrics_move_and_recall_matches_exact(
    bootstrap: str, topics: Topics, training_file: Path, tmp_path: Path
) -> None:
    work = workload(seed=5)
    settings = service_settings(
        bootstrap,
        topics,
        training_file,
        f"sqlite:///{tmp_path / 'store.db'}",
        tmp_path / "snap",
        f"metrics-{uuid.uuid4().hex[:8]}",
        service={"metrics_port": free_port(), "recall_every_batches": 1, "recall_sample": 10_000},
    )
    cfg = to_config(settings)
    feed = Feed(bootstrap, topics)
    service = RefresherService.from_config(cfg)
    try:
        assert service.metrics_server is not None
        url = service.metrics_server.url
        before = _get(url + "/metrics")
        half = len(work.steps) // 2
        for b in work.steps[:half]:
            feed.send(b)
        feed.bad_messages()
        feed.flush()
        step_until([service], lambda: service.stats.micro_batches >= 3 and service.idle, "batches")
        middle = _get(url + "/metrics")
        for b in work.steps[half:]:
            feed.send(b)
        feed.flush()
        n_ads, n_eng = feed.messages[topics.ads], feed.messages[topics.engagements]
        step_until(
            [service],
            lambda: (
                service.stats.ad_events >= n_ads
                and service.stats.engagement_events >= n_eng
                and service.idle
            ),
            "every event consumed",
        )
        after = _get(url + "/metrics")
        status = json.loads(_get(url + "/status"))
        assert json.loads(_get(url + "/healthz"))["healthy"] is True

        moved = {
            name: (_value(before, name), _value(middle, name), _value(after, name))
            for name in (
                "annstream_ad_events_total",
                "annstream_engagement_events_total",
                "annstream_upserts_total",
                "annstream_records_written_total",
                "annstream_micro_batch_seconds_count",
                "annstream_freshness_seconds_count",
            )
        }
        for name, (b0, b1, b2) in moved.items():
            assert b0 < b1 < b2, (name, b0, b1, b2)
        assert _value(after, "annstream_dead_letters_total") == 2
        assert _value(after, "annstream_dead_letters_total", reason="not_avro") == 1
        assert _value(after, "annstream_dead_letters_total", reason="unknown_schema") == 1
        assert _value(after, "annstream_rebalances_total", kind="assigned") >= 1
        assert _value(after, "annstream_store_write_seconds_count") >= 1
        assert _value(after, "process_resident_memory_bytes") > 50e6
        assert _value(after, "annstream_build_info") == 1
        # /status reads the same counters as /metrics (and as service.stats)
        assert status["counters"]["ad_events"] == _value(after, "annstream_ad_events_total")
        assert status["counters"]["dead_letters"] == service.stats.dead_letters == 2
        assert _value(after, "annstream_store_errors_total") == 0
        assert _value(middle, "annstream_index_ads") < _value(after, "annstream_index_ads")
        assert _value(after, "annstream_index_ads") == index_size(service)
        assert _value(after, "annstream_head_queries") == len(work.heads)
        assert _value(after, "annstream_index_imbalance") >= 1.0
        assert _value(after, "annstream_consumer_lag", topic=topics.engagements) == 0
        assert status, "empty /status"

        # the recall gauge (all head queries sampled) equals an independent brute force
        index, refresher = service.index, service.refresher
        assert index is not None and refresher is not None
        k = cfg.refresh.k
        heads = refresher.head_ids()
        ids, vectors = index.export()
        queries = index.prepare(service.tracker.vectors(heads))
        _, exact = knn_exact(vectors, ids, queries, k, index.metric)
        stored = service.store.lookup(heads)
        per_query = [
            len(set(exact[i][exact[i] >= 0].tolist()) & set(stored.ids[i, :k].tolist()))
            / max(1, int((exact[i] >= 0).sum()))
            if stored.found[i]
            else 0.0
            for i in range(len(heads))
        ]
        assert abs(_value(after, "annstream_recall_at_k") - float(np.mean(per_query))) < 0.01
    finally:
        service.shutdown()
