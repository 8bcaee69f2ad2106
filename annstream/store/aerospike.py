"""The production neighbour store: one Aerospike record per query, written with `batch_write`.

Stale-write guard: every write carries the filter expression
`not bin_exists("v") or int_bin("v") < <new version>` and replaces the whole record
(CREATE_OR_REPLACE). A real server evaluates the filter atomically with the write under the
record lock; a write that fails it answers FILTERED_OUT (27), reported as `stale`. The
filter is true for an absent record, whether or not the server evaluates filters on writes
that create a record.

Failures are handled record by record: rows that time out, are in doubt or hit a transient
server error are retried (bounded, with exponential backoff); retrying is safe because a
replay of a write that did land is filtered out as stale. A namespace that refuses TTLs
(result 22, no nsup-period) raises StoreConfigError; an unreachable cluster raises
StoreUnavailableError.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import aerospike
import numpy as np
import numpy.typing as npt
from aerospike_helpers.batch.records import BatchRecords, Write
from aerospike_helpers.operations import operations

from annstream.config import StoreConfig
from annstream.errors import StoreConfigError, StoreError, StoreUnavailableError
from annstream.store.base import as_query_ids, check_ttl
from annstream.store.record import (
    BIN_VERSION,
    LookupResult,
    NeighbourLists,
    UpsertResult,
    lookup_result,
    pack_records,
)

__all__ = ["AerospikeStore", "stale_guard"]

logger = logging.getLogger(__name__)

AerospikeError: type[Exception] = aerospike.exception.AerospikeError  # type: ignore[attr-defined]
OK, NOT_FOUND, FORBIDDEN, FILTERED_OUT = 0, 2, 22, 27
# No response, timeouts, connection and client errors, server busy / overloaded / migrating:
# worth a retry. -15 is what a record gets when its batch never reached a node.
RETRYABLE = frozenset({-15, -12, -11, -10, -8, -7, -6, -1, 1, 7, 9, 11, 14, 18})
_EXP_OR, _EXP_NOT, _EXP_BIN_EXISTS, _EXP_LT, _EXP_BIN, _EXP_VAL, _EXP_END = (
    17, 18, 83, 5, 81, 200, 150,
)  # fmt: skip
_INT = 2


def stale_guard(version: int) -> list[tuple[Any, ...]]:
    """The compiled filter `Or(Not(BinExists("v")), LT(IntBin("v"), version))`.

    Built directly (same tuples as aerospike_helpers.expressions' compile()) because one is
    needed per record and compiling the helper objects costs more than the write itself.
    """
    return [
        (_EXP_OR, None, None, 3),
        (_EXP_NOT, None, None, 1),
        (_EXP_BIN_EXISTS, 1, {"bin": BIN_VERSION}, 0),
        (_EXP_LT, None, None, 2),
        (_EXP_BIN, _INT, {"bin": BIN_VERSION}, 0),
        (_EXP_VAL, None, {"val": version}, 0),
        (_EXP_END, 0, {}, 0),
    ]


def _answered(rec: Any) -> bool:
    """A batch row the server answered carries the key's digest back."""
    record = getattr(rec, "record", None)
    return record is not None and record[0] is not None and record[0][3] is not None


def _code(exc: BaseException) -> int:
    code = getattr(exc, "code", None)
    return int(code) if isinstance(code, int) else -1


class AerospikeStore:
    """Neighbour lists in `namespace`/`set_name` of an Aerospike cluster."""

    def __init__(
        self,
        hosts: list[tuple[str, int]],
        namespace: str,
        set_name: str,
        cfg: StoreConfig | None = None,
        *,
        url: str = "",
    ) -> None:
        self.cfg = cfg or StoreConfig()
        self.namespace = namespace
        self.set_name = set_name
        self.url = url or f"aerospike://{hosts[0][0]}:{hosts[0][1]}/{namespace}/{set_name}"
        timeout = self.cfg.timeout_ms
        config: dict[str, Any] = {
            "hosts": hosts,
            "policies": {
                "read": {"total_timeout": timeout, "max_retries": 0},
                "write": {"total_timeout": timeout, "max_retries": 0},
                "batch": {"total_timeout": timeout, "max_retries": 0},
                "batch_write": {"key": aerospike.POLICY_KEY_SEND},
            },
        }
        if self.cfg.user:
            config["user"], config["password"] = self.cfg.user, self.cfg.password
        if self.cfg.tls_name or self.cfg.tls_cafile:
            config["tls"] = {"enable": True}
            if self.cfg.tls_cafile:
                config["tls"]["cafile"] = self.cfg.tls_cafile
            if self.cfg.tls_name:
                config["hosts"] = [(h, p, self.cfg.tls_name) for h, p in hosts]
        self._client = self._connect(config)

    def _connect(self, config: dict[str, Any]) -> Any:
        """A connected client; retried with backoff (a fresh node refuses for ~2 s)."""
        for attempt in range(self.cfg.retries + 1):
            try:
                return aerospike.client(config)
            except AerospikeError as exc:
                if attempt == self.cfg.retries:
                    raise StoreUnavailableError(
                        f"cannot connect to Aerospike at {self.url} after {attempt + 1} tries: "
                        f"{exc}",
                        retry_after=max(self.cfg.retry_backoff_s, 1.0),
                    ) from exc
                time.sleep(self._backoff(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def _backoff(self, attempt: int) -> float:
        return float(self.cfg.retry_backoff_s * 2**attempt)

    def _key(self, query_id: int) -> tuple[str, str, int]:
        return (self.namespace, self.set_name, query_id)

    def upsert(self, lists: NeighbourLists, ttl_s: int | None = None) -> UpsertResult:
        ttl = check_ttl(self.cfg.ttl_s if ttl_s is None else ttl_s, "upsert")
        n = len(lists)
        stored, stale, failed = (np.zeros(n, dtype=bool) for _ in range(3))
        errors: dict[int, str] = {}
        qids, versions = lists.query_ids.tolist(), lists.versions.tolist()
        base_policy: dict[str, Any] = {
            "exists": aerospike.POLICY_EXISTS_CREATE_OR_REPLACE,
            "key": aerospike.POLICY_KEY_SEND,
            "ttl": ttl,
        }
        writes = [
            Write(
                self._key(qids[i]),
                [operations.write(name, value) for name, value in bins.items()],
                policy={**base_policy, "expressions": stale_guard(versions[i])},
            )
            for i, bins in enumerate(pack_records(lists))
        ]
        pending = list(range(n))
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(self._backoff(attempt - 1))
            batch = BatchRecords([writes[i] for i in pending])
            try:
                self._client.batch_write(batch, {"total_timeout": self.cfg.timeout_ms})
            except AerospikeError as exc:
                # The whole batch failed (timeout, connection): every record is in doubt.
                reason = f"batch_write failed: {exc}"
                for i in pending:
                    errors[i] = reason
                if _code(exc) not in RETRYABLE:
                    raise StoreError(f"Aerospike {self.url}: {reason}") from exc
                logger.warning("Aerospike %s (attempt %d)", reason, attempt + 1)
                continue
            retry: list[int] = []
            whole = int(batch.result)
            for i, rec in zip(pending, batch.batch_records, strict=True):
                code = int(rec.result)
                if code == OK and whole != OK and not _answered(rec):
                    # client 19.x with no node left: rows never sent keep result 0
                    code = whole if whole in RETRYABLE else -1
                if code == OK:
                    stored[i] = True
                elif code == FILTERED_OUT:
                    stale[i] = True
                elif code == FORBIDDEN:
                    raise StoreConfigError(
                        f"Aerospike namespace {self.namespace!r} refused a write with TTL {ttl} "
                        "(result 22 FORBIDDEN): set nsup-period on the namespace or ttl_s = 0"
                    )
                elif code in RETRYABLE or rec.in_doubt:
                    retry.append(i)
                    errors[i] = f"result {code}{' (in doubt)' if rec.in_doubt else ''}"
                else:
                    failed[i] = True
                    errors[i] = f"result {code}"
            pending = retry
            if not pending:
                break
        failed[pending] = True
        if n and len(pending) == n:
            raise StoreUnavailableError(
                f"Aerospike {self.url}: no record written after {self.cfg.retries + 1} tries; "
                f"last error: {errors[pending[0]]}",
                retry_after=max(self.cfg.retry_backoff_s, 1.0),
            )
        return UpsertResult(
            stored, stale, failed, {int(i): errors[int(i)] for i in np.flatnonzero(failed)}
        )

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        """One client call with bounded retries on transient errors."""
        for attempt in range(self.cfg.retries + 1):
            try:
                return fn(*args)
            except AerospikeError as exc:
                if _code(exc) not in RETRYABLE:
                    raise StoreError(f"Aerospike {what} on {self.url} failed: {exc}") from exc
                if attempt == self.cfg.retries:
                    raise StoreUnavailableError(
                        f"Aerospike {what} on {self.url} failed {attempt + 1} times: {exc}",
                        retry_after=max(self.cfg.retry_backoff_s, 1.0),
                    ) from exc
                time.sleep(self._backoff(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def lookup(self, query_ids: npt.ArrayLike) -> LookupResult:
        qids = as_query_ids(query_ids)
        if qids.size == 0:
            return lookup_result(qids, [])
        keys = [self._key(q) for q in qids.tolist()]
        for attempt in range(self.cfg.retries + 1):
            batch = self._call("batch_read", self._client.batch_read, keys)
            whole = int(batch.result)
            if whole != OK and len(batch.batch_records) != len(keys):
                # client 19.x with no node left answers the batch with no rows at all
                codes = [whole if whole in RETRYABLE else -1] * len(keys)
            else:
                codes = [
                    # ... or with rows never sent, left at result 0 without a digest
                    (whole if whole in RETRYABLE else -1)
                    if int(rec.result) == OK and whole != OK and not _answered(rec)
                    else int(rec.result)
                    for rec in batch.batch_records
                ]
            transient = sorted({c for c in codes if c in RETRYABLE})
            if not transient:
                break
            if attempt == self.cfg.retries:
                raise StoreUnavailableError(
                    f"Aerospike batch_read on {self.url}: results {transient} after "
                    f"{attempt + 1} tries",
                    retry_after=max(self.cfg.retry_backoff_s, 1.0),
                )
            time.sleep(self._backoff(attempt))
        other = sorted(set(codes) - {OK, NOT_FOUND})
        if other:
            raise StoreError(f"Aerospike batch_read on {self.url}: results {other}")
        found = [
            rec.record[2] if code == OK and rec.record is not None else None
            for rec, code in zip(batch.batch_records, codes, strict=True)
        ]
        return lookup_result(qids, found)

    def _check_batch(self, what: str, batch: Any, ttl: int | None = None) -> None:
        codes = {int(rec.result) for rec in batch.batch_records} - {OK, NOT_FOUND}
        if FORBIDDEN in codes:
            raise StoreConfigError(
                f"Aerospike namespace {self.namespace!r} refused {what} with TTL {ttl} "
                "(result 22 FORBIDDEN): set nsup-period on the namespace or ttl_s = 0"
            )
        if codes & RETRYABLE:
            raise StoreUnavailableError(
                f"Aerospike {what} on {self.url}: results {sorted(codes)}",
                retry_after=max(self.cfg.retry_backoff_s, 1.0),
            )
        if codes:
            raise StoreError(f"Aerospike {what} on {self.url}: results {sorted(codes)}")

    def remove(self, query_ids: npt.ArrayLike) -> None:
        keys = [self._key(q) for q in as_query_ids(query_ids).tolist()]
        if keys:
            self._check_batch("remove", self._call("batch_remove", self._client.batch_remove, keys))

    def expire(self, query_ids: npt.ArrayLike, ttl_s: int) -> None:
        ttl = check_ttl(ttl_s, "expire")
        keys = [self._key(q) for q in as_query_ids(query_ids).tolist()]
        if not keys:
            return
        batch = self._call(
            "batch_operate", self._client.batch_operate, keys, [operations.touch()], {}, {}, ttl
        )
        self._check_batch("expire", batch, ttl)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> AerospikeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
