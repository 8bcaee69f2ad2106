#!/bin/sh
# Creates annstream's topics (the broker's auto-creation is off, and the service refuses to
# start on a missing topic unless kafka.create_topics = true); safe to run again.
# The head-state changelog needs exactly as many partitions as the engagement topic.
# Topic settings here are those of annstream.topics.TOPIC_CONFIGS (tests/unit/test_deploy.py).
set -eu

BOOTSTRAP="${BOOTSTRAP:-kafka:9092}"
ENGAGEMENT_PARTITIONS="${ENGAGEMENT_PARTITIONS:-6}"
AD_PARTITIONS="${AD_PARTITIONS:-3}"
REPLICATION="${REPLICATION:-1}"
# The results topic (kafka.results_topic): created only when named here too.
RESULTS_TOPIC="${RESULTS_TOPIC:-}"

create() {
	topic="$1"
	shift
	/opt/kafka/bin/kafka-topics.sh --bootstrap-server "$BOOTSTRAP" --create --if-not-exists \
		--replication-factor "$REPLICATION" --topic "$topic" "$@"
}

# Every replica rebuilds its whole ad index from this topic: keep the latest event per ad id.
create annstream.ads --partitions "$AD_PARTITIONS" --config cleanup.policy=compact
create annstream.engagements --partitions "$ENGAGEMENT_PARTITIONS" --config cleanup.policy=delete \
	--config retention.ms=604800000
# Head-state snapshots are written at least daily; older records are never read again.
create annstream.head-state --partitions "$ENGAGEMENT_PARTITIONS" --config cleanup.policy=delete \
	--config retention.ms=604800000
create annstream.dead-letter --partitions 1 --config cleanup.policy=delete \
	--config retention.ms=1209600000
# The latest neighbour list per query id (a tombstone once a query leaves the head set).
if [ -n "$RESULTS_TOPIC" ]; then
	create "$RESULTS_TOPIC" --partitions "$ENGAGEMENT_PARTITIONS" --config cleanup.policy=compact
fi

/opt/kafka/bin/kafka-topics.sh --bootstrap-server "$BOOTSTRAP" --describe \
	--topic 'annstream\..*'
