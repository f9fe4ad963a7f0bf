#!/usr/bin/env bash
# Key spraying at full scale: wrk sends every request from a new forwarded
# address (xff.lua) for DURATION seconds against a login-like quota that
# keeps a key for minutes, with and without the in-process store's budget.
# Prints the server's RSS growth, req/s, and whether a client inside its
# quota before the spray is still inside it (and one over it still over).
#
#   bash load-tests/spray.sh                   # 30 s per configuration
#   DURATION=10 bash load-tests/spray.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-30}
PORT=${PORT:-18090}
export CLIENTS=16777216
bash scripts/services.sh >/dev/null
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
cargo build --release -q -p tollgate-server --bin tollgate-server
export DATABASE_URL=${DATABASE_URL:-postgres://tollgate_app:tollgate_app@127.0.0.1:5432/tollgate}
export MIGRATION_DATABASE_URL=${MIGRATION_DATABASE_URL:-postgres://tollgate_owner:tollgate_owner@127.0.0.1:5432/tollgate}
export AUTH_SECRET=${AUTH_SECRET:-bench-secret-0123456789abcdef0123456789}
cores=$(nproc)
load_cpu=$(( cores > 1 ? 1 : 0 ))

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
ping_from() { curl -s -o /dev/null -w '%{http_code}' -H "x-forwarded-for: $1" "http://127.0.0.1:$PORT/api/v1/ping"; }

echo "| RATE_LIMIT_MEMORY_MAX_KEYS | requests (new addresses) | req/s | RSS before MiB | RSS after MiB | growth MiB | overflow decisions | good client denied | over-limit client allowed |"
echo "|---|---|---|---|---|---|---|---|---|"
for budget in 200000 4000000000; do
    env LISTEN_ADDR=127.0.0.1:$PORT RUST_LOG=warn TRUSTED_PROXIES=127.0.0.1 \
        RATE_LIMIT_IP=10/h,burst=10 RATE_LIMIT_MEMORY_MAX_KEYS=$budget \
        taskset -c 0 target/release/tollgate-server >/dev/null 2>&1 &
    pid=$!
    for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$PORT/health" && break; sleep 0.05; done
    for _ in 1 2 3; do ping_from 198.51.100.1 >/dev/null; done
    for _ in $(seq 11); do ping_from 198.51.100.2 >/dev/null; done
    before=$(rss_kib "$pid")
    out=$(taskset -c "$load_cpu" wrk -t1 -c64 -d"${DURATION}s" -s load-tests/xff.lua "http://127.0.0.1:$PORT/api/v1/ping")
    after=$(rss_kib "$pid")
    good=0; freed=0
    for _ in 1 2 3; do [ "$(ping_from 198.51.100.1)" = 200 ] || good=$((good + 1)); done
    [ "$(ping_from 198.51.100.2)" = 429 ] || freed=1
    overflow=$(curl -s "http://127.0.0.1:$PORT/metrics" | awk '/^tollgate_ratelimit_overflow_decisions_total / { print $2 }')
    kill "$pid"; wait "$pid" 2>/dev/null || true
    requests=$(awk '/requests in/ { print $1 }' <<<"$out")
    rps=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
    awk -v b="$budget" -v n="$requests" -v r="$rps" -v x="$before" -v y="$after" -v o="${overflow:-0}" -v g="$good" -v f="$freed" \
        'BEGIN { printf "| %s | %d | %.0f | %.1f | %.1f | %+.1f | %d | %d of 3 | %s |\n", b, n, r, x/1024, y/1024, (y-x)/1024, o, g, (f ? "yes" : "no") }'
done
echo
echo "$(date -u +%F), $(nproc) cores, server on CPU 0, wrk -t1 -c64 -d${DURATION}s on CPU $load_cpu, RATE_LIMIT_IP=10/h,burst=10, every request a new X-Forwarded-For (xff.lua)"
