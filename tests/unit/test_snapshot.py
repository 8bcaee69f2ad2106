"""Snapshots: restart gives the same index, corrupt files fall back, policy timing."""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path

import numpy as np
import pytest

from annstream.config import IndexConfig, SnapshotConfig
from annstream.errors import SnapshotError
from annstream.index import LiveIvfIndex
from annstream.snapshot import (
    SnapshotPolicy,
    list_snapshots,
    load_latest_snapshot,
    read_snapshot,
    write_snapshot,
)

D = 16
CFG = IndexConfig(dim=D, nlist=16, nprobe=4, pq_m=4, pq_nbits=6)


def _data(n: int, seed: int = 1338) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype("float32")


@pytest.fixture
def index() -> LiveIvfIndex:
    index = LiveIvfIndex.train(CFG, _data(2000, seed=1))
    index.upsert(np.arange(300), _data(300))
    index.delete(np.arange(0, 300, 7))
    return index


def _write(tmp_path: Path, index: LiveIvfIndex, offset: int, keep: int = 3) -> Path:
    return write_snapshot(
        tmp_path, index, {("ads", 0): offset, ("ads", 1): offset + 5}, {"n": offset}, keep=keep
    )


def test_restart_from_snapshot_gives_same_ids_and_search(
    tmp_path: Path, index: LiveIvfIndex
) -> None:
    index.version = 2
    path = _write(tmp_path, index, 100)
    snap = load_latest_snapshot(tmp_path, CFG)
    assert snap is not None and snap.path == path
    assert snap.offsets == {("ads", 0): 100, ("ads", 1): 105}
    assert snap.meta == {"n": 100}
    assert snap.index.version == 2 and snap.index.nprobe == CFG.nprobe
    assert np.array_equal(snap.index.ids(), index.ids())
    xq = _data(30, seed=3)
    s0, i0 = index.search(xq, 10)
    s1, i1 = snap.index.search(xq, 10)
    assert np.array_equal(i0, i1)
    np.testing.assert_array_equal(s0, s1)
    snap.index.upsert([1], _data(1, seed=4))
    assert snap.index.delete([1]).tolist() == [1]


def test_ivfpq_snapshot_round_trip(tmp_path: Path) -> None:
    cfg = IndexConfig(dim=D, metric="l2", kind="ivfpq", nlist=16, nprobe=4, pq_m=4, pq_nbits=6)
    index = LiveIvfIndex.train(cfg, _data(2000, seed=1))
    index.upsert(np.arange(100), _data(100))
    write_snapshot(tmp_path, index, {}, {})
    snap = load_latest_snapshot(tmp_path, cfg)
    assert snap is not None
    np.testing.assert_array_equal(snap.index.vectors(np.arange(100)), _data(100))


def test_keeps_only_newest_snapshots(tmp_path: Path, index: LiveIvfIndex) -> None:
    paths = [_write(tmp_path, index, off, keep=2) for off in (1, 2, 3, 4)]
    assert list_snapshots(tmp_path) == [paths[3], paths[2]]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_newest_snapshot_falls_back_to_previous(
    tmp_path: Path, index: LiveIvfIndex, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    _write(tmp_path, index, 10)
    index.upsert([1000], _data(1, seed=6))
    newest = _write(tmp_path, index, 20)
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="annstream.snapshot"):
        snap = load_latest_snapshot(tmp_path, CFG)
    assert snap is not None and snap.offsets[("ads", 0)] == 10
    assert not snap.index.contains([1000])[0]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert newest.name in warnings[0].getMessage()
    assert "checksum mismatch" in warnings[0].getMessage()
    with pytest.raises(SnapshotError, match="unusable"):
        read_snapshot(newest, CFG)


def test_no_usable_snapshot_returns_none(
    tmp_path: Path, index: LiveIvfIndex, caplog: pytest.LogCaptureFixture
) -> None:
    assert load_latest_snapshot(tmp_path / "missing", CFG) is None
    only = _write(tmp_path, index, 1)
    only.write_bytes(b"ANNSNAP1")
    with caplog.at_level(logging.WARNING, logger="annstream.snapshot"):
        assert load_latest_snapshot(tmp_path, CFG) is None
    assert "truncated" in caplog.text and only.name in caplog.text


def test_snapshot_of_another_dimension_raises(tmp_path: Path, index: LiveIvfIndex) -> None:
    _write(tmp_path, index, 1)
    with pytest.raises(SnapshotError, match="dimension 16"):
        load_latest_snapshot(tmp_path, IndexConfig(dim=32))


def test_meta_must_be_json(tmp_path: Path, index: LiveIvfIndex) -> None:
    with pytest.raises(SnapshotError, match="JSON"):
        write_snapshot(tmp_path, index, {}, {"bad": object()})
    assert not list(tmp_path.iterdir())


def test_policy_due_on_events_or_time_whichever_first() -> None:
    now = [0.0]
    policy = SnapshotPolicy(SnapshotConfig(every_s=60.0, every_events=100), clock=lambda: now[0])
    assert not policy.due()
    policy.record(99)
    assert not policy.due()
    policy.record(1)
    assert policy.due()
    policy.written()
    assert not policy.due()
    now[0] = 59.9
    assert not policy.due()
    now[0] = 60.0
    assert policy.due()
    policy.written()
    assert not policy.due()
    off = SnapshotPolicy(SnapshotConfig(every_s=0, every_events=0), clock=lambda: now[0])
    off.record(10**9)
    now[0] = 10**9
    assert not off.due()


def _arrays() -> dict[str, np.ndarray]:
    return {"ad_ids": np.arange(5, dtype="int64"), "campaign_ids": np.arange(5, 10)}


def test_arrays_round_trip_inside_the_checksummed_file(tmp_path: Path, index: LiveIvfIndex) -> None:
    write_snapshot(tmp_path, index, {("ads", 0): 7}, {}, arrays=_arrays())
    snap = load_latest_snapshot(tmp_path, CFG)
    assert snap is not None and sorted(snap.arrays) == ["ad_ids", "campaign_ids"]
    for name, a in _arrays().items():
        np.testing.assert_array_equal(snap.arrays[name], a)
        assert snap.arrays[name].dtype == a.dtype
    assert snap.header["arrays_bytes"] > 0
    write_snapshot(tmp_path, index, {}, {})
    snap = load_latest_snapshot(tmp_path, CFG)
    assert snap is not None and snap.arrays == {}


def test_snapshot_without_arrays_header_still_loads(tmp_path: Path, index: LiveIvfIndex) -> None:
    """A file written before `arrays` existed: no `arrays_bytes` in the header."""
    path = _write(tmp_path, index, 3)
    data = path.read_bytes()
    (head_len,) = struct.unpack_from("<Q", data, 8)
    header = json.loads(data[16 : 16 + head_len])
    del header["arrays_bytes"]
    head = json.dumps(header, sort_keys=True).encode()
    body = data[:8] + struct.pack("<Q", len(head)) + head + data[16 + head_len : -32]
    path.write_bytes(body + hashlib.sha256(body).digest())
    snap = read_snapshot(path, CFG)
    assert snap.arrays == {} and snap.offsets[("ads", 0)] == 3
    assert np.array_equal(snap.index.ids(), index.ids())


def test_corrupt_arrays_fall_back_to_previous_snapshot(
    tmp_path: Path, index: LiveIvfIndex, caplog: pytest.LogCaptureFixture
) -> None:
    write_snapshot(tmp_path, index, {("ads", 0): 1}, {}, arrays=_arrays())
    newest = write_snapshot(tmp_path, index, {("ads", 0): 2}, {}, arrays=_arrays())
    data = bytearray(newest.read_bytes())
    data[-32 - 40] ^= 0x01  # inside the npz blob, which ends right before the digest
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="annstream.snapshot"):
        snap = load_latest_snapshot(tmp_path, CFG)
    assert snap is not None and snap.offsets[("ads", 0)] == 1
    np.testing.assert_array_equal(snap.arrays["campaign_ids"], np.arange(5, 10))
    assert "checksum mismatch" in caplog.text and newest.name in caplog.text


def test_arrays_must_be_numeric(tmp_path: Path, index: LiveIvfIndex) -> None:
    with pytest.raises(SnapshotError, match="'bad'"):
        write_snapshot(tmp_path, index, {}, {}, arrays={"bad": np.array([object()])})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("garbage", "after"),
    [
        ("snapshot-999999999999.annsnap", "snapshot-1000000000000.annsnap"),
        ("snapshot-99999999999999.annsnap", "snapshot-100000000000000.annsnap"),
    ],
)
def test_a_garbage_newest_file_never_hides_the_snapshots_written_after_it(
    tmp_path: Path, index: LiveIvfIndex, garbage: str, after: str
) -> None:
    """Issue 11 item 12: the next sequence number after 999999999999 has 13 digits; it must
    be found and loaded, and each restart must resume from the latest snapshot."""
    first = _write(tmp_path, index, 10)
    (tmp_path / garbage).write_bytes(b"not a snapshot")
    index.upsert([1000], _data(1, seed=6))
    second = _write(tmp_path, index, 20, keep=5)
    assert second.name == after
    assert list_snapshots(tmp_path) == [second, tmp_path / garbage, first]
    snap = load_latest_snapshot(tmp_path, CFG)
    assert snap is not None and snap.path == second and snap.offsets[("ads", 0)] == 20
    index.upsert([1001], _data(1, seed=7))
    third = _write(tmp_path, index, 30, keep=5)
    snap = load_latest_snapshot(tmp_path, CFG)
    assert snap is not None and snap.path == third and snap.index.contains([1001])[0]


def test_sequence_numbers_order_numerically_whatever_their_digits(tmp_path: Path) -> None:
    for name in ("snapshot-9.annsnap", "snapshot-000000000010.annsnap", "snapshot-1000.annsnap"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "snapshot-5000.annsnap").mkdir()
    (tmp_path / "snapshot-x.annsnap").write_bytes(b"")
    assert [p.name for p in list_snapshots(tmp_path)] == [
        "snapshot-1000.annsnap",
        "snapshot-000000000010.annsnap",
        "snapshot-9.annsnap",
    ]
