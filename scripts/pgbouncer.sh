#!/usr/bin/env bash
# Runs PgBouncer (Debian's package) on loopback in transaction mode in
# front of the local Postgres, the way operators of many replicas run it.
# Used by scripts/services.sh (as a daemon on 6432), by the tests (in the
# foreground, on a port and pool size of their own) and by the pgbouncer
# service of docker-compose.yml (PG_HOST=postgres LISTEN_HOST='*').
#
#   scripts/pgbouncer.sh --daemon|--foreground PORT POOL_SIZE DIR
#
# DIR receives pgbouncer.ini and userlist.txt (and, for a daemon, its pid
# file and log). Every database name maps to the same name on
# $PG_HOST:$PG_PORT (127.0.0.1:5432). Clients log in with SCRAM as tollgate_app or
# tollgate_owner (scripts/db-setup.sql's roles and default passwords).
set -euo pipefail

mode=${1:?--daemon or --foreground}
port=${2:?port}
pool_size=${3:?pool size}
dir=${4:?directory}
PG_HOST=${PG_HOST:-127.0.0.1}
PG_PORT=${PG_PORT:-5432}
LISTEN_HOST=${LISTEN_HOST:-127.0.0.1}
APP_PASSWORD=${APP_PASSWORD:-tollgate_app}
# Empty: the owner cannot log in through it (compose: migrations go direct).
OWNER_PASSWORD=${OWNER_PASSWORD-tollgate_owner}

mkdir -p "$dir"
daemon_lines=
if [ "$mode" = --daemon ]; then
    daemon_lines="pidfile = $dir/pgbouncer.pid
logfile = $dir/pgbouncer.log"
fi
cat >"$dir/pgbouncer.ini" <<INI
[databases]
* = host=$PG_HOST port=$PG_PORT

[pgbouncer]
listen_addr = $LISTEN_HOST
listen_port = $port
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $dir/userlist.txt
; Server connections are lent for one transaction at a time: what
; DB_STATEMENT_CACHE=0 and DATABASE_DIRECT_URL are for (README).
pool_mode = transaction
default_pool_size = $pool_size
max_client_conn = 1000
; sqlx sends it at connect; PgBouncer would refuse the connection.
ignore_startup_parameters = extra_float_digits
$daemon_lines
INI
printf '"tollgate_app" "%s"\n' "$APP_PASSWORD" >"$dir/userlist.txt"
if [ -n "$OWNER_PASSWORD" ]; then
    printf '"tollgate_owner" "%s"\n' "$OWNER_PASSWORD" >>"$dir/userlist.txt"
fi
chmod 600 "$dir/userlist.txt"

# PgBouncer refuses to run as root: as root, it runs as postgres.
as_user=()
if [ "$(id -u)" -eq 0 ]; then
    chown -R postgres "$dir"
    as_user=(-u postgres)
fi
case "$mode" in
--daemon) exec pgbouncer -d "${as_user[@]}" "$dir/pgbouncer.ini" ;;
--foreground) exec pgbouncer "${as_user[@]}" "$dir/pgbouncer.ini" ;;
*) echo "usage: $0 --daemon|--foreground PORT POOL_SIZE DIR" >&2; exit 2 ;;
esac
