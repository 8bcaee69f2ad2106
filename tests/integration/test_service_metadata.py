"""The service stores each neighbour's campaign and advertiser id, from the last upsert event of
that ad, and keeps them across a restart from a snapshot (issue 5's surplus metadata).

Initial ads come from `synthetic_ads` (known ids); the workload's stream updates carry none
(-1), so both known and unknown metadata, overwrites and deletes are exercised.
"""

from __future__ import annotations

import contextlib
import io
import json
import uuid
from pathlib import Path

import numpy as np

from annstream.cli import main
from annstream.events import OP_UPSERT, AdBatch, EngagementBatch
from annstream.store.base import NeighbourStore
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


def _expected(steps: list[AdBatch | EngagementBatch]) -> dict[int, tuple[int, int]]:
    """Ad id -> (advertiser, campaign) of its last upsert, for the ads live after `steps`."""
    out: dict[int, tuple[int, int]] = {}
    for b in steps:
        if not isinstance(b, AdBatch):
            continue
        rows = zip(
            b.ad_ids.tolist(),
            b.ops.tolist(),
            b.advertiser_ids.tolist(),
            b.campaign_ids.tolist(),
            strict=True,
        )
        for ad, op, advertiser, campaign in rows:
            if op == OP_UPSERT:
                out[ad] = (advertiser, campaign)
            else:
                out.pop(ad, None)
    return out


def _check_lists(
    store: NeighbourStore, query_ids: np.ndarray, want: dict[int, tuple[int, int]]
) -> np.ndarray:
    """Assert every stored neighbour carries its ad's ids (-1 for padding); returns the lists."""
    got = store.lookup(query_ids)
    assert got.found.all() and got.campaign_ids is not None and got.advertiser_ids is not None
    pairs = [[want.get(i, (-1, -1)) for i in row] for row in got.ids.tolist()]
    expected = np.array(pairs, dtype="int64").reshape(*got.ids.shape, 2)
    bad = np.argwhere(
        (got.advertiser_ids != expected[..., 0]) | (got.campaign_ids != expected[..., 1])
    )
    assert not len(bad), [
        (int(got.query_ids[r]), int(got.ids[r, c]), int(got.campaign_ids[r, c])) for r, c in bad[:5]
    ]
    return got.ids


def test_stored_lists_carry_campaign_ids_and_they_survive_a_restart(
    bootstrap: str, topics: Topics, training_file: Path, tmp_path: Path
) -> None:
    work = workload(seed=7, engagements=1_500, stream_ads=300)
    half = len(work.steps) // 2
    before, after = work.steps[:half], work.steps[half:]
    db = tmp_path / "store.db"
    settings = service_settings(
        bootstrap,
        topics,
        training_file,
        f"sqlite:///{db}",
        tmp_path / "snap",
        f"meta-{uuid.uuid4().hex[:8]}",
        snapshot={"every_events": 0, "every_s": 0},
    )
    feed = Feed(bootstrap, topics)

    def feed_all(steps: list[AdBatch | EngagementBatch], service: RefresherService) -> None:
        ads0, eng0 = feed.messages.get(topics.ads, 0), feed.messages.get(topics.engagements, 0)
        for b in steps:
            feed.send(b)
        feed.flush()
        n_ads = feed.messages[topics.ads] - ads0
        n_eng = feed.messages[topics.engagements] - eng0
        step_until(
            [service],
            lambda: (
                service.stats.ad_events >= n_ads
                and service.stats.engagement_events >= n_eng
                and service.idle
            ),
            "every event consumed",
        )

    service = RefresherService.from_config(to_config(settings))
    try:
        feed_all(before, service)
        want = _expected(before)
        assert len(service.ad_meta) == len(want)
        heads = service.refresher.head_ids() if service.refresher else np.empty(0, "int64")
        assert len(heads)
        ids = _check_lists(service.store, heads, want)
        known = np.array([want.get(i, (-1, -1))[1] >= 0 for i in ids.ravel().tolist()])
        assert known.any() and not known.all()
        version_before = int(service.store.lookup(heads).versions.max())
    finally:
        service.shutdown()
    assert service.stats.snapshots == 1

    restarted = RefresherService.from_config(to_config(settings))
    try:
        assert len(restarted.ad_meta) == len(want)
        feed_all(after, restarted)
        want_all = _expected(work.steps)
        heads = restarted.refresher.head_ids() if restarted.refresher else np.empty(0, "int64")
        got = restarted.store.lookup(heads)
        new = got.versions > version_before
        assert new.any()
        ids = _check_lists(restarted.store, heads[new], want_all)
        old_known = [
            i for i in ids.ravel().tolist() if i in want and want_all.get(i, (-1, -1))[1] >= 0
        ]
        assert old_known, "no list written after the restart holds an ad from before it"
    finally:
        restarted.shutdown()

    row = next(r for r in range(len(ids)) if any(want_all.get(i, (-1, -1))[1] >= 0 for i in ids[r]))
    query = int(heads[new][row])
    ad = next(i for i in ids[row].tolist() if want_all.get(i, (-1, -1))[1] >= 0)
    campaign = want_all[ad][1]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        store = f"sqlite:///{db}"
        rc = main(["lookup", str(query), "--store", store, "--exclude-campaigns", str(campaign)])
    assert rc == 0
    line = json.loads(out.getvalue())
    assert line["query_id"] == query and line["filtered"] >= 1 and ad not in line["ids"]
    assert campaign not in line["campaign_ids"] and len(line["campaign_ids"]) == len(line["ids"])


def test_without_neighbour_metadata_records_are_lean_and_filter_by_ad_id_only(
    bootstrap: str, topics: Topics, training_file: Path, tmp_path: Path
) -> None:
    work = workload(seed=7, engagements=800, stream_ads=100)
    db = tmp_path / "store.db"
    settings = service_settings(
        bootstrap,
        topics,
        training_file,
        f"sqlite:///{db}",
        tmp_path / "snap",
        f"lean-{uuid.uuid4().hex[:8]}",
        store={"neighbour_metadata": False},
    )
    feed = Feed(bootstrap, topics)
    for b in work.steps:
        feed.send(b)
    feed.flush()
    service = RefresherService.from_config(to_config(settings))
    try:
        step_until(
            [service],
            lambda: (
                service.stats.ad_events >= feed.messages[topics.ads]
                and service.stats.engagement_events >= feed.messages[topics.engagements]
                and service.idle
            ),
            "every event consumed",
        )
        heads = service.refresher.head_ids() if service.refresher else np.empty(0, "int64")
        got = service.store.lookup(heads)
        assert len(heads) and got.found.all()
        assert got.campaign_ids is None and got.advertiser_ids is None
    finally:
        service.shutdown()
    query, ad = int(heads[0]), int(got.ids[0, 0])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["lookup", str(query), "--store", f"sqlite:///{db}", "--exclude-ids", str(ad)])
    line = json.loads(out.getvalue())
    assert rc == 0 and line["filtered"] == 1 and ad not in line["ids"]
    with (
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()) as err,
    ):
        rc = main(["lookup", str(query), "--store", f"sqlite:///{db}", "--exclude-campaigns", "1"])
    assert rc != 0 and "store.neighbour_metadata = false" in err.getvalue()
