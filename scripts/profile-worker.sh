#!/usr/bin/env bash
# Counts what one worker spends per event, steadily even on a busy machine: CPU instructions
# under callgrind (the same count for the same binary and input whatever else runs) and, for
# reference, user+system CPU time without it. Two stream sizes are drained and the difference
# divided by the difference in events, so start-up and shutdown cancel out.
#
#   scripts/profile-worker.sh [EVENTS_SMALL] [EVENTS_LARGE]   (defaults 20000 100000)
#
# Needs a release build (cargo build --release -p ecst), valgrind, python3 and the Redis at
# REDIS_URL (default redis://127.0.0.1:6379). Writes the callgrind profile of the large run to
# target/profile-worker/callgrind.out and prints its top functions.
set -euo pipefail
cd "$(dirname "$0")/.."

SMALL=${1:-20000}
LARGE=${2:-100000}
ECST=${ECST:-target/release/ecst}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
OUT=target/profile-worker
mkdir -p "$OUT"
command -v valgrind >/dev/null || { echo "valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
[ -x "$ECST" ] || { echo "$ECST is missing: cargo build --release -p ecst" >&2; exit 1; }

# The bench's event shape: 6 payload members of which the pipeline projects 4, versions
# shuffled within windows of 1000, 5% duplicated, 10% of aggregates deleted at their last version.
events() {
  python3 - "$1" <<'EOF'
import json, random, sys
n = int(sys.argv[1]); versions = 5; aggregates = max(1, n // versions)
rng = random.Random(42)
deleted = {a for a in range(aggregates) if rng.random() < 0.10}
evs = [(a, v) for v in range(1, versions + 1) for a in range(aggregates)]
evs += [evs[i] for i in rng.sample(range(len(evs)), len(evs) // 20)]
out = []
for start in range(0, len(evs), 1000):
    window = evs[start:start + 1000]; rng.shuffle(window); out += window
statuses = ["active", "retired", "suspended"]
for a, v in out[:n]:
    ident = f"ath-{a}"
    body = {"schemaVersion": 1, "eventId": f"{ident}-{v}", "occurredAt": "2026-11-25T10:00:00Z",
            "aggregateType": "athlete", "aggregateId": ident, "aggregateVersion": v}
    if a in deleted and v == versions:
        body.update(eventType="athlete.deleted", payload=None, deleted=True)
    else:
        body.update(eventType="athlete.updated", payload={"athleteId": ident,
            "displayName": f"Athlete {a} v{v}", "countryCode": "GB", "weightClass": "lightweight",
            "status": statuses[v % 3], "updatedAt": "2026-11-25T10:00:00Z"})
    print(json.dumps(body, separators=(",", ":")))
EOF
}

# Drains a fresh stream of $1 events with `ecst run --drain` under $2 (a command prefix).
drain() {
  local n=$1; shift
  local id="ecst:profile:$$:$n:$RANDOM"
  events "$n" > "$OUT/events.ndjson"
  "$ECST" publish --stream "$id" --file "$OUT/events.ndjson" >/dev/null 2>&1
  ECST_BENCH_STREAM=$id ECST_BENCH_GROUP=profile ECST_BENCH_PREFIX="$id:" ECST_BENCH_PARTITIONS=1 \
    RUST_LOG=warn "$@" "$ECST" run --drain examples/bench.yaml --metrics-addr off >/dev/null 2>"$OUT/worker.log" \
    || { cat "$OUT/worker.log" >&2; exit 1; }
  redis-cli -u "$REDIS_URL" --scan --pattern "*$id*" | xargs -r -n 1000 redis-cli -u "$REDIS_URL" unlink >/dev/null
}

cpu_seconds() { # user+system seconds of the worker alone, from /usr/bin/time
  drain "$1" /usr/bin/time -f "%U %S" -o "$OUT/time"
  awk '{print $1 + $2}' "$OUT/time"
}

instructions() { # instructions of `drain` under callgrind
  drain "$1" valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.$1.out" -q
  grep -E '^(summary|totals):' "$OUT/callgrind.$1.out" | head -1 | awk '{print $2}'
}

small_ir=$(instructions "$SMALL")
large_ir=$(instructions "$LARGE")
cp "$OUT/callgrind.$LARGE.out" "$OUT/callgrind.out"
small_cpu=$(cpu_seconds "$SMALL")
large_cpu=$(cpu_seconds "$LARGE")
python3 - "$SMALL" "$LARGE" "$small_ir" "$large_ir" "$small_cpu" "$large_cpu" <<'EOF'
import json, sys
s, l, si, li, sc, lc = map(float, sys.argv[1:])
print(json.dumps({
    "events_small": int(s), "events_large": int(l),
    "worker_instructions_per_event": round((li - si) / (l - s)),
    "worker_cpu_us_per_event": round((lc - sc) * 1e6 / (l - s), 2),
}))
EOF
callgrind_annotate --inclusive=no "$OUT/callgrind.out" 2>/dev/null | sed -n '/^Ir/,$p' | head -32
