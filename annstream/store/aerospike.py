"""The production neighbour store: one Aerospike record per query, written with `batch_write`.

Stale-write guard: every write carries the filter expression
`not bin_exists("v") or int_bin("v") < <new version>` and replaces the whole record
(CREATE_OR_REPLACE). A real server evaluates the filter atomically with the write under the
record lock; a write that fails it answers FILTERED_OUT (27), reported as `stale`. A real
server does not apply the filter to a write that creates the record (absent records are
always written), which the `not bin_exists` branch also says.

One attempt per call, results judged record by record through codes.py: rows that time out,
are in doubt or hit a transient error are `failed` (the caller retries them; a replay of a
write that did land is filtered out as stale), rows refused for good (record too big,
another set at the digest) are `permanent`. A namespace that refuses TTLs (result 22, no
nsup-period) raises StoreConfigError; an unreachable cluster, or every row failing
retryably (e.g. a namespace past stop-writes), raises StoreUnavailableError.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aerospike
import numpy as np
import numpy.typing as npt
from aerospike_helpers.batch.records import BatchRecords, Write
from aerospike_helpers.operations import operations

from annstream.config import StoreConfig
from annstream.errors import StoreConfigError, StoreError, StoreUnavailableError
from annstream.store.base import TtlArg, as_query_ids, check_ttl, row_ttls
from annstream.store.codes import (
    FILTERED_OUT,
    FORBIDDEN,
    NOT_FOUND,
    OK,
    describe,
    is_retryable,
)
from annstream.store.record import (
    BIN_VERSION,
    CORE_BINS,
    LookupResult,
    NeighbourLists,
    StoredList,
    UpsertResult,
    absent_list,
    lookup_result,
    lookup_result_of,
    pack_records,
    stored_list,
)

__all__ = ["AerospikeStore", "stale_guard"]

logger = logging.getLogger(__name__)

AerospikeError: type[Exception] = aerospike.exception.AerospikeError  # type: ignore[attr-defined]
_EXP_OR, _EXP_NOT, _EXP_BIN_EXISTS, _EXP_LT, _EXP_BIN, _EXP_VAL, _EXP_END = (
    17, 18, 83, 5, 81, 200, 150,
)  # fmt: skip
_INT = 2
_CORE_BINS = list(CORE_BINS)


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


class _Outcome:
    """Per-row outcomes of one upsert, filled chunk by chunk (disjoint rows per thread)."""

    def __init__(self, n: int) -> None:
        self.stored, self.stale, self.failed, self.permanent = (
            np.zeros(n, dtype=bool) for _ in range(4)
        )
        self.errors: dict[int, str] = {}
        self.forbidden: set[int] = set()
        self.fatal: StoreError | None = None

    def result(self) -> UpsertResult:
        return UpsertResult(self.stored, self.stale, self.failed, self.errors, self.permanent)


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
        self._pool: ThreadPoolExecutor | None = None

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
                        retry_after=self._retry_after,
                    ) from exc
                time.sleep(self.cfg.retry_backoff_s * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    @property
    def _retry_after(self) -> float:
        return max(self.cfg.retry_backoff_s, 1.0)

    def _key(self, query_id: int) -> tuple[str, str, int]:
        return (self.namespace, self.set_name, query_id)

    def _forbidden(self, what: str, ttls: set[int]) -> StoreConfigError:
        return StoreConfigError(
            f"Aerospike namespace {self.namespace!r} refused {what} with TTL "
            f"{', '.join(map(str, sorted(ttls)))} (result 22 FORBIDDEN): set nsup-period on "
            "the namespace or ttl_s = 0"
        )

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """One client call; a failure of the whole call becomes a StoreError by its code."""
        try:
            return fn(*args)
        except AerospikeError as exc:
            code = _code(exc)
            message = f"Aerospike {what} on {self.url}: {describe(code)}: {exc}"
            if is_retryable(code):
                raise StoreUnavailableError(message, retry_after=self._retry_after) from exc
            raise StoreError(message) from exc

    @staticmethod
    def _row_codes(batch: Any, n: int) -> list[tuple[int, bool]]:
        """(result, in doubt) per requested key, rows the client never sent included."""
        whole = int(batch.result)
        unsent = whole if is_retryable(whole) else -1
        if whole != OK and len(batch.batch_records) != n:
            # client 19.x with no node left answers the batch with no rows at all
            return [(unsent, False)] * n
        return [
            # ... or with rows never sent, left at result 0 without a digest
            (unsent, False)
            if int(rec.result) == OK and whole != OK and not _answered(rec)
            else (int(rec.result), bool(getattr(rec, "in_doubt", False)))
            for rec in batch.batch_records
        ]

    def upsert(self, lists: NeighbourLists, ttl_s: TtlArg = None) -> UpsertResult:
        """`batch_write` calls of at most `store.write_batch` records, `store.write_threads` at
        a time (the client releases the GIL), each within `store.timeout_ms`: one huge call
        would outlast any timeout. A call that fails as a whole fails its rows only."""
        n = len(lists)
        ttls = row_ttls(ttl_s, self.cfg.ttl_s, n, "upsert").tolist()
        outcome = _Outcome(n)
        if n == 0:
            return outcome.result()
        size = self.cfg.write_batch
        chunks = [(start, min(start + size, n)) for start in range(0, n, size)]
        if len(chunks) == 1 or self.cfg.write_threads == 1:
            for lo, hi in chunks:
                self._write_chunk(lists, ttls, lo, hi, outcome)
        else:
            pool = self._writers()
            for future in [
                pool.submit(self._write_chunk, lists, ttls, lo, hi, outcome) for lo, hi in chunks
            ]:
                future.result()
        if outcome.forbidden:
            raise self._forbidden("a write", outcome.forbidden)
        if outcome.fatal is not None:
            raise outcome.fatal
        if outcome.failed.all():
            raise StoreUnavailableError(
                f"Aerospike {self.url}: none of {n} records written: {outcome.errors[0]}",
                retry_after=self._retry_after,
            )
        return outcome.result()

    def _writers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.cfg.write_threads, "annstream-aerospike-write")
        return self._pool

    def _write_chunk(
        self, lists: NeighbourLists, ttls: list[int], lo: int, hi: int, out: _Outcome
    ) -> None:
        """One `batch_write` of rows lo..hi, classified into `out` (rows of a failed call are
        failed with its reason; a call refused for good keeps its error for the caller)."""
        part = lists.take(np.arange(lo, hi))
        qids, versions = part.query_ids.tolist(), part.versions.tolist()
        base_policy: dict[str, Any] = {
            "exists": aerospike.POLICY_EXISTS_CREATE_OR_REPLACE,
            "key": aerospike.POLICY_KEY_SEND,
        }
        batch = BatchRecords(
            [
                Write(
                    self._key(qids[i]),
                    [operations.write(name, value) for name, value in bins.items()],
                    policy={
                        **base_policy,
                        "ttl": ttls[lo + i],
                        "expressions": stale_guard(versions[i]),
                    },
                )
                for i, bins in enumerate(pack_records(part))
            ]
        )
        try:
            self._call(
                "batch_write",
                self._client.batch_write,
                batch,
                {"total_timeout": self.cfg.timeout_ms},
            )
        except StoreUnavailableError as exc:
            out.failed[lo:hi] = True
            out.errors.update(dict.fromkeys(range(lo, hi), str(exc)))
            return
        except StoreError as exc:
            out.fatal = exc
            return
        for i, (code, in_doubt) in enumerate(self._row_codes(batch, hi - lo), start=lo):
            if code == OK:
                out.stored[i] = True
            elif code == FILTERED_OUT:
                out.stale[i] = True
            elif code == FORBIDDEN:
                out.forbidden.add(ttls[i])
            elif in_doubt or is_retryable(code):
                out.failed[i] = True
                out.errors[i] = describe(code, in_doubt=in_doubt)
            else:
                out.permanent[i] = True
                out.errors[i] = describe(code)

    def lookup_one(self, query_id: int, *, metadata: bool = True) -> StoredList:
        """One key with the client's `get` (a batch of one costs about twice as much)."""
        qid = int(query_id)
        try:
            bins = self._client.get((self.namespace, self.set_name, qid))[2]
        except AerospikeError as exc:
            code = _code(exc)
            if code == NOT_FOUND:
                return absent_list(qid)
            message = f"Aerospike get on {self.url}: {describe(code)}: {exc}"
            if is_retryable(code):
                raise StoreUnavailableError(message, retry_after=self._retry_after) from exc
            if code < 0:  # the client refused the call itself, as a batch would fail
                raise StoreError(message) from exc
            logger.warning("Aerospike %s could not read query %d: %s", self.url, qid, message)
            return absent_list(qid, describe(code))
        return stored_list(qid, bins, metadata=metadata)

    def lookup(self, query_ids: npt.ArrayLike, *, metadata: bool = True) -> LookupResult:
        qids = as_query_ids(query_ids)
        n = qids.size
        if n == 0:
            return lookup_result(qids, [])
        if n == 1:
            return lookup_result_of(self.lookup_one(int(qids[0]), metadata=metadata))
        ns, set_name = self.namespace, self.set_name
        keys = [(ns, set_name, q) for q in qids.tolist()]
        bins = None if metadata else _CORE_BINS
        batch = self._call("batch_read", self._client.batch_read, keys, bins)
        records = batch.batch_records
        if int(batch.result) == OK and len(records) == n:
            codes = [r.result for r in records]
            if codes.count(OK) + codes.count(NOT_FOUND) == n:  # the common case: no row errors
                found = [
                    r.record[2] if c == OK else None for r, c in zip(records, codes, strict=True)
                ]
                return lookup_result(qids, found, metadata=metadata)
        return self._lookup_rows(qids, batch, metadata)

    def _lookup_rows(self, qids: npt.NDArray[np.int64], batch: Any, metadata: bool) -> LookupResult:
        """A batch lookup with rows in error: raise for transient ones, report the others."""
        codes = self._row_codes(batch, qids.size)
        transient = sorted({c for c, _ in codes if c not in (OK, NOT_FOUND) and is_retryable(c)})
        if transient:
            raise StoreUnavailableError(
                f"Aerospike batch_read on {self.url}: {describe(transient[0])}",
                retry_after=self._retry_after,
            )
        found: list[dict[str, Any] | None] = []
        errors: dict[int, str] = {}
        for i, (rec, (code, _)) in enumerate(zip(batch.batch_records, codes, strict=True)):
            if code == OK and rec.record is not None:
                found.append(rec.record[2])
                continue
            found.append(None)
            if code not in (OK, NOT_FOUND):
                errors[i] = describe(code)
        if errors:
            first = next(iter(errors))
            logger.warning(
                "Aerospike %s could not read %d of %d records, e.g. query %d: %s",
                self.url,
                len(errors),
                qids.size,
                int(qids[first]),
                errors[first],
            )
        return lookup_result(qids, found, errors, metadata=metadata)

    def _check_batch(
        self, what: str, query_ids: list[int], batch: Any, ttl: int | None = None
    ) -> None:
        """Raise for what the caller must act on; log rows refused for good and go on."""
        codes = self._row_codes(batch, len(query_ids))
        bad = {c for c, _ in codes} - {OK, NOT_FOUND}
        if FORBIDDEN in bad:
            raise self._forbidden(what, {ttl if ttl is not None else 0})
        transient = sorted(c for c in bad if is_retryable(c))
        if transient:
            raise StoreUnavailableError(
                f"Aerospike {what} on {self.url}: {describe(transient[0])}",
                retry_after=self._retry_after,
            )
        refused = [(q, c) for q, (c, _) in zip(query_ids, codes, strict=True) if c in bad]
        if refused:
            logger.warning(
                "Aerospike %s on %s skipped %d records refused for good, e.g. query %d: %s",
                what,
                self.url,
                len(refused),
                refused[0][0],
                describe(refused[0][1]),
            )

    def remove(self, query_ids: npt.ArrayLike) -> None:
        qids = as_query_ids(query_ids).tolist()
        if qids:
            keys = [self._key(q) for q in qids]
            batch = self._call("batch_remove", self._client.batch_remove, keys)
            self._check_batch("remove", qids, batch)

    def expire(self, query_ids: npt.ArrayLike, ttl_s: int) -> None:
        ttl = check_ttl(ttl_s, "expire")
        qids = as_query_ids(query_ids).tolist()
        if not qids:
            return
        keys = [self._key(q) for q in qids]
        batch = self._call(
            "batch_operate", self._client.batch_operate, keys, [operations.touch()], {}, {}, ttl
        )
        self._check_batch("expire", qids, batch, ttl)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        self._client.close()

    def __enter__(self) -> AerospikeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
