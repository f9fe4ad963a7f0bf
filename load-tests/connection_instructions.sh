#!/usr/bin/env bash
# Instructions per request of a whole HTTP/1.1 connection, hyper and
# tokio's I/O included, on the real binaries over loopback: callgrind's
# count of the connection's task (its future, `--toggle-collect`) for N
# and 3N keep-alive requests of `GET /api/v1/ping` sent by curl on one
# connection, the difference over 2N. `instructions.sh` counts the layers
# in process; this counts what serving a connection adds around them
# (hyper's parsing and writing, the head deadline, the access line).
# Start-up, the accept loop, background threads and the kernel are not
# counted. Needs valgrind and curl.
#
#   bash load-tests/connection_instructions.sh     # N = 2000, 3 rounds
#   ROWS='bare server' ROUNDS=1 bash load-tests/connection_instructions.sh
#
# Rows: `bare`, axum::serve of the bare app (examples/baseline.rs);
# `bare-connect-info`, the same served with the peer's address
# (`into_make_service_with_connect_info`), as the stacks below are;
# `noop`, the same with a layer that does nothing added with
# `Router::layer` (axum's own cost of any layer added that way);
# `ratelimit`, the same with Tollgate's client IP + rate-limit layer;
# `governor`, with tower_governor instead (per client address, its
# headers); `metrics` and `prometheus`, Tollgate's metrics layer and
# axum-prometheus (the harness's "… alone" stacks, examples/support/stacks.rs);
# `server`, tollgate-server with its defaults (access log at INFO, memory
# store, the client in X-Forwarded-For from a trusted loopback peer, as
# `instructions.sh`'s server row); `server-no-head-deadline`, the same
# with HTTP_HEADER_READ_TIMEOUT=off.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2000}
ROUNDS=${ROUNDS:-3}
PORT=${PORT:-3995}
ROWS=${ROWS:-bare bare-connect-info noop ratelimit governor metrics prometheus server server-no-head-deadline}
command -v valgrind >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
cargo build --release -q -p tollgate-server --bin tollgate-server --example baseline
export DATABASE_URL=${DATABASE_URL:-postgres://tollgate_app:tollgate_app@127.0.0.1:5432/tollgate}
export MIGRATION_DATABASE_URL=${MIGRATION_DATABASE_URL:-postgres://tollgate_owner:tollgate_owner@127.0.0.1:5432/tollgate}
export TOLLGATE_ENV=development RATE_LIMIT_STORE=memory RATE_LIMIT_IP=4000000000/s TRUSTED_PROXIES=127.0.0.1
export TRUST_CACHE_TTL=1h PLAN_CACHE_TTL=1h READY_CHECK_INTERVAL=1h
unset RUST_LOG
out=$(mktemp)
pid=
trap 'rm -f "$out"; [ -z "$pid" ] || kill "$pid" 2>/dev/null || true' EXIT

# count TOGGLE N BINARY [ENV...]: the connection task's instructions for
# N requests on one connection.
count() {
    local toggle=$1 n=$2 bin=$3
    shift 3
    env LISTEN_ADDR="127.0.0.1:$PORT" "$@" valgrind --tool=callgrind --toggle-collect="$toggle" \
        --callgrind-out-file="$out" "$bin" >/dev/null 2>&1 &
    pid=$!
    # Waits for the listener without connecting (a probe would be counted).
    for _ in $(seq 600); do
        ss -Hltn "sport = :$PORT" | grep -q . && break
        sleep 0.1
    done
    # The fragment is not sent: N identical requests, one connection.
    curl -sf -o /dev/null -H 'x-forwarded-for: 203.0.113.7' "http://127.0.0.1:$PORT/api/v1/ping#[1-$n]"
    kill -TERM "$pid"
    wait "$pid" || true
    pid=
    callgrind_annotate "$out" | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }'
}

axum_task='axum::serve::handle_connection::{{closure}}::{{closure}}'
server_task='tollgate_server::serve::spawn_connection::{{closure}}'
echo "| row | instructions per request | over bare |"
echo "|---|---|---|"
bare=
for row in $ROWS; do
    case $row in
        bare) args=("$axum_task" target/release/examples/baseline) ;;
        bare-connect-info) args=("$axum_task" target/release/examples/baseline CONNECT_INFO=1) ;;
        noop | ratelimit | governor | metrics | prometheus) args=("$axum_task" target/release/examples/baseline "STACK=$row") ;;
        server) args=("$server_task" target/release/tollgate-server) ;;
        server-no-head-deadline) args=("$server_task" target/release/tollgate-server HTTP_HEADER_READ_TIMEOUT=off) ;;
        *) echo "unknown row $row" >&2; exit 2 ;;
    esac
    per=$(for _ in $(seq "$ROUNDS"); do
        one=$(count "${args[0]}" "$N" "${args[@]:1}")
        three=$(count "${args[0]}" $((3 * N)) "${args[@]:1}")
        echo $(( (three - one) / (2 * N) ))
    done | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
    over=
    if [ "$row" = bare ]; then bare=$per; over="(reference)"; elif [ -n "$bare" ]; then over="+$(( per - bare ))"; fi
    echo "| $row | $per | $over |"
done
echo
echo "$(date -u +%F), N=$N and 3N requests on one keep-alive connection, median of $ROUNDS, callgrind, the connection's task only"
