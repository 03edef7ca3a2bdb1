#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
set -euo pipefail
cd "$(dirname "$0")/.."

export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
# The local Redis Cluster services.sh starts (3 masters + 3 replicas on 7001-7006).
export ECST_CLUSTER_URL="${ECST_CLUSTER_URL:-redis+cluster://127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

ECST_PROMTOOL=1 scripts/services.sh >/dev/null
if command -v promtool >/dev/null; then
  echo "== promtool check rules deploy/prometheus/alerts.yaml"
  promtool check rules deploy/prometheus/alerts.yaml
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
echo "== doc tests"
# No --quiet: this is the first build of the test profile, minutes long on a fresh clone.
cargo test --workspace --locked --doc
echo "== ecst test examples/*.yaml"
cargo build --locked -p ecst
# The examples' pipeline cases, with the debug binary (the tests below reuse its build), against
# the same Redis and Postgres (each case in a key prefix and schema of its own, removed
# afterwards). The bench examples' keys are written out in their cases, so their prefix must be
# the default.
env -u ECST_BENCH_PREFIX ECST_LOG=error target/debug/ecst test examples/*.yaml
# Last, so that the runner's summary line ends the output.
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
