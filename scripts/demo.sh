#!/usr/bin/env bash
# End-to-end demo on a fresh machine: starts (or installs) Redis, builds ecst, publishes the
# sample athletes stream (out of order, with a duplicate, a delete and a late update after it,
# and one poison entry), runs the example pipeline until it has drained, and prints the replica.
set -euo pipefail
cd "$(dirname "$0")/.."
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
ECST_SKIP_POSTGRES=1 scripts/services.sh

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
