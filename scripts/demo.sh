#!/usr/bin/env bash
# End-to-end demo on a fresh machine: starts (or installs) Redis and PostgreSQL, builds ecst,
# publishes the sample athletes stream (out of order, with a duplicate, a delete and a late
# update after it, and one poison entry), runs the example pipeline until it has drained and
# prints the replica; then runs the fan-out example into Redis and Postgres and prints both.
set -euo pipefail
cd "$(dirname "$0")/.."
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
scripts/services.sh

echo "== building ecst (release)"
cargo build --release --locked --quiet -p ecst
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
