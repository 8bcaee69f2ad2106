#!/bin/sh
# Creates annstream's topics (the broker's auto-creation is off); safe to run again.
# The head-state changelog needs exactly as many partitions as the engagement topic.
set -eu

BOOTSTRAP="${BOOTSTRAP:-kafka:9092}"
ENGAGEMENT_PARTITIONS="${ENGAGEMENT_PARTITIONS:-6}"
AD_PARTITIONS="${AD_PARTITIONS:-3}"

create() {
	topic="$1"
	shift
	/opt/kafka/bin/kafka-topics.sh --bootstrap-server "$BOOTSTRAP" --create --if-not-exists \
		--replication-factor 1 --topic "$topic" "$@"
}

# Every replica rebuilds its whole ad index from this topic: keep the latest event per ad id.
create annstream.ads --partitions "$AD_PARTITIONS" --config cleanup.policy=compact
create annstream.engagements --partitions "$ENGAGEMENT_PARTITIONS" --config retention.ms=604800000
# Head-state snapshots are written at least daily; older records are never read again.
create annstream.head-state --partitions "$ENGAGEMENT_PARTITIONS" --config cleanup.policy=delete \
	--config retention.ms=604800000
create annstream.dead-letter --partitions 1 --config retention.ms=1209600000

/opt/kafka/bin/kafka-topics.sh --bootstrap-server "$BOOTSTRAP" --describe \
	--topic 'annstream\..*'
