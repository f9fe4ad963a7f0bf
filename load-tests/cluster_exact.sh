#!/usr/bin/env bash
# Three replicas of the reference server on loopback sharing one Redis:
# requests spread round-robin over them against a per-IP quota Q. Prints
# how many were allowed with the Redis store (expected: exactly Q) and with
# the memory store (expected: 3·Q, each replica counting alone).
#
#   bash load-tests/cluster_exact.sh            # Q = 50, 300 requests
#   QUOTA=100 REQUESTS=600 bash load-tests/cluster_exact.sh
set -euo pipefail
cd "$(dirname "$0")/.."

QUOTA=${QUOTA:-50}
REQUESTS=${REQUESTS:-300}
PORTS=(18181 18182 18183)

bash scripts/services.sh
cargo build --release -q -p tollgate-server --bin tollgate-server

pids=()
stop() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; pids=(); }
trap stop EXIT

run() { # store
    local store=$1 prefix="cluster-exact-$$-$1"
    for port in "${PORTS[@]}"; do
        LISTEN_ADDR=127.0.0.1:$port RUST_LOG=warn RATE_LIMIT_STORE=$store \
            RATE_LIMIT_IP="$QUOTA/h" RATE_LIMIT_REDIS_PREFIX=$prefix \
            target/release/tollgate-server >/dev/null 2>&1 &
        pids+=($!)
    done
    for port in "${PORTS[@]}"; do
        for _ in $(seq 100); do
            curl -s -o /dev/null "http://127.0.0.1:$port/health" && break
            sleep 0.05
        done
    done
    local allowed=0 limited=0 other=0
    for i in $(seq 0 $((REQUESTS - 1))); do
        port=${PORTS[$((i % ${#PORTS[@]}))]}
        case $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/api/v1/ping") in
            200) allowed=$((allowed + 1)) ;;
            429) limited=$((limited + 1)) ;;
            *) other=$((other + 1)) ;;
        esac
    done
    stop
    printf '%-6s store: %4d allowed, %4d rejected (429), %d other, of %d requests over %d replicas, quota %d/h per IP\n' \
        "$store" "$allowed" "$limited" "$other" "$REQUESTS" "${#PORTS[@]}" "$QUOTA"
}

run redis
run memory
