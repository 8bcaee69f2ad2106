"""Test helpers shipped with annstream: an in-memory Aerospike wire-protocol server."""

from annstream.testing.aerospike_server import AerospikeTestServer, Fault

__all__ = ["AerospikeTestServer", "Fault"]
