#!/bin/sh
# Thin events through the `fetch` stage against `ecst snapshot serve` on loopback: N athletes
# in a Postgres table, N thin events (one per athlete) on a fresh stream, one worker draining
# decode -> version_filter -> fetch -> project -> redis_hash. Prints events/s of the drain.
#   scripts/bench-fetch.sh [N]          (ECST=target/release/ecst by default)
set -eu
N=${1:-20000}
ECST=${ECST:-target/release/ecst}
DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
PORT=${BENCH_FETCH_PORT:-18181}
RUN=bench_fetch_$$
DIR=$(mktemp -d)
STREAM="bench:fetch:$$"
export REDIS_URL ECST_METRICS_ADDR=off

psql -q "$DATABASE_URL" -c "CREATE TABLE $RUN (id text PRIMARY KEY, version bigint NOT NULL, display_name text, status text);
  INSERT INTO $RUN SELECT 'a' || g, 1 + g % 5, 'athlete ' || g, 'active' FROM generate_series(1, $N) g;"
cat > "$DIR/snapshot.yaml" <<YAML
listen: 127.0.0.1:$PORT
postgres: "$DATABASE_URL"
pool_size: 8
entities:
  athlete:
    table: $RUN
    payload: { displayName: display_name, status: status }
YAML
"$ECST" snapshot serve "$DIR/snapshot.yaml" 2>"$DIR/snapshot.log" &
SERVER=$!
cleanup() {
  kill "$SERVER" 2>/dev/null || true
  psql -q "$DATABASE_URL" -c "DROP TABLE IF EXISTS $RUN" || true
  redis-cli -u "$REDIS_URL" --scan --pattern "$STREAM*" | xargs -r redis-cli -u "$REDIS_URL" unlink >/dev/null
  rm -rf "$DIR"
}
trap cleanup EXIT
until curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null; do sleep 0.1; done

seq 1 "$N" | awk '{printf "{\"eventType\":\"athlete.changed\",\"occurredAt\":\"2026-11-24T10:00:00Z\",\"aggregateType\":\"athlete\",\"aggregateId\":\"a%d\",\"aggregateVersion\":%d}\n", $1, 1 + $1 % 5}' \
  | "$ECST" publish --stream "$STREAM" 2>/dev/null
cat > "$DIR/pipeline.yaml" <<YAML
name: bench-fetch
source: { stream: "$STREAM", group: bench, block: 100ms, batch_size: 500 }
stages:
  decode: { type: decode }
  latest: { type: version_filter, input: decode }
  fetch: { type: fetch, input: latest, url: "http://127.0.0.1:$PORT/snapshot", batch_size: 100, concurrency: 4 }
  athlete: { type: project, input: fetch, fields: { display_name: payload.displayName, status: payload.status } }
  cache: { type: redis_hash, input: athlete, key: "$STREAM:athlete:{aggregateId}", tombstone_prefix: "$STREAM:tombstone:" }
YAML
START=$(date +%s.%N)
"$ECST" run "$DIR/pipeline.yaml" --drain 2>"$DIR/worker.log"
END=$(date +%s.%N)
CHECK=$(redis-cli -u "$REDIS_URL" hget "$STREAM:athlete:a$N" display_name)
[ "$CHECK" = "athlete $N" ] || { echo "replica check failed: $CHECK"; exit 1; }
awk -v n="$N" -v s="$START" -v e="$END" 'BEGIN { printf "%d thin events fetched and applied in %.2f s: %.0f events/s\n", n, e - s, n / (e - s) }'
