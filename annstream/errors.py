"""The exception tree of annstream.

AnnstreamError
 +-- ConfigError            a setting is missing, unknown or of the wrong type
 +-- SchemaError            an Avro schema or the schema registry cannot be used
 +-- InvalidEventError      one event cannot be accepted (bad bytes, dimension, NaN, ...)
 +-- BrokerError            a Kafka broker (embedded or not) could not start or answer
 +-- IndexStateError        the live index was used wrongly (untrained, wrong dimension)
 +-- SnapshotError          no usable snapshot could be written or read
 +-- StoreError             the neighbour store refused or failed a request
      +-- StoreUnavailableError   the store cannot be reached now; retry later (backpressure)
      +-- StoreConfigError        the store refuses a setting (e.g. TTL without nsup-period)
"""

from __future__ import annotations

__all__ = [
    "AnnstreamError",
    "BrokerError",
    "ConfigError",
    "IndexStateError",
    "InvalidEventError",
    "SchemaError",
    "SnapshotError",
    "StoreConfigError",
    "StoreError",
    "StoreUnavailableError",
]


class AnnstreamError(Exception):
    """Base of every error annstream raises on purpose."""


class ConfigError(AnnstreamError, ValueError):
    """A setting is missing, unknown or has the wrong type; the message names it."""


class SchemaError(AnnstreamError):
    """An Avro schema file or the schema registry cannot be used."""


class InvalidEventError(AnnstreamError, ValueError):
    """One event cannot be accepted; `reason` is the short text sent to the dead-letter topic."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BrokerError(AnnstreamError):
    """A Kafka broker could not be reached in time, or the embedded one could not start."""


class IndexStateError(AnnstreamError):
    """The live index was used in a state that does not allow it (untrained, wrong dimension)."""


class SnapshotError(AnnstreamError):
    """No usable snapshot could be written or read."""


class StoreError(AnnstreamError):
    """The neighbour store refused or failed a request."""


class StoreUnavailableError(StoreError):
    """The store cannot be reached now; the caller should pause, retry later and not commit.

    `retry_after` is the suggested wait in seconds.
    """

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StoreConfigError(StoreError):
    """The store refuses a setting, e.g. a TTL on a namespace without nsup-period."""
