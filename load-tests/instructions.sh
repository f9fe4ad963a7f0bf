#!/usr/bin/env bash
# Instructions per request of each stack, a measure that does not move
# with the machine: callgrind's instruction count for N and 3N in-process
# requests (server/examples/instructions.rs, current-thread runtime),
# difference over 2N. Only the request path is counted: the instructions
# run while `main`'s future is polled (--toggle-collect), not the
# recorders' upkeep thread, the access log's writer thread or start-up;
# plus the task a read-only tenant transaction ends in after its response
# (tollgate's `end_read_only`), which is the request's work too.
# Needs valgrind (Debian's package).
#
#   bash load-tests/instructions.sh            # N = 3000
#   N=10000 ROUNDS=5 bash load-tests/instructions.sh
#
# Stacks: bare axum; `noop`, a layer that does nothing added with
# `Router::layer` (what axum charges for any layer added that way); one
# layer alone on it, ours and a peer's
# (support/stacks.rs; `ratelimit-outside` is ours around the router
# instead of added with `Router::layer`, without axum's box per layer); `server`, the whole server's app with the defaults
# the load harness's "defaults" row runs (access log at INFO, memory
# store, the client's address in X-Forwarded-For from a trusted loopback
# peer), on `/api/v1/ping`; and `tenant`, the same app's tenant route
# (`GET /api/v1/items`, 20 rows, against the real database, which must be
# migrated: `scripts/services.sh`) for a tenant it seeds, with quotas
# raised as in the harness; and `plain`, its reference, the same query and
# response in a plain transaction on bare axum as the load harness's
# baseline serves it (as the owner, `MIGRATION_DATABASE_URL`). Opening
# database connections is not counted (it happens once per connection, at
# a time that varies): N is 1000 for these two, which also count sqlx,
# rustls and serde_json, and the tenant route is compared with `plain`.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-3000}
ROUNDS=${ROUNDS:-3}
command -v valgrind >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
cargo build --release -q -p tollgate-server --example instructions
bin=target/release/examples/instructions
# The server stack's configuration; its pools connect lazily and the
# ping route never uses them.
export DATABASE_URL=${DATABASE_URL:-postgres://tollgate_app:tollgate_app@127.0.0.1:5432/tollgate}
export MIGRATION_DATABASE_URL=${MIGRATION_DATABASE_URL:-postgres://tollgate_owner:tollgate_owner@127.0.0.1:5432/tollgate}
export TOLLGATE_ENV=development RATE_LIMIT_STORE=memory RATE_LIMIT_IP=4000000000/s TRUSTED_PROXIES=127.0.0.1
export RATE_LIMIT_TENANT=4000000000/s RATE_LIMIT_CLASS_READ=4000000000/s
# Cache refreshes and readiness rounds come with time, not with requests.
export TRUST_CACHE_TTL=1h PLAN_CACHE_TTL=1h READY_CHECK_INTERVAL=1h
out=$(mktemp)
trap 'rm -f "$out"' EXIT
irefs() {
    valgrind --tool=callgrind --toggle-collect='instructions::main::{{closure}}' \
        --toggle-collect='sqlx_core::pool::inner::PoolInner<DB>::connect::{{closure}}' \
        --toggle-collect='tollgate::tenant::layer::end_read_only::{{closure}}' \
        --callgrind-out-file="$out" "$bin" "$1" "$2" >/dev/null 2>&1
    callgrind_annotate "$out" | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }'
}
# Hash seeds differ between runs (a few instructions per request): each
# count is the median of ROUNDS runs.
echo "| stack | instructions per request | over its reference |"
echo "|---|---|---|"
bare=
plain=
db_n=$(( N < 1000 ? N : 1000 ))
for stack in bare noop ratelimit ratelimit-outside governor metrics prometheus server plain tenant; do
    n=$N
    case $stack in plain | tenant) n=$db_n ;; esac
    per=$(for _ in $(seq "$ROUNDS"); do
        one=$(irefs "$stack" "$n"); three=$(irefs "$stack" $((3 * n)))
        echo $(( (three - one) / (2 * n) ))
    done | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
    # The database routes are measured against the plain transaction,
    # the others against bare axum's ping.
    case $stack in
        bare) bare=$per; over="(reference)" ;;
        plain) plain=$per; over="(reference of the tenant route)" ;;
        tenant) over="+$(( per - plain )) over plain ($(awk -v a="$per" -v b="$plain" 'BEGIN { printf "%.2f", a / b }')×)" ;;
        *) over="+$(( per - bare )) over bare" ;;
    esac
    echo "| $stack | $per | $over |"
done
echo
echo "$(date -u +%F), N=$N and 3N requests (plain and tenant: N=$db_n), median of $ROUNDS, callgrind, request path only, current-thread runtime"
