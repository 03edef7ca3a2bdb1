#!/usr/bin/env bash
# Throughput of 1 vs N `ecst run` workers draining one workload into one Postgres table
# (examples/bench-postgres.yaml), for each ecst binary given: e.g. one built before a change
# and one after. The workload (bench's shape: versions shuffled in windows of 1000, duplicates,
# deletes at the last version) is published once; every run drains it with a fresh group into
# a fresh table, checks that the table then holds exactly the live aggregates, and drops it.
#
#   scripts/bench-pg-workers.sh [ECST_BINARY ...]     (default: target/release/ecst)
#
#   WORKERS="1 3"   worker counts to run
#   AGGREGATES=50000 VERSIONS=8 DUPLICATES=0.05 DELETES=0.10   the workload
#   BATCH=1000      the pipeline's source.batch_size
#   REPEAT=3        rounds; each round runs every binary and worker count once, in turn
#   SPLIT=0         0: the N workers are one consumer group on one stream.
#                   1: worker i of N reads its own stream, holding the aggregates whose key
#                   bucket (fnv1a_32(aggregateId) mod 1024) mod N is i: workers that own
#                   different partitions of a partitioned stream (a partition count dividing
#                   1024), with one stream per worker standing in for its partitions.
#   REDIS_URL       default redis://127.0.0.1:6379
#   DATABASE_URL    default postgres://postgres@127.0.0.1:5432/postgres
#
# Prints one line per run (seconds, events/s, and how many of the sink's Postgres backends
# were, on average, waiting on an advisory lock) and the median events/s per binary and count.
set -euo pipefail
cd "$(dirname "$0")/.."

export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
WORKERS="${WORKERS:-1 3}"
AGGREGATES="${AGGREGATES:-50000}"
VERSIONS="${VERSIONS:-8}"
DUPLICATES="${DUPLICATES:-0.05}"
DELETES="${DELETES:-0.10}"
BATCH="${BATCH:-1000}"
REPEAT="${REPEAT:-3}"
SPLIT="${SPLIT:-0}"
BINARIES=("$@")
[ ${#BINARIES[@]} -gt 0 ] || BINARIES=(target/release/ecst)
most=$(printf '%s\n' $WORKERS | sort -n | tail -1)

for workers in $WORKERS; do
  if [ "$SPLIT" = 1 ] && [ "$workers" -ne 1 ] && [ "$workers" -ne "$most" ]; then
    echo "SPLIT=1 runs 1 worker or $most (the most in WORKERS), not $workers" >&2; exit 2
  fi
done

run_id="pgw$$"
work="$(mktemp -d)"
stream="ecst.bench.$run_id"
cleanup() {
  for key in "$stream" $(seq -f "$stream.p%g" 0 $((most - 1))); do
    redis-cli -u "$REDIS_URL" DEL "$key" "$key.dlq" >/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

sed "s/batch_size: 1000/batch_size: $BATCH/" examples/bench-postgres.yaml >"$work/pipeline.yaml"
grep -q "batch_size: $BATCH\$" "$work/pipeline.yaml"

# The workload in one file, and split by key bucket into one file per worker of the most.
python3 - "$AGGREGATES" "$VERSIONS" "$DUPLICATES" "$DELETES" "$most" "$work" <<'EOF'
import json, random, sys
aggregates, versions = int(sys.argv[1]), int(sys.argv[2])
duplicates, deletes = float(sys.argv[3]), float(sys.argv[4])
most, work = int(sys.argv[5]), sys.argv[6]
def fnv1a_32(s):
    h = 0x811C9DC5
    for b in s.encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h
rng = random.Random(42)
deleted = [rng.random() < deletes for _ in range(aggregates)]
events = []
for v in range(1, versions + 1):
    order = list(range(aggregates))
    rng.shuffle(order)
    events += [(a, v) for a in order]
for i in range(0, len(events), 1000):
    window = events[i:i + 1000]
    rng.shuffle(window)
    events[i:i + 1000] = window
# Each duplicate lands up to a window after its original.
copies = {}
for _ in range(int(len(events) * duplicates)):
    at = rng.randrange(len(events))
    copies.setdefault(min(at + rng.randrange(1000), len(events)), []).append(events[at])
events = [e for i, original in enumerate(events + [None])
          for e in copies.get(i, []) + ([original] if original else [])]
at = "2026-11-25T10:00:00Z"
whole = open(f"{work}/events.ndjson", "w")
parts = [open(f"{work}/events.{i}.ndjson", "w") for i in range(most)]
for a, v in events:
    base = {"schemaVersion": 1, "eventId": f"ath-{a}-{v}", "occurredAt": at,
            "aggregateType": "athlete", "aggregateId": f"ath-{a}", "aggregateVersion": v}
    if deleted[a] and v == versions:
        base.update(eventType="athlete.deleted", payload=None, deleted=True)
    else:
        base.update(eventType="athlete.updated", payload={
            "athleteId": f"ath-{a}", "displayName": f"Athlete {a} v{v}", "countryCode": "GB",
            "weightClass": "lightweight", "status": "active", "updatedAt": at})
    line = json.dumps(base) + "\n"
    whole.write(line)
    parts[fnv1a_32(f"ath-{a}") % 1024 % most].write(line)
open(f"{work}/live", "w").write(str(aggregates - sum(deleted)))
EOF
events=$(wc -l <"$work/events.ndjson")
live=$(cat "$work/live")
publish() { "${BINARIES[0]}" publish --stream "$1" --file "$2" 2>/dev/null >/dev/null; }
publish "$stream" "$work/events.ndjson"
if [ "$SPLIT" = 1 ]; then
  for i in $(seq 0 $((most - 1))); do publish "$stream.p$i" "$work/events.$i.ndjson"; done
fi
echo "workload: $events events, $AGGREGATES aggregates x $VERSIONS versions ($live alive at the end), batch_size $BATCH, split $SPLIT" >&2

# How many of the sink's backends wait on an advisory lock, sampled every 50 ms until $1 exists.
sample_waits() {
  while [ ! -e "$1" ]; do
    echo "SELECT count(*) FILTER (WHERE wait_event = 'advisory'), count(*) FILTER (WHERE state = 'active') FROM pg_stat_activity WHERE application_name = 'ecst/bench-postgres/table';"
    sleep 0.05
  done | psql "$DATABASE_URL" -Atq -F ' ' |
    awk '{w += $1; a += $2; n++} END {if (n) printf "%.2f of %.2f", w / n, a / n}'
}

n=0
: >"$work/results"
for round in $(seq 1 "$REPEAT"); do
  for bin in "${BINARIES[@]}"; do
    for workers in $WORKERS; do
      n=$((n + 1))
      export ECST_BENCH_TABLE="ecst_bench_${run_id}_$n"
      sample_waits "$work/done-$n" >"$work/waits-$n" &
      sampler=$!
      start=$(date +%s.%N)
      pids=()
      for w in $(seq 0 $((workers - 1))); do
        from="$stream"
        [ "$SPLIT" = 1 ] && [ "$workers" -gt 1 ] && from="$stream.p$w"
        ECST_BENCH_STREAM="$from" ECST_BENCH_GROUP="$run_id.g$n" \
          "$bin" run "$work/pipeline.yaml" --drain --consumer "w$w" --metrics-addr off \
          2>"$work/worker-$n-$w.log" &
        pids+=($!)
      done
      for pid in "${pids[@]}"; do
        wait "$pid" || { echo "a worker failed:" >&2; tail -n 20 "$work"/worker-$n-*.log >&2; exit 1; }
      done
      end=$(date +%s.%N)
      touch "$work/done-$n"
      wait "$sampler"
      rows=$(psql "$DATABASE_URL" -Atqc "SELECT count(*) FROM $ECST_BENCH_TABLE")
      psql "$DATABASE_URL" -qc "DROP TABLE $ECST_BENCH_TABLE, ${ECST_BENCH_TABLE}_tombstones" >/dev/null
      pending=0
      for key in "$stream" $(seq -f "$stream.p%g" 0 $((most - 1))); do
        if [ "$(redis-cli -u "$REDIS_URL" EXISTS "$key")" = 1 ] &&
          redis-cli -u "$REDIS_URL" XINFO GROUPS "$key" | grep -qx "$run_id.g$n"; then
          pending=$((pending + $(redis-cli -u "$REDIS_URL" XPENDING "$key" "$run_id.g$n" | head -1)))
          redis-cli -u "$REDIS_URL" XGROUP DESTROY "$key" "$run_id.g$n" >/dev/null
        fi
      done
      if [ "$rows" != "$live" ] || [ "$pending" != "0" ]; then
        echo "wrong result: $rows rows (want $live), $pending pending" >&2; exit 1
      fi
      seconds=$(echo "$start $end" | awk '{printf "%.2f", $2 - $1}')
      rate=$(echo "$events $seconds" | awk '{printf "%.0f", $1 / $2}')
      echo "$bin workers=$workers ${seconds}s $rate events/s; waiting on advisory locks: $(cat "$work/waits-$n") active backends"
      echo "$bin $workers $rate" >>"$work/results"
    done
  done
done

echo "median events/s:"
for bin in "${BINARIES[@]}"; do
  for workers in $WORKERS; do
    median=$(awk -v b="$bin" -v w="$workers" '$1 == b && $2 == w {print $3}' "$work/results" |
      sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}')
    echo "  $bin workers=$workers $median"
  done
done
