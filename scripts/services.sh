#!/usr/bin/env bash
# Makes sure a Redis (and, for the Postgres sink, a PostgreSQL) answers locally, installing them
# from the distribution's packages and starting them when they do not. Idempotent.
#   REDIS_URL     default redis://127.0.0.1:6379
#   DATABASE_URL  default postgres://postgres@127.0.0.1:5432/postgres
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
