#!/usr/bin/env bash
# Counts what Redis spends per event when one worker drains the bench's workload: instructions
# of a private redis-server run under callgrind. On a busy machine this count holds steady
# where CPU time does not. The callgrind counters are zeroed after the stream is written and
# dumped after the drain, so they cover reading, applying and acking only.
#
#   scripts/profile-redis.sh [EVENTS] [PIPELINE]   (defaults 20000 examples/bench.yaml)
#
# The pipeline must read ${ECST_BENCH_STREAM} and the other variables examples/bench.yaml reads,
# and have one `source:` line and its sinks' `type: redis_hash` at the usual indentation.
# Needs a build of ecst (ECST, default target/release/ecst), valgrind, python3 and
# redis-server. Starts its own redis-server on a free port and leaves its profile in
# target/profile-redis/callgrind.out, then prints the top functions and the commands Redis ran
# per event.
set -euo pipefail
cd "$(dirname "$0")/.."

EVENTS=${1:-20000}
PIPELINE=${2:-examples/bench.yaml}
ECST=${ECST:-target/release/ecst}
OUT=target/profile-redis
mkdir -p "$OUT"
command -v valgrind >/dev/null || { echo "valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
[ -x "$ECST" ] || { echo "$ECST is missing: cargo build --release -p ecst" >&2; exit 1; }

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
CLI="redis-cli -p $PORT"
valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.%p" -q \
  redis-server --port "$PORT" --save '' --appendonly no --dir "$OUT" >"$OUT/redis.log" 2>&1 &
REDIS=$!
trap 'kill "$REDIS" 2>/dev/null; wait "$REDIS" 2>/dev/null || true' EXIT
deadline=$((SECONDS + 60))
until $CLI ping >/dev/null 2>&1; do
  [ $SECONDS -lt $deadline ] || { cat "$OUT/redis.log" >&2; exit 1; }
  sleep 0.2
done
PID=$(pgrep -P "$REDIS" || echo "$REDIS")

# callgrind acts on a request only while the server runs: ping it until the request is done.
callgrind() {
  callgrind_control "$@" "$PID" >/dev/null &
  local control=$!
  while kill -0 "$control" 2>/dev/null; do $CLI ping >/dev/null; sleep 0.2; done
  wait "$control"
}

# The bench's event shape, as scripts/profile-worker.sh writes it.
sed -n '/^  python3 - "\$1" <<.EOF.$/,/^EOF$/p' scripts/profile-worker.sh | sed '1d;$d' >"$OUT/events.py"
python3 "$OUT/events.py" "$EVENTS" >"$OUT/events.ndjson"
# Valgrind slows Redis some 50 times: the pipeline's timeouts grow to match, so that no batch
# is written twice and no entry claimed.
sed -e 's/^source:$/source:\n  timeout: 600s\n  claim_idle: 3600s/' \
  -e 's/^\(    \)type: redis_hash$/&\n\1timeout: 600s/' "$PIPELINE" >"$OUT/pipeline.yaml"
export REDIS_URL=redis://127.0.0.1:$PORT
"$ECST" publish --stream ecst:profile --file "$OUT/events.ndjson" >/dev/null
$CLI config resetstat >/dev/null
callgrind -z
ECST_BENCH_STREAM=ecst:profile ECST_BENCH_GROUP=profile ECST_BENCH_PREFIX=ecst:profile: ECST_BENCH_PARTITIONS=1 \
  RUST_LOG=warn "$ECST" run --drain "$OUT/pipeline.yaml" --metrics-addr off >/dev/null 2>"$OUT/worker.log" \
  || { cat "$OUT/worker.log" >&2; exit 1; }
callgrind -d
PROFILE=$(ls -t "$OUT"/callgrind.* | head -1)
mv "$PROFILE" "$OUT/callgrind.out"
ir=$(grep -E '^(summary|totals):' "$OUT/callgrind.out" | head -1 | awk '{print $2}')
echo "redis-server: $((ir / EVENTS)) instructions per event ($EVENTS events, $PIPELINE)"
echo "commands per event (calls, and microseconds of wall time: valgrind slows these):"
$CLI info commandstats | tr -d '\r' | awk -F'[_:=,]' -v n="$EVENTS" \
  '/^cmdstat_/ && $4 / n >= 0.001 { printf "  %-12s %6.3f calls %8.2f us\n", $2, $4 / n, $6 / n }'
echo "top functions (inclusive instructions per event):"
callgrind_annotate --inclusive=yes --auto=no "$OUT/callgrind.out" 2>/dev/null \
  | grep -E 'Command|luaCallFunction|lua_pushlstring|processMultibulkBuffer|scriptCall|raxTryInsert|raxRemove' \
  | head -20 | awk -v n="$EVENTS" '{ gsub(",", "", $1); match($0, /[?]+:[^ ]+/); printf "  %8d  %s\n", $1 / n, substr($0, RSTART + 4, RLENGTH - 4) }'
