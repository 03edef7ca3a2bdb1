#!/usr/bin/env bash
# Events/s and CPU per event of the postgres sink at several batch sizes: runs
# `ecst bench --sink postgres|both --json` on examples/bench-<sink>.yaml with each
# source.batch_size, while sampling the CPU time of the sink's own Postgres backends
# (application_name ecst/bench-<sink>/table, utime + stime from /proc/<pid>/stat). Postgres's
# background work (WAL writer, checkpointer, autovacuum) is not counted: the bench's ceiling
# runs on the same server meanwhile. The bench itself reports events/s, the worker's CPU (the
# bench process during the drain) and Redis's. Prints one line per run and the medians per
# binary and batch size. Give two binaries (one built before a change, one after) to compare.
#
#   scripts/bench-pg-apply.sh [ECST_BINARY ...]     (default: target/release/ecst)
#
#   SINK=postgres           or both
#   BATCHES="500 1000 5000" source.batch_size values
#   REPEAT=3                rounds; each runs every binary and batch size once, in turn
#   BENCH_ARGS=""           more `ecst bench` arguments (e.g. "--aggregates 50000")
#   DATABASE_URL            default postgres://postgres@127.0.0.1:5432/postgres
#
# The latency phase is skipped (--latency-seconds 0), so that the backends' CPU is the
# drain's. Postgres must run on this machine (its /proc is read).
set -euo pipefail
cd "$(dirname "$0")/.."

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
SINK="${SINK:-postgres}"
BATCHES="${BATCHES:-500 1000 5000}"
REPEAT="${REPEAT:-3}"
BENCH_ARGS="${BENCH_ARGS:-}"
BINARIES=("$@")
[ ${#BINARIES[@]} -gt 0 ] || BINARIES=(target/release/ecst)
case "$SINK" in postgres | both) ;; *) echo "SINK is postgres or both" >&2; exit 2 ;; esac
application="ecst/bench-$SINK/table"
tick=$(getconf CLK_TCK)

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Samples the sink's backends every 100 ms until $1 exists: "pid utime+stime" lines.
sample_backends() {
  while [ ! -e "$1" ]; do
    echo "SELECT pid FROM pg_stat_activity WHERE application_name = '$application';"
    sleep 0.1
  done | psql "$DATABASE_URL" -Atq | while read -r pid; do
    [ -n "$pid" ] || continue
    read -r line <"/proc/$pid/stat" 2>/dev/null || continue
    echo "$pid ${line##*) }"
  done | awk '{print $1, $13 + $14}'
}

n=0
: >"$work/results"
for round in $(seq 1 "$REPEAT"); do
  for bin in "${BINARIES[@]}"; do
    for batch in $BATCHES; do
      n=$((n + 1))
      pipeline="$work/pipeline-$batch.yaml"
      sed "s/batch_size: 1000/batch_size: $batch/" "examples/bench-$SINK.yaml" >"$pipeline"
      grep -q "batch_size: $batch\$" "$pipeline"
      sample_backends "$work/done-$n" >"$work/samples-$n" &
      sampler=$!
      # shellcheck disable=SC2086
      "$bin" bench --sink "$SINK" --pipeline "$pipeline" --latency-seconds 0 --json $BENCH_ARGS \
        >"$work/bench-$n.json" 2>"$work/bench-$n.log" ||
        { echo "the bench failed:" >&2; tail -n 20 "$work/bench-$n.log" >&2; exit 1; }
      touch "$work/done-$n"
      wait "$sampler"
      backends=$(awk '{if ($2 > m[$1]) m[$1] = $2} END {for (p in m) s += m[p]; printf "%.3f", s / '"$tick"'}' "$work/samples-$n")
      line=$(python3 - "$work/bench-$n.json" "$backends" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
events = r["events"]
print(f'{r["events_per_sec"]:.0f} {float(sys.argv[2]) * 1e6 / events:.1f} '
      f'{r["worker_cpu_us_per_event"]} {r["redis_cpu_us_per_event"]} {r["mismatches"]} {r["ceiling_events_per_sec"]:.0f}')
EOF
)
      read -r eps pg_us worker_us redis_us mismatches ceiling <<<"$line"
      [ "$mismatches" = 0 ] || { echo "wrong result: $mismatches mismatches" >&2; exit 1; }
      echo "$bin batch=$batch $eps events/s; µs per event: Postgres (sink backends) $pg_us, worker $worker_us, Redis $redis_us; Postgres ceiling $ceiling events/s"
      echo "$bin $batch $eps $pg_us $worker_us" >>"$work/results"
    done
  done
done

echo "medians: events/s; µs per event of Postgres (sink backends) and of the worker"
for bin in "${BINARIES[@]}"; do
  for batch in $BATCHES; do
    medians=$(for column in 3 4 5; do
      awk -v b="$bin" -v s="$batch" -v c="$column" '$1 == b && $2 == s {print $c}' "$work/results" |
        sort -g | awk '{v[NR] = $1} END {m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%s ", m}'
    done)
    echo "  $bin batch=$batch $medians"
  done
done
