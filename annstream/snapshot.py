"""Snapshots of the live index with the ad-topic offsets it reflects, for a fast restart.

One file per snapshot, written atomically (temp file, fsync, rename, fsync of the directory):

    b"ANNSNAP1" | header length (u64 LE) | header JSON | index bytes | store bytes | arrays | sha256

`arrays` is an optional npz blob of the caller's named arrays (state that must match the index,
such as the ad metadata); its size is `arrays_bytes` in the header, and files written before it
existed have none. The sha256 covers everything before it. A restart loads the newest file
whose checksum and contents verify; a torn or corrupt file is logged and skipped in favour of
the previous one, so a crash while writing never costs more than one snapshot interval of replay.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import struct
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from annstream.config import IndexConfig, SnapshotConfig
from annstream.errors import IndexStateError, SnapshotError
from annstream.index import LiveIvfIndex

__all__ = [
    "Snapshot",
    "SnapshotPolicy",
    "list_snapshots",
    "load_latest_snapshot",
    "read_snapshot",
    "write_snapshot",
]

logger = logging.getLogger(__name__)

MAGIC = b"ANNSNAP1"
FORMAT = 1
_LEN = struct.Struct("<Q")
_DIGEST = 32
_NAME = re.compile(r"^snapshot-(\d+)\.annsnap$")

Offsets = dict[tuple[str, int], int]


@dataclass
class Snapshot:
    """A loaded snapshot: the index, the next ad-topic offset per partition, the caller's meta."""

    path: Path
    index: LiveIvfIndex
    offsets: Offsets
    meta: dict[str, Any]
    created_at: float
    header: dict[str, Any] = field(repr=False, default_factory=dict)
    arrays: dict[str, np.ndarray] = field(repr=False, default_factory=dict)


class _Unusable(Exception):
    """A snapshot file that cannot be trusted; the message says why."""


def _seq(path: Path) -> int:
    m = _NAME.match(path.name)
    return int(m.group(1)) if m else -1


def list_snapshots(dir: str | os.PathLike[str]) -> list[Path]:
    """Snapshot files in `dir`, newest (highest sequence number, whatever its digits) first.

    Sequence numbers are compared as numbers, so a stray `snapshot-999999999999.annsnap` is
    followed by `snapshot-1000000000000.annsnap`, which sorts before it, not after.
    """
    d = Path(dir)
    if not d.is_dir():
        return []
    found = (p for p in d.iterdir() if _NAME.match(p.name) and p.is_file())
    return sorted(found, key=lambda p: (_seq(p), p.name), reverse=True)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _npz(arrays: Mapping[str, np.ndarray] | None) -> bytes:
    if not arrays:
        return b""
    for name, a in arrays.items():
        if not isinstance(name, str) or not name:
            raise SnapshotError(f"snapshot array names must be non-empty strings, got {name!r}")
        if not isinstance(a, np.ndarray) or a.dtype.hasobject:
            raise SnapshotError(
                f"snapshot array {name!r} must be a numpy array of numbers, got "
                f"{getattr(a, 'dtype', type(a).__name__)}"
            )
    named: dict[str, Any] = dict(arrays)
    if {"file", "allow_pickle"} & set(named):
        raise SnapshotError("snapshot arrays cannot be named 'file' or 'allow_pickle': rename them")
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **named)
    return buf.getvalue()


def write_snapshot(
    dir: str | os.PathLike[str],
    index: LiveIvfIndex,
    offsets: Mapping[tuple[str, int], int],
    meta: Mapping[str, Any],
    *,
    keep: int = 3,
    arrays: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write one snapshot atomically, then delete all but the `keep` newest; returns its path.

    `arrays` are stored in the same checksummed file and come back as `Snapshot.arrays`.
    Call it from the thread that owns the index (it serializes the live Faiss index).
    """
    if keep < 1:
        raise SnapshotError(f"snapshot.keep must be at least 1, got {keep}")
    arrays_bytes = _npz(arrays)
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    index_bytes, store_bytes = index.serialize()
    created_at = time.time()
    header = {
        "format": FORMAT,
        "version": index.version,
        "dim": index.dim,
        "metric": index.metric,
        "kind": index.cfg.kind,
        "nlist": index.cfg.nlist,
        "ntotal": index.ntotal,
        "created_at": created_at,
        "offsets": [[t, int(p), int(o)] for (t, p), o in sorted(offsets.items())],
        "meta": dict(meta),
        "index_bytes": int(index_bytes.size),
        "store_bytes": None if store_bytes is None else int(store_bytes.size),
        "arrays_bytes": len(arrays_bytes),
    }
    try:
        head = json.dumps(header, sort_keys=True).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise SnapshotError(f"snapshot meta must be JSON-able: {exc}") from None
    seq = 1 + max((_seq(p) for p in d.iterdir()), default=0)
    final = d / f"snapshot-{seq:012d}.annsnap"
    tmp = d / f".{final.name}.tmp"
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            parts: list[bytes | memoryview] = [MAGIC, _LEN.pack(len(head)), head, index_bytes.data]
            if store_bytes is not None:
                parts.append(store_bytes.data)
            if arrays_bytes:
                parts.append(arrays_bytes)
            for part in parts:
                digest.update(part)
                f.write(part)
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(d)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SnapshotError(f"cannot write snapshot {final}: {exc}") from exc
    for old in list_snapshots(d)[keep:]:
        old.unlink(missing_ok=True)
    for stray in d.glob(".snapshot-*.annsnap.tmp"):
        stray.unlink(missing_ok=True)
    logger.info(
        "wrote snapshot %s: %d ads, version %d, %d bytes",
        final,
        index.ntotal,
        index.version,
        final.stat().st_size,
    )
    return final


def _parse(data: bytes) -> tuple[dict[str, Any], memoryview, memoryview | None, memoryview]:
    if len(data) < len(MAGIC) + _LEN.size + _DIGEST:
        raise _Unusable(f"truncated: only {len(data)} bytes")
    if not data.startswith(MAGIC):
        raise _Unusable("not an annstream snapshot (bad magic bytes)")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise _Unusable("checksum mismatch (truncated or corrupted)")
    (head_len,) = _LEN.unpack_from(body, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    try:
        header = json.loads(body[start : start + head_len].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Unusable(f"bad header: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _Unusable(f"unknown snapshot format {header.get('format')!r}")
    view = memoryview(body)
    pos = start + head_len
    n_index = int(header["index_bytes"])
    n_store = header["store_bytes"]
    n_arrays = int(header.get("arrays_bytes") or 0)
    store_end = pos + n_index + (int(n_store) if n_store is not None else 0)
    end = store_end + n_arrays
    if end != len(body):
        raise _Unusable(f"header says {end} bytes but the body has {len(body)}")
    index_view = view[pos : pos + n_index]
    store_view = None if n_store is None else view[pos + n_index : store_end]
    return header, index_view, store_view, view[store_end:end]


def _arrays(view: memoryview) -> dict[str, np.ndarray]:
    if not len(view):
        return {}
    try:
        with np.load(io.BytesIO(view), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise _Unusable(f"the arrays do not load: {exc}") from None


def _read(p: Path, cfg: IndexConfig) -> Snapshot:
    try:
        header, index_view, store_view, arrays_view = _parse(p.read_bytes())
        dim, metric = int(header["dim"]), str(header["metric"])
        version, ntotal = int(header["version"]), int(header["ntotal"])
        offsets = {(str(t), int(part)): int(off) for t, part, off in header["offsets"]}
        meta, created_at = dict(header["meta"]), float(header["created_at"])
    except OSError as exc:
        raise _Unusable(f"cannot read: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise _Unusable(f"bad header: {exc!r}") from None
    if dim != cfg.dim or metric != cfg.metric:
        raise SnapshotError(
            f"snapshot {p} holds a {metric} index of dimension {dim} but the config says "
            f"{cfg.metric}, {cfg.dim}: fix index.* or move {p.parent} away"
        )
    try:
        index = LiveIvfIndex.deserialize(
            cfg,
            np.frombuffer(index_view, dtype="uint8"),
            None if store_view is None else np.frombuffer(store_view, dtype="uint8"),
            version=version,
        )
    except (RuntimeError, IndexStateError) as exc:
        raise _Unusable(f"the index does not load: {exc}") from None
    if index.ntotal != ntotal:
        raise _Unusable(f"{index.ntotal} ads but the header says {ntotal}")
    return Snapshot(p, index, offsets, meta, created_at, header, _arrays(arrays_view))


def read_snapshot(path: str | os.PathLike[str], cfg: IndexConfig) -> Snapshot:
    """Load and verify one snapshot; SnapshotError if it is unusable or built for another config."""
    p = Path(path)
    try:
        return _read(p, cfg)
    except _Unusable as exc:
        raise SnapshotError(f"snapshot {p} is unusable: {exc}") from None


def load_latest_snapshot(dir: str | os.PathLike[str], cfg: IndexConfig) -> Snapshot | None:
    """The newest usable snapshot in `dir`, skipping corrupt ones with a WARNING; None if none.

    A snapshot that is intact but built for another dimension or metric raises SnapshotError:
    silently starting empty would replay the topic into a config that does not match it.
    """
    for path in list_snapshots(dir):
        try:
            snap = _read(path, cfg)
        except _Unusable as exc:
            logger.warning(
                "snapshot %s is unusable (%s): falling back to the previous snapshot", path, exc
            )
            continue
        logger.info(
            "loaded snapshot %s: %d ads, version %d", path, snap.index.ntotal, snap.index.version
        )
        return snap
    return None


class SnapshotPolicy:
    """Says when a snapshot is due: every `every_s` seconds or `every_events` events, first wins.

    A non-positive `every_s` or `every_events` disables that trigger.
    """

    def __init__(self, cfg: SnapshotConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._cfg = cfg
        self._clock = clock
        self._since = clock()
        self.events = 0

    def record(self, events: int) -> None:
        """Count events applied to the index since the last snapshot."""
        self.events += events

    def due(self) -> bool:
        if self._cfg.every_events > 0 and self.events >= self._cfg.every_events:
            return True
        return self._cfg.every_s > 0 and self._clock() - self._since >= self._cfg.every_s

    def written(self) -> None:
        """Restart both counters after a snapshot was written."""
        self._since = self._clock()
        self.events = 0
