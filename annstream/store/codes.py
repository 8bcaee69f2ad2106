"""Which store failures are worth retrying and which refuse a record for good: the one table.

A retryable failure may succeed later with the same request: a timeout, a lost connection, a
busy key, a namespace past stop-writes (nsup or an operator frees space), a locked or full
SQLite file. The store reports such rows as `failed` (or raises StoreUnavailableError when
nothing could be done) and the caller retries them. A permanent failure is refused again
whatever the wait: a record over `max-record-size`, a record of another set at the key's
digest, a bad parameter. The store reports such rows as `permanent`; retrying them would
stall the service forever, so the caller reports them and moves on.

Aerospike codes not in the tables: a server code (> 0) is permanent (a retry loop on a code
nobody classified could pause the service forever), a client code (< 0) is retryable (the
client failed before the server decided anything).
"""

from __future__ import annotations

import sqlite3

__all__ = [
    "FILTERED_OUT",
    "FORBIDDEN",
    "KEY_BUSY",
    "NOT_FOUND",
    "OK",
    "PARAMETER",
    "RECORD_TOO_BIG",
    "SERVER_FULL",
    "describe",
    "is_retryable",
    "sqlite_is_retryable",
]

OK, NOT_FOUND, PARAMETER, SERVER_FULL, RECORD_TOO_BIG, KEY_BUSY = 0, 2, 4, 8, 13, 14
FORBIDDEN, FILTERED_OUT = 22, 27

# code: (name, retryable, what it means for a neighbour record)
AEROSPIKE_CODES: dict[int, tuple[str, bool, str]] = {
    -16: ("BATCH_FAILED", True, "the batch did not complete"),
    -15: ("NO_RESPONSE", True, "no response: the write may or may not have landed"),
    -14: ("MAX_ERROR_RATE", True, "the client's error-rate circuit breaker is open"),
    -12: ("MAX_RETRIES_EXCEEDED", True, "the client gave up retrying"),
    -11: ("ASYNC_QUEUE_FULL", True, "the client's queue is full"),
    -10: ("CONNECTION", True, "connection to the node failed"),
    -9: ("TLS", True, "TLS handshake failed"),
    -8: ("INVALID_NODE", True, "no node serves the key's partition (node down or leaving)"),
    -7: ("NO_MORE_CONNECTIONS", True, "the client's connection pool is exhausted"),
    -6: ("ASYNC_CONNECTION", True, "async connection failed"),
    -5: ("CLIENT_ABORT", False, "the client aborted the request"),
    -4: ("INVALID_HOST", False, "the host in the store URL is not valid"),
    -2: ("PARAM", False, "the client refused a parameter"),
    -1: ("CLIENT", True, "client error (e.g. connecting before the cluster formed)"),
    1: ("SERVER_ERROR", True, "unknown server failure"),
    3: ("GENERATION", False, "generation check failed"),
    4: (
        "PARAMETER",
        False,
        "the server refused a parameter: a record of another set at this key's digest, "
        "or a TTL over 315,360,000 s (10 years)",
    ),
    5: ("RECORD_EXISTS", False, "record already exists"),
    6: ("BIN_EXISTS", False, "bin already exists"),
    7: ("CLUSTER_CHANGE", True, "the cluster is changing"),
    8: (
        "SERVER_FULL",
        True,
        "the namespace is past its stop-writes limit (memory or disk full): free space or "
        "raise the limit",
    ),
    9: ("TIMEOUT", True, "server timeout: the write may or may not have landed"),
    10: ("ALWAYS_FORBIDDEN", False, "operation always forbidden"),
    11: ("UNAVAILABLE", True, "the partition is unavailable"),
    12: ("BIN_TYPE", False, "a bin of another type is stored (not a neighbour record)"),
    13: (
        "RECORD_TOO_BIG",
        False,
        "the record is over the namespace's max-record-size (1 MiB by default): lower "
        "refresh.k + margin or drop the campaign/advertiser ids",
    ),
    14: ("KEY_BUSY", True, "too many concurrent writes to this key"),
    15: ("SCAN_ABORTED", False, "scan aborted"),
    16: ("UNSUPPORTED", False, "the server does not support this request"),
    17: ("BIN_NOT_FOUND", False, "bin not found"),
    18: ("DEVICE_OVERLOAD", True, "the storage device cannot keep up"),
    19: ("KEY_MISMATCH", False, "key mismatch"),
    20: ("NAMESPACE_NOT_FOUND", False, "the namespace does not exist"),
    21: ("BIN_NAME", False, "bin name too long or too many bins"),
    22: ("FORBIDDEN", False, "forbidden (a TTL without nsup-period, or set stop-writes)"),
    23: ("ELEMENT_NOT_FOUND", False, "element not found"),
    24: ("ELEMENT_EXISTS", False, "element exists"),
    25: ("ENTERPRISE_ONLY", False, "needs Aerospike Enterprise"),
    26: ("OP_NOT_APPLICABLE", False, "operation not applicable"),
    27: ("FILTERED_OUT", False, "the filter expression refused the record"),
    28: ("LOST_CONFLICT", True, "lost a conflict (XDR)"),
    32: ("XDR_KEY_BUSY", True, "XDR is shipping this key"),
    120: ("MRT_BLOCKED", True, "a transaction holds the record"),
    150: ("BATCH_DISABLED", False, "batch requests are disabled on the server"),
    151: ("BATCH_MAX_REQUESTS", True, "too many batch requests in flight"),
    152: ("BATCH_QUEUES_FULL", True, "the server's batch queues are full"),
}


def is_retryable(code: int) -> bool:
    """Whether a request that got Aerospike result `code` may succeed if sent again."""
    entry = AEROSPIKE_CODES.get(code)
    return entry[1] if entry is not None else code < 0


def describe(code: int, *, in_doubt: bool = False) -> str:
    """`result 13 RECORD_TOO_BIG (permanent): ...`: the reason kept per row."""
    name, _, meaning = AEROSPIKE_CODES.get(code, ("UNKNOWN", False, "unclassified result"))
    kind = "retryable" if is_retryable(code) else "permanent"
    doubt = ", in doubt" if in_doubt else ""
    return f"result {code} {name} ({kind}{doubt}): {meaning}"


# SQLite primary result codes worth a retry: busy/locked, out of memory, interrupted, I/O
# error, disk full, cannot open (file moved, too many files), WAL protocol, schema changed,
# read-only (a remounted file system). Anything else (corrupt file, not a database,
# constraint, no such table) is permanent.
_SQLITE_RETRYABLE = frozenset({5, 6, 7, 8, 9, 10, 13, 14, 15, 17})


def sqlite_is_retryable(exc: sqlite3.Error) -> bool:
    """Whether an sqlite3 error may go away by itself (a lock, an I/O error, a full disk)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return (code & 0xFF) in _SQLITE_RETRYABLE
    return isinstance(exc, sqlite3.OperationalError)
