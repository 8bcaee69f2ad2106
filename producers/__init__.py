"""Producers of annstream events.

sources: files and the synthetic generator -> AdBatch / EngagementBatch
publish: batches -> keyed (id, 8-byte big-endian), event-time-stamped Kafka messages
replay:  historical events -> a topic, paced, resumable from a confirmed-delivery checkpoint
"""
