#!/usr/bin/env bash
# What a rate-limit check costs Redis and the server, per request, on a
# three-master Redis Cluster of this script's own (ports 17101-17103): the
# server (release, pinned to core 0) under wrk (core 1) for 4 s per mode,
# Redis CPU from the masters' `INFO cpu`, server CPU from /proc. Then the
# GCRA script alone under redis-benchmark, 1 and 16 keys per call, against
# a bare Lua GET + SET PX. Used for the README's capacity model.
#
#   bash load-tests/redis_cost.sh
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/services.sh >/dev/null
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
cargo build --release -q -p tollgate-server --bin tollgate-server
export DATABASE_URL=${DATABASE_URL:-postgres://tollgate_app:tollgate_app@127.0.0.1:5432/tollgate}
export MIGRATION_DATABASE_URL=${MIGRATION_DATABASE_URL:-postgres://tollgate_owner:tollgate_owner@127.0.0.1:5432/tollgate}
export AUTH_SECRET=${AUTH_SECRET:-bench-secret-0123456789abcdef0123456789}
target/release/tollgate-server migrate >/dev/null

PORTS=(17101 17102 17103)
PORT=18090
tmp=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"' EXIT
for port in "${PORTS[@]}"; do
    mkdir -p "$tmp/$port"
    redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
        --cluster-enabled yes --cluster-require-full-coverage no --dir "$tmp/$port" >/dev/null &
    pids+=($!)
done
for port in "${PORTS[@]}"; do
    for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${PORTS[@]}") --cluster-replicas 0 --cluster-yes >/dev/null
for port in "${PORTS[@]}"; do
    for _ in $(seq 200); do redis-cli -p "$port" cluster info | grep -q cluster_state:ok && break; sleep 0.05; done
done
nodes=$(printf 'redis://127.0.0.1:%s,' "${PORTS[@]}"); nodes=${nodes%,}

redis_cpu() { # seconds of CPU the masters used so far
    for port in "${PORTS[@]}"; do redis-cli -p "$port" info cpu; done |
        awk -F: '/^used_cpu_(sys|user):/ { s += $2 } END { printf "%.6f", s }'
}

# mode NAME XFF|ONE ENV...: one 4 s run.
mode() {
    local name=$1 clients=$2
    shift 2
    env LISTEN_ADDR=127.0.0.1:$PORT RUST_LOG=warn RATE_LIMIT_STORE=redis RATE_LIMIT_REDIS_CLUSTER=$nodes \
        RATE_LIMIT_IP=4000000000/s TRUSTED_PROXIES=127.0.0.1 RATE_LIMIT_REDIS_PREFIX=cost-$$-$RANDOM "$@" \
        taskset -c 0 target/release/tollgate-server >"$tmp/server.log" 2>&1 &
    local server=$!
    for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$PORT/health" && break; sleep 0.05; done
    local r0 s0 r1 s1 args=()
    [ "$clients" = XFF ] && args=(-s load-tests/xff.lua)
    r0=$(redis_cpu); s0=$(awk '{ print $14 + $15 }' "/proc/$server/stat")
    taskset -c 1 wrk -t1 -c64 -d4s "${args[@]}" "http://127.0.0.1:$PORT/api/v1/ping" >"$tmp/wrk.txt"
    r1=$(redis_cpu); s1=$(awk '{ print $14 + $15 }' "/proc/$server/stat")
    kill "$server"; wait "$server" 2>/dev/null || true
    local total rps ticks
    total=$(awk '/requests in/ { print $1 }' "$tmp/wrk.txt")
    rps=$(awk '/^Requests\/sec:/ { print $2 }' "$tmp/wrk.txt")
    ticks=$(getconf CLK_TCK)
    awk -v n="$name" -v rps="$rps" -v t="$total" -v r0="$r0" -v r1="$r1" -v s0="$s0" -v s1="$s1" -v hz="$ticks" \
        'BEGIN { printf "| %s | %.0f | %.2f µs | %.2f µs |\n", n, rps, (r1 - r0) * 1e6 / t, (s1 - s0) / hz * 1e6 / t }'
}

echo "| mode (3-master cluster) | req/s | Redis CPU per request | server CPU per request |"
echo "|---|---|---|---|"
mode "exact, batched, many addresses" XFF
mode "exact, one call per request, many addresses" XFF RATE_LIMIT_REDIS_MAX_BATCH=1 RATE_LIMIT_REDIS_MAX_IN_FLIGHT=100000 RATE_LIMIT_REDIS_LOCAL_CACHE=false
mode "exact, batched, one hot key" ONE
mode "leases, one hot key" ONE RATE_LIMIT_REDIS_LEASES=ip
mode "memory store, many addresses" XFF RATE_LIMIT_STORE=memory

# The script alone, on the master of hash tag {t} (redis-benchmark's random
# keys all carry it).
echo
owner=
for port in "${PORTS[@]}"; do
    if [ "$(redis-cli -p "$port" exists '{t}probe')" = 0 ]; then owner=$port; fi
done
script=$(cat middleware/src/rate_limit/store/redis/time.lua middleware/src/rate_limit/store/redis/gcra.lua)
sha=$(redis-cli -p "$owner" script load "$script")
check="1 1000 100000000000 1 1 0"
bench() { # label count args...
    local label=$1; shift
    local rate
    rate=$(redis-benchmark -p "$owner" -n 40000 -c 8 -r 1000000 -q "$@" 2>/dev/null | tr '\r' '\n' |
        awk '/requests per second/ { for (i = 1; i <= NF; i++) if ($(i+1) == "requests") v = $i } END { print v }')
    echo "$label: $rate calls/s"
}
keys16=(); args16=()
for i in $(seq 16); do keys16+=("{t}k$i:__rand_int__"); args16+=($check); done
bench "GCRA script, 1 key per call" EVALSHA "$sha" 1 "{t}k:__rand_int__" "" "" 0 1 1 $check
bench "GCRA script, 16 keys per call" EVALSHA "$sha" 16 "${keys16[@]}" "" "" 0 16 "${args16[@]}"
bare=$(redis-cli -p "$owner" script load "for i=1,#KEYS do redis.call('GET', KEYS[i]); redis.call('SET', KEYS[i], '1764881234:123456789', 'PX', 100000) end return 1")
bench "bare Lua GET + SET PX, 16 keys per call" EVALSHA "$bare" 16 "${keys16[@]}"
