#!/usr/bin/env bash
# Makes sure a Redis (and, for the Postgres sink, a PostgreSQL) answers locally, installing them
# from the distribution's packages and starting them when they do not. Idempotent.
#   REDIS_URL     default redis://127.0.0.1:6379
#   DATABASE_URL  default postgres://postgres@127.0.0.1:5432/postgres
# and a local Redis Cluster (3 masters + 3 replicas on 127.0.0.1:7001-7006, no persistence) for
# the cluster tests; it prints ECST_CLUSTER_URL=... on stdout (`eval "$(scripts/services.sh)"`).
#   ECST_CLUSTER_PORT  its first port, default 7001 (the six nodes take it and the next five)
#   ECST_CLUSTER_DIR   its config files and logs, default /tmp/ecst-cluster
#   ECST_SKIP_CLUSTER  1 = do not start it
set -euo pipefail

log() { printf '[services] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*"; return 1; fi
}

apt_updated=""
apt_install() {
  if ! command -v apt-get >/dev/null; then
    log "no apt-get here: install $* with your package manager"; return 1
  fi
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_port() {
  for _ in $(seq 1 100); do port_open "$1" "$2" && return 0; sleep 0.1; done
  log "nothing answers on $1:$2"; return 1
}

# The demo asks the snapshot endpoint with curl.
if ! command -v curl >/dev/null; then
  log "installing curl"
  apt_install curl ca-certificates
fi

# promtool checks deploy/prometheus/alerts.yaml in the test suite (ECST_PROMTOOL=1 asks for it).
if [ "${ECST_PROMTOOL:-}" = "1" ] && ! command -v promtool >/dev/null; then
  log "installing promtool (Debian package prometheus; its service is not started)"
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    as_root sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d'
    policy=1
  fi
  apt_install --no-install-recommends prometheus || log "promtool could not be installed; the deploy tests still check the rules"
  if [ -n "$policy" ]; then as_root rm -f /usr/sbin/policy-rc.d; fi
fi

# The Redis TLS tests make their CA and certificates with the openssl command.
if ! command -v openssl >/dev/null; then
  log "installing openssl"
  apt_install openssl
fi

# The man page test renders `ecst man` with groff.
if ! command -v groff >/dev/null; then
  log "installing groff-base"
  apt_install groff-base
fi

# --- Redis -----------------------------------------------------------------------------
redis_url="${REDIS_URL:-redis://127.0.0.1:6379}"
redis_hostport="${redis_url#*://}"; redis_hostport="${redis_hostport##*@}"; redis_hostport="${redis_hostport%%/*}"
redis_host="${redis_hostport%%:*}"; redis_port="${redis_hostport##*:}"
[ "$redis_port" = "$redis_hostport" ] && redis_port=6379

# The fault tests start private redis-server instances, so the binary is needed either way.
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  log "installing redis-server and redis-tools"
  apt_install redis-server redis-tools
fi
if port_open "$redis_host" "$redis_port"; then
  log "Redis answers on $redis_host:$redis_port"
else
  log "starting redis-server on $redis_host:$redis_port"
  redis-server --daemonize yes --bind "$redis_host" --port "$redis_port" --save "" --appendonly no \
    --dir /tmp --logfile /tmp/ecst-redis.log
  wait_port "$redis_host" "$redis_port"
fi

# --- Redis Cluster -----------------------------------------------------------------------
# 3 masters + 3 replicas on loopback, the machine's redis-server, nothing persisted: a restart
# of the machine or a stale leftover just means a new cluster.
cluster_host=127.0.0.1
cluster_port="${ECST_CLUSTER_PORT:-7001}"
cluster_ports=()
for i in 0 1 2 3 4 5; do cluster_ports+=($((cluster_port + i))); done
cluster_dir="${ECST_CLUSTER_DIR:-/tmp/ecst-cluster}"
cluster_url="redis+cluster://$cluster_host:${cluster_ports[0]},$cluster_host:${cluster_ports[1]},$cluster_host:${cluster_ports[2]}"

# `CLUSTER INFO` of one node (empty when it does not answer within 2s).
cluster_info() { timeout 2 redis-cli -h "$cluster_host" -p "$1" cluster info 2>/dev/null | tr -d '\r' || true; }

# One node's view is healthy: state ok, every slot served, all six nodes known.
node_healthy() {
  local info; info="$(cluster_info "$1")"
  grep -qx 'cluster_state:ok' <<<"$info" &&
    grep -qx 'cluster_slots_ok:16384' <<<"$info" &&
    grep -qx "cluster_known_nodes:${#cluster_ports[@]}" <<<"$info"
}

cluster_healthy() {
  local port
  for port in "${cluster_ports[@]}"; do node_healthy "$port" || return 1; done
}

# Stops whatever cluster node answers on our ports (a half-started leftover) and forgets its
# state; a non-cluster server on one of them is someone else's and is left alone.
cluster_clean() {
  local port info
  for port in "${cluster_ports[@]}"; do
    port_open "$cluster_host" "$port" || continue
    info="$(timeout 2 redis-cli -h "$cluster_host" -p "$port" cluster info 2>&1 | tr -d '\r' || true)"
    if ! grep -q '^cluster_state:' <<<"$info"; then
      log "port $port is taken by something that is not a Redis Cluster node ($info); free it or set ECST_SKIP_CLUSTER=1"
      return 1
    fi
    log "stopping the leftover cluster node on $cluster_host:$port"
    timeout 5 redis-cli -h "$cluster_host" -p "$port" shutdown nosave >/dev/null 2>&1 || true
    for _ in $(seq 1 50); do port_open "$cluster_host" "$port" || break; sleep 0.1; done
    if port_open "$cluster_host" "$port"; then log "the node on $cluster_host:$port did not stop"; return 1; fi
  done
  rm -rf "$cluster_dir"
}

cluster_start() {
  local port
  mkdir -p "$cluster_dir"
  for port in "${cluster_ports[@]}"; do
    mkdir -p "$cluster_dir/$port"
    redis-server --daemonize yes --bind "$cluster_host" --port "$port" \
      --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
      --save '' --appendonly no --dir "$cluster_dir/$port" \
      --pidfile "$cluster_dir/$port/redis.pid" --logfile "$cluster_dir/$port/redis.log"
  done
  for port in "${cluster_ports[@]}"; do wait_port "$cluster_host" "$port"; done
  local nodes=()
  for port in "${cluster_ports[@]}"; do nodes+=("$cluster_host:$port"); done
  log "creating the cluster (3 masters, 1 replica each) on ${nodes[*]}"
  timeout 60 redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes \
    >"$cluster_dir/create.log" 2>&1 || { log "redis-cli --cluster create failed:"; cat "$cluster_dir/create.log" >&2; return 1; }
  # `create` returns once the slots are assigned; the replicas and the gossip that makes every
  # node agree come a moment later.
  local deadline=$((SECONDS + 30))
  until cluster_healthy; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "the cluster is not healthy within 30s; node views:"
      for port in "${cluster_ports[@]}"; do log "$port: $(cluster_info "$port" | grep -E 'cluster_(state|slots_ok|known_nodes)' | tr '\n' ' ')"; done
      return 1
    fi
    sleep 0.1
  done
}

if [ "${ECST_SKIP_CLUSTER:-}" != "1" ]; then
  if grep -qx 'cluster_state:ok' <<<"$(cluster_info "$cluster_port")"; then
    log "Redis Cluster answers on $cluster_host:$cluster_port"
    cluster_healthy || log "note: not every node of $cluster_host:${cluster_ports[0]}-${cluster_ports[-1]} reports a full 6-node cluster; keeping it anyway"
  else
    cluster_clean
    log "starting a Redis Cluster on $cluster_host:${cluster_ports[0]}-${cluster_ports[-1]} (state in $cluster_dir)"
    cluster_start
    log "Redis Cluster ready: every node reports cluster_state:ok and all 16384 slots served"
  fi
  export ECST_CLUSTER_URL="$cluster_url"
  echo "ECST_CLUSTER_URL=$cluster_url"
fi

# --- PostgreSQL --------------------------------------------------------------------------
if [ "${ECST_SKIP_POSTGRES:-}" = "1" ]; then exit 0; fi
pg_host=127.0.0.1; pg_port=5432
if ! command -v psql >/dev/null; then
  log "installing postgresql-client (psql)"
  apt_install postgresql-client
fi
if port_open "$pg_host" "$pg_port"; then
  log "PostgreSQL answers on $pg_host:$pg_port"
  exit 0
fi
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  log "installing postgresql"
  apt_install postgresql postgresql-client
fi
if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
  version="$(ls /etc/postgresql | sort -V | tail -n 1)"
  hba="/etc/postgresql/$version/main/pg_hba.conf"
  # Local test databases only: trust on loopback, as the tests' DATABASE_URL expects.
  if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
    as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  fi
  log "starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_port "$pg_host" "$pg_port"
else
  log "PostgreSQL is installed but no cluster could be started; set DATABASE_URL to a running server"
  exit 1
fi
