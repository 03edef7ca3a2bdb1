#!/usr/bin/env bash
# End-to-end demo on a fresh machine: starts (or installs) Redis and PostgreSQL, builds ecst,
# publishes the sample athletes stream (out of order, with a duplicate, a delete and a late
# update after it, and one poison entry), runs the example pipeline until it has drained and
# prints the replica; then runs the fan-out example into Redis and Postgres and prints both;
# then the producer side: an athletes table written together with its outbox, the relay
# publishing the outbox, the worker replicating it, and the snapshot endpoint serving it; and a
# new consumer bootstrapping from that endpoint, reconciled against the source.
set -euo pipefail
cd "$(dirname "$0")/.."
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
# The "does not exist, skipping" notices of the resets below are not news.
export PGOPTIONS="${PGOPTIONS:--c client_min_messages=warning}"
# The demo runs on one Redis; the local Redis Cluster is for the cluster tests.
ECST_SKIP_CLUSTER=1 scripts/services.sh

echo "== building ecst (release; about 10 minutes on 2 cores the first time)"
# No --quiet: a first build is long, and cargo's progress shows it is working.
cargo build --release --locked -p ecst
ecst=target/release/ecst
stream=athletes.athlete-updated.v1
rcli() { redis-cli -u "$REDIS_URL" "$@"; }

echo "== resetting the demo stream and replica"
rcli DEL "$stream" "$stream.dlq" athlete:ath-1 athlete:ath-2 athlete:ath-3 ecst:tombstone:athlete:ath-3 >/dev/null

echo "== the pipeline"
$ecst validate examples/athletes.yaml
$ecst graph examples/athletes.yaml

echo "== publishing examples/athletes.ndjson and one entry that is not JSON"
$ecst publish --stream "$stream" --file examples/athletes.ndjson
rcli XADD "$stream" '*' v 'not json at all' >/dev/null

echo "== running the worker until the stream is drained"
$ecst run examples/athletes.yaml --drain

for id in ath-1 ath-2 ath-3; do
  echo "== HGETALL athlete:$id"
  rcli HGETALL "athlete:$id"
done
echo "== tombstone of ath-3 (deleted at version 9; the late version 8 did not resurrect it)"
rcli GET ecst:tombstone:athlete:ath-3
echo "== dead-letter stream $stream.dlq"
rcli XRANGE "$stream.dlq" - + | grep -A1 -E '^(error|source_id)$' | grep -v -- '--'
echo "== pending in the group (0 = every entry acked after commit)"
rcli XPENDING "$stream" rankings.athletes-replica.v1 | head -n 1

echo
echo "== fan-out: the same stream into a Redis card, a Postgres table and an active-only view"
psql "$DATABASE_URL" -q -c 'DROP TABLE IF EXISTS athlete_replica, athlete_replica_tombstones'
rcli DEL athlete:active:ath-1 athlete:active:ath-2 athlete:active:ath-3 >/dev/null
$ecst graph examples/athletes-fanout.yaml
$ecst run examples/athletes-fanout.yaml --drain
echo "== SELECT * FROM athlete_replica"
psql "$DATABASE_URL" -c 'SELECT athlete_id, source_version, display_name, status, source_updated_at, replicated_at FROM athlete_replica ORDER BY athlete_id'
echo "== the active-only view (ath-2 retired, ath-3 deleted: only ath-1 is left)"
rcli --scan --pattern 'athlete:active:*'
echo "== freshness, the seed's query over the table"
psql "$DATABASE_URL" -c "SELECT EXTRACT(EPOCH FROM (now() - max(source_updated_at)))::bigint AS source_age_seconds, EXTRACT(EPOCH FROM (now() - max(replicated_at)))::numeric(10,3) AS replicated_age_seconds, EXTRACT(EPOCH FROM (max(replicated_at) - max(source_updated_at)))::bigint AS apply_lag_seconds FROM athlete_replica"

echo
echo "== producer side: the athletes table and its outbox, written in one transaction"
psql "$DATABASE_URL" -q -c 'DROP TABLE IF EXISTS athletes, ecst_outbox, ecst_outbox_dead_letters'
rcli DEL athlete:ath-4 >/dev/null
$ecst outbox install
psql "$DATABASE_URL" -q -f examples/producer.sql
psql "$DATABASE_URL" -c 'SELECT id, aggregate_id, aggregate_version, payload->>'"'"'status'"'"' AS status FROM ecst_outbox ORDER BY id'

echo "== the relay publishes the outbox (then is stopped with SIGTERM)"
$ecst validate examples/relay.yaml
$ecst relay examples/relay.yaml &
relay_pid=$!
for _ in $(seq 1 100); do
  left="$(psql "$DATABASE_URL" -Atc 'SELECT count(*) FROM ecst_outbox')"
  [ "$left" = "0" ] && break
  sleep 0.1
done
kill -TERM "$relay_pid"; wait "$relay_pid"
echo "outbox rows left: $left"
echo "== the worker replicates them: athlete:ath-4 at version 2, suspended; no phantom"
$ecst run examples/athletes.yaml --drain
rcli HGETALL athlete:ath-4
rcli EXISTS athlete:ath-phantom

echo "== the snapshot endpoint a new consumer bootstraps from"
export ECST_SNAPSHOT_LISTEN="${ECST_SNAPSHOT_LISTEN:-127.0.0.1:18081}"
$ecst snapshot serve examples/snapshot.yaml &
snapshot_pid=$!
for _ in $(seq 1 100); do
  curl -fsS "http://$ECST_SNAPSHOT_LISTEN/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
echo "GET /snapshot/athletes?limit=10"
curl -fsS "http://$ECST_SNAPSHOT_LISTEN/snapshot/athletes?limit=10"

echo
echo "== a new consumer (search) bootstraps from that endpoint, then streams"
rcli DEL search:athlete:ath-4 "ecst:bootstrap:$stream:search.athletes-replica.v1:progress" >/dev/null
rcli XGROUP DESTROY "$stream" search.athletes-replica.v1 >/dev/null
$ecst validate examples/athletes-bootstrap.yaml
$ecst run examples/athletes-bootstrap.yaml --drain
rcli HGETALL search:athlete:ath-4
echo "== reconcile: the replica against the source (exit 0 = in sync)"
$ecst reconcile examples/athletes-bootstrap.yaml
echo "== someone corrupts the replica by hand; reconcile finds it, --repair fixes it"
rcli HSET search:athlete:ath-4 status active >/dev/null
$ecst reconcile examples/athletes-bootstrap.yaml || echo "(exit $?: drift found)"
$ecst reconcile examples/athletes-bootstrap.yaml --repair || echo "(exit $?: drift found and repaired)"
$ecst reconcile examples/athletes-bootstrap.yaml
kill -TERM "$snapshot_pid"; wait "$snapshot_pid"
