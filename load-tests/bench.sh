#!/usr/bin/env bash
# The benchmark harness: every configuration of the reference server against
# bare axum, in one run, on loopback. Builds in release, pins the server and
# the load generator to different cores, runs each configuration ROUNDS
# times interleaved, and prints a markdown table of medians. Each ratio is
# printed twice: of the medians, and (in brackets) the median of the rounds'
# own ratios, each against its reference in the same round.
#
#   bash load-tests/bench.sh                 # oha (installed when missing), 3 rounds of 5 s
#   LOADGEN=wrk bash load-tests/bench.sh     # wrk from Debian; many client addresses via xff.lua
#   ROUNDS=5 DURATION=10 bash load-tests/bench.sh
#   ONLY='^memory store' ROUNDS=7 bash load-tests/bench.sh   # a subset
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
CONNECTIONS=${CONNECTIONS:-64}
LOADGEN=${LOADGEN:-oha}
# Requests per second of the fixed-rate latency rows (below what either
# database variant saturates at, so latency is service time, not queueing).
LATENCY_RATE=${LATENCY_RATE:-400}
export CLIENTS=${CLIENTS:-16777216}
PORT=${PORT:-18080}
export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/services.sh
case "$LOADGEN" in
oha)
    if ! command -v oha >/dev/null; then
        echo "installing oha from crates.io (about 9 minutes, once)" >&2
        cargo install oha --locked --quiet
    fi
    if ! command -v jq >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq jq >/dev/null
    fi
    ;;
wrk)
    if ! command -v wrk >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
    fi
    ;;
*) echo "LOADGEN is oha or wrk, got '$LOADGEN'" >&2; exit 2 ;;
esac
cargo build --release -q -p tollgate-server --bin tollgate-server --example baseline

# The server needs its database and a token secret; the tenant rows need a
# tenant with items and a token of one of its users.
export AUTH_SECRET=${AUTH_SECRET:-bench-secret-0123456789abcdef0123456789}
export DATABASE_URL=${DATABASE_URL:-postgres://tollgate_app:tollgate_app@127.0.0.1:5432/tollgate}
export MIGRATION_DATABASE_URL=${MIGRATION_DATABASE_URL:-postgres://tollgate_owner:tollgate_owner@127.0.0.1:5432/tollgate}
TENANT_CONNECTIONS=${TENANT_CONNECTIONS:-8}
target/release/tollgate-server migrate >/dev/null
TENANT=$(target/release/tollgate-server tenant add bench)
email="bench-$TENANT@example.com"
target/release/tollgate-server user add --tenant "$TENANT" --email "$email" \
    --password bench-password --trust-level staff >/dev/null
# The token must outlive the run (a full run of five rounds takes about
# 25 minutes, the default token 15): an expired one turns every tenant
# row into a 401 flood.
LISTEN_ADDR=127.0.0.1:$PORT RUST_LOG=warn AUTH_TOKEN_TTL=1d target/release/tollgate-server >/dev/null 2>&1 &
seed_pid=$!
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$PORT/health" && break; sleep 0.05; done
TOKEN=$(curl -s "http://127.0.0.1:$PORT/auth/login" -H 'content-type: application/json' \
    -d "{\"email\":\"$email\",\"password\":\"bench-password\"}" | sed 's/.*"access_token":"\([^"]*\)".*/\1/')
for n in $(seq 20); do
    curl -s -o /dev/null "http://127.0.0.1:$PORT/api/v1/items" -H "authorization: Bearer $TOKEN" \
        -H 'content-type: application/json' -d "{\"name\":\"item $n\"}"
done
kill "$seed_pid"; wait "$seed_pid" 2>/dev/null || true
case $TOKEN in
    ey*) ;;
    *) echo "bench: could not log in the tenant rows' user" >&2; exit 1 ;;
esac

cores=$(nproc)
server_cpu=0
load_cpu=$(( cores > 1 ? 1 : 0 ))

# Every row but "defaults" runs with RUST_LOG=warn (no access log); the
# "defaults" row keeps the default log level, one line per request to
# stdout (here a file), as users run it. Quotas are raised in both so the
# limiter allows.
# The "… alone" rows put one layer on the bare app (examples/baseline.rs,
# STACK=…): ours, and a peer's for the same job beside it; the do-nothing
# layer shows what axum's `Router::layer` costs by itself.
# name | binary | env | XFF (many client addresses, wrk only) or AUTH (the
# tenant user's token) | path | fixed rate (req/s; empty: as fast as possible)
unlimited="RATE_LIMIT_TENANT=4000000000/s RATE_LIMIT_CLASS_READ=4000000000/s"
plain_env="DATABASE_URL=$MIGRATION_DATABASE_URL TENANT_ID=$TENANT"
ip_env="RATE_LIMIT_IP=4000000000/s TRUSTED_PROXIES=127.0.0.1"
# Through scripts/services.sh's PgBouncer (127.0.0.1:6432, transaction mode):
# requests pooled, no statement cache, LISTEN direct. Rows named
# "… [pooler]" are compared with the direct tenant route after the table.
pooler_env="DATABASE_URL=postgres://tollgate_app:tollgate_app@127.0.0.1:6432/tollgate DB_STATEMENT_CACHE=0 DATABASE_DIRECT_URL=$DATABASE_URL"
# Plans configured (TENANT_PLANS, each plan's limits set; the bench tenant
# on the default one): "… [plans]" rows are compared with the direct
# tenant route after the table, like the pooler rows.
plans_env="TENANT_PLANS=free,pro RATE_LIMIT_PLAN_FREE_TENANT=4000000000/s RATE_LIMIT_PLAN_PRO_TENANT=4000000000/s RATE_LIMIT_PLAN_FREE_READ=4000000000/s RATE_LIMIT_PLAN_PRO_READ=4000000000/s"
# The same stack without the capacity layers: no concurrency policies, no
# header/body/request deadlines (rows named "… [no capacity layers]" are
# compared with the row of the same name after the table).
no_capacity="RATE_LIMIT_TENANT_CONCURRENCY=unlimited RATE_LIMIT_SUBJECT_CONCURRENCY=unlimited HTTP_HEADER_READ_TIMEOUT=off HTTP_BODY_READ_TIMEOUT=off HTTP_REQUEST_TIMEOUT=off"
configs=(
  "bare axum|baseline|||/api/v1/ping|"
  "a layer that does nothing, with Router::layer (axum's cost of any layer)|baseline|STACK=noop||/api/v1/ping|"
  "Tollgate rate-limit layer alone (client IP + per-IP policy, headers)|baseline|STACK=ratelimit|XFF|/api/v1/ping|"
  "tower_governor alone (per IP, headers)|baseline|STACK=governor|XFF|/api/v1/ping|"
  "Tollgate metrics layer alone|baseline|STACK=metrics||/api/v1/ping|"
  "axum-prometheus alone|baseline|STACK=prometheus||/api/v1/ping|"
  "memory store|server|RATE_LIMIT_STORE=memory $ip_env|XFF|/api/v1/ping|"
  "defaults (access log at INFO)|server|RATE_LIMIT_STORE=memory $ip_env RUST_LOG=info|XFF|/api/v1/ping|"
  "memory store [no capacity layers]|server|RATE_LIMIT_STORE=memory $ip_env $no_capacity|XFF|/api/v1/ping|"
  "memory store, no key budget|server|RATE_LIMIT_STORE=memory $ip_env RATE_LIMIT_MEMORY_MAX_KEYS=4000000000|XFF|/api/v1/ping|"
  "redis store (batched)|server|RATE_LIMIT_STORE=redis $ip_env|XFF|/api/v1/ping|"
  "redis naive (1 EVALSHA/request)|server|RATE_LIMIT_STORE=redis $ip_env RATE_LIMIT_REDIS_MAX_BATCH=1 RATE_LIMIT_REDIS_MAX_IN_FLIGHT=100000 RATE_LIMIT_REDIS_LOCAL_CACHE=false|XFF|/api/v1/ping|"
  "redis cluster, 3 masters (exact, batched)|server|RATE_LIMIT_STORE=redis RATE_LIMIT_REDIS_CLUSTER=CLUSTER $ip_env|XFF|/api/v1/ping|"
  "redis cluster, in flight 8|server|RATE_LIMIT_STORE=redis RATE_LIMIT_REDIS_CLUSTER=CLUSTER $ip_env RATE_LIMIT_REDIS_MAX_IN_FLIGHT=8|XFF|/api/v1/ping|"
  "redis cluster naive (1 EVALSHA/request)|server|RATE_LIMIT_STORE=redis RATE_LIMIT_REDIS_CLUSTER=CLUSTER $ip_env RATE_LIMIT_REDIS_MAX_BATCH=1 RATE_LIMIT_REDIS_MAX_IN_FLIGHT=100000 RATE_LIMIT_REDIS_LOCAL_CACHE=false|XFF|/api/v1/ping|"
  "memory store, one hot key|server|RATE_LIMIT_STORE=memory $ip_env||/api/v1/ping|"
  "redis exact, one hot key|server|RATE_LIMIT_STORE=redis $ip_env||/api/v1/ping|"
  "redis leases, one hot key|server|RATE_LIMIT_STORE=redis $ip_env RATE_LIMIT_REDIS_LEASES=ip||/api/v1/ping|"
  "memory store, over-limit flood|server|RATE_LIMIT_STORE=memory RATE_LIMIT_IP=10/h||/api/v1/ping|"
  "redis store, over-limit flood|server|RATE_LIMIT_STORE=redis RATE_LIMIT_IP=10/h||/api/v1/ping|"
  "plain transaction (bare axum, c$TENANT_CONNECTIONS)|baseline|$plain_env||/api/v1/items|"
  "plain transaction, sqlx's default pool (a ping per acquire)|baseline|$plain_env SQLX_DEFAULT_POOL=1||/api/v1/items|"
  "tenant route: token, limits, RLS transaction (c$TENANT_CONNECTIONS)|server|RATE_LIMIT_STORE=memory $unlimited|AUTH|/api/v1/items|"
  "tenant route, direct, no statement cache [pooler]|server|RATE_LIMIT_STORE=memory $unlimited DB_STATEMENT_CACHE=0|AUTH|/api/v1/items|"
  "tenant route through PgBouncer (transaction mode) [pooler]|server|RATE_LIMIT_STORE=memory $unlimited $pooler_env|AUTH|/api/v1/items|"
  "tenant route, two plans configured [plans]|server|RATE_LIMIT_STORE=memory $unlimited $plans_env|AUTH|/api/v1/items|"
)
if [ "$LOADGEN" = oha ]; then
  configs+=(
    "plain transaction at $LATENCY_RATE req/s|baseline|$plain_env||/api/v1/items|$LATENCY_RATE"
    "plain, COMMIT after the response (as the tenant route's reads), at $LATENCY_RATE req/s|baseline|$plain_env COMMIT_AFTER_RESPONSE=1||/api/v1/items|$LATENCY_RATE"
    "tenant route at $LATENCY_RATE req/s|server|RATE_LIMIT_STORE=memory $unlimited|AUTH|/api/v1/items|$LATENCY_RATE"
  )
fi
configs+=(
  "tenant route, c$TENANT_CONNECTIONS [no capacity layers]|server|RATE_LIMIT_STORE=memory $unlimited $no_capacity|AUTH|/api/v1/items|"
  "tenant route, c$TENANT_CONNECTIONS|server|RATE_LIMIT_STORE=memory $unlimited|AUTH|/api/v1/items|"
)

# ONLY=REGEX keeps the configurations whose name matches (bare axum, the
# reference of every ratio, always runs).
if [ -n "${ONLY:-}" ]; then
    kept=("${configs[0]}")
    for c in "${configs[@]:1}"; do
        if [[ "${c%%|*}" =~ $ONLY ]]; then kept+=("$c"); fi
    done
    configs=("${kept[@]}")
fi

tmp=$(mktemp -d)
cluster_pids=()
trap 'rm -rf "$tmp"; [ -n "${server_pid:-}" ] && kill "$server_pid" 2>/dev/null || true; for p in "${cluster_pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT

# Rows with RATE_LIMIT_REDIS_CLUSTER=CLUSTER run on a three-master Redis
# Cluster of the harness's own (ports 17001-17003, no replicas).
CLUSTER_PORTS=(17001 17002 17003)
CLUSTER_NODES=$(printf 'redis://127.0.0.1:%s,' "${CLUSTER_PORTS[@]}"); CLUSTER_NODES=${CLUSTER_NODES%,}
if printf '%s\n' "${configs[@]}" | grep -q 'CLUSTER=CLUSTER'; then
    for port in "${CLUSTER_PORTS[@]}"; do
        mkdir -p "$tmp/redis-$port"
        redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
            --cluster-enabled yes --cluster-require-full-coverage no --dir "$tmp/redis-$port" >/dev/null &
        cluster_pids+=($!)
    done
    for port in "${CLUSTER_PORTS[@]}"; do
        for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
    done
    redis-cli --cluster create $(printf '127.0.0.1:%s ' "${CLUSTER_PORTS[@]}") \
        --cluster-replicas 0 --cluster-yes >/dev/null
    for port in "${CLUSTER_PORTS[@]}"; do
        for _ in $(seq 200); do
            redis-cli -p "$port" cluster info | grep -q cluster_state:ok && break; sleep 0.05
        done
    done
fi

to_ms() { # wrk latency like 1.23ms, 456.00us, 1.02s
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); print v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); print v + 0 }
        else if (v ~ /s$/) { sub(/s$/, "", v); print v * 1000 }
        else print v }'
}

# Script calls on the Redis of services.sh and on the cluster's masters.
evalsha_calls() {
    local total=0 port n ports=(6379)
    if [ ${#cluster_pids[@]} -gt 0 ]; then ports+=("${CLUSTER_PORTS[@]}"); fi
    for port in "${ports[@]}"; do
        n=$(redis-cli -h 127.0.0.1 -p "$port" info commandstats 2>/dev/null |
            awk -F'[:=,]' '/^cmdstat_evalsha:/ { print $3; found=1 } END { if (!found) print 0 }')
        total=$(( total + n ))
    done
    echo "$total"
}

# CPU time in clock ticks (utime + stime): of one process, and of every
# Postgres process (the backends serving the row's pool live through it).
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
pg_ticks() {
    local total=0 pid
    for pid in $(pgrep -u postgres || true); do total=$(( total + $(ticks "$pid") )); done
    echo "$total"
}
hz=$(getconf CLK_TCK)

# load CONNECTIONS RATE URL [ARGS...]: runs the load generator on its core
# and prints "req/s p50-ms p99-ms requests non-2xx".
load() {
    local connections=$1 rate=$2 url=$3
    shift 3
    if [ "$LOADGEN" = oha ]; then
        local rate_args=()
        if [ -n "$rate" ]; then rate_args=(-q "$rate"); fi
        taskset -c "$load_cpu" oha --no-tui --output-format json -z "${DURATION}s" \
            -c "$connections" "${rate_args[@]}" "$@" "$url" >"$tmp/load.json"
        jq -r '[.summary.requestsPerSec,
                .latencyPercentiles.p50 * 1000, .latencyPercentiles.p99 * 1000,
                ([.statusCodeDistribution[]] | add // 0),
                ([.statusCodeDistribution | to_entries[] | select(.key | startswith("2") | not) | .value] | add // 0)]
               | map(tostring) | join(" ")' "$tmp/load.json"
    else
        taskset -c "$load_cpu" wrk -t1 -c"$connections" -d"${DURATION}s" --latency "$@" \
            "$url" >"$tmp/wrk.txt"
        local non2xx
        non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $5 } /Socket errors/ { print "socket-errors" }' "$tmp/wrk.txt" | head -1)
        echo "$(awk '/^Requests\/sec:/ { print $2 }' "$tmp/wrk.txt")" \
            "$(to_ms "$(awk '$1 == "50%" { print $2 }' "$tmp/wrk.txt")")" \
            "$(to_ms "$(awk '$1 == "99%" { print $2 }' "$tmp/wrk.txt")")" \
            "$(awk '/requests in/ { print $1 }' "$tmp/wrk.txt")" "${non2xx:-0}"
    fi
}

for round in $(seq "$ROUNDS"); do
    for i in "${!configs[@]}"; do
        IFS='|' read -r name binary env extra path rate <<<"${configs[$i]}"
        env=${env//CLUSTER=CLUSTER/CLUSTER=$CLUSTER_NODES}
        prefix="bench-$$-$round-$i"
        if [ "$binary" = baseline ]; then
            bin=target/release/examples/baseline
        else
            bin=target/release/tollgate-server
        fi
        # shellcheck disable=SC2086
        env LISTEN_ADDR=127.0.0.1:$PORT RUST_LOG=warn RATE_LIMIT_REDIS_PREFIX=$prefix $env \
            taskset -c "$server_cpu" "$bin" >"$tmp/server.log" 2>&1 &
        server_pid=$!
        for _ in $(seq 100); do
            curl -s -o /dev/null "http://127.0.0.1:$PORT/api/v1/ping" && break
            sleep 0.05
        done
        before=$(evalsha_calls); cpu_before=$(ticks "$server_pid"); pg_before=$(pg_ticks)
        connections=$CONNECTIONS
        args=()
        if [ "$path" = /api/v1/items ]; then connections=$TENANT_CONNECTIONS; fi
        if [ "$extra" = AUTH ]; then args=(-H "authorization: Bearer $TOKEN"); fi
        if [ "$extra" = XFF ] && [ "$LOADGEN" = wrk ]; then args=(-s load-tests/xff.lua); fi
        read -r rps p50 p99 total non2xx < <(load "$connections" "$rate" "http://127.0.0.1:$PORT$path" "${args[@]}")
        after=$(evalsha_calls); cpu_after=$(ticks "$server_pid"); pg_after=$(pg_ticks)
        kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=
        calls=$(( after - before ))
        # CPU microseconds per request, of the server and of Postgres.
        cpu=$(awk -v t=$(( cpu_after - cpu_before )) -v n="$total" -v hz="$hz" 'BEGIN { printf "%.1f", (n > 0 ? t * 1e6 / hz / n : 0) }')
        pg_cpu=$(awk -v t=$(( pg_after - pg_before )) -v n="$total" -v hz="$hz" 'BEGIN { printf "%.1f", (n > 0 ? t * 1e6 / hz / n : 0) }')
        # Only the flood rows are meant to be refused; anything else
        # answering errors is not measuring what its name says.
        if [[ "$non2xx" =~ ^[0-9]+$ && "$non2xx" -gt 0 && "$name" != *"over-limit flood"* ]]; then
            echo "bench: \"$name\" got $non2xx non-2xx responses of $total; the end of its server's log:" >&2
            tail -5 "$tmp/server.log" >&2
            exit 1
        fi
        echo "$i|$round|$rps|$p50|$p99|$calls|$total|$non2xx|$cpu|$pg_cpu" >>"$tmp/results"
        printf 'round %s %-40s %10.0f req/s  p50 %7.3f ms  p99 %7.3f ms  evalsha %s  cpu µs/req %s + pg %s\n' \
            "$round" "$name" "$rps" "$p50" "$p99" "$calls" "$cpu" "$pg_cpu" >&2
    done
done

median() { sort -n | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

bare=$(awk -F'|' '$1 == 0 { print $3 }' "$tmp/results" | median)
# per_round I REF: the median over rounds of row I's req/s divided by row
# REF's of the same round. Rows of one round ran minutes apart at most, so
# this follows the machine's drift, which a ratio of medians over the
# whole run does not (both are printed).
per_round() {
    awk -F'|' -v i="$1" -v ref="$2" '
        $1 == ref { r[$2] = $3 } $1 == i { x[$2] = $3 }
        END { for (k in x) if (r[k] > 0) print x[k] / r[k] }' "$tmp/results" | median
}
echo
if [ "$LOADGEN" = oha ]; then
    tool="$(oha --version) -c$CONNECTIONS -z${DURATION}s, one client address"
else
    tool="wrk -t1 -c$CONNECTIONS -d${DURATION}s, $CLIENTS client addresses (xff.lua)"
fi
echo "$(date -u +%Y-%m-%d), $(nproc) cores, server on CPU $server_cpu, load on CPU $load_cpu, $tool; database rows c$TENANT_CONNECTIONS; median of $ROUNDS interleaved rounds (\`LOADGEN=$LOADGEN bash load-tests/bench.sh\`):"
echo
echo "| configuration | req/s | × bare axum (median of per-round ratios) | p50 ms | p99 ms | server CPU µs/request | Postgres CPU µs/request | Redis script calls per request | non-2xx |"
echo "|---|---|---|---|---|---|---|---|---|"
plain= plain_i=
for i in "${!configs[@]}"; do
    IFS="|" read -r name _ _ _ path _ <<<"${configs[$i]}"
    rps=$(awk -F'|' -v i="$i" '$1 == i { print $3 }' "$tmp/results" | median)
    p50=$(awk -F'|' -v i="$i" '$1 == i { print $4 }' "$tmp/results" | median)
    p99=$(awk -F'|' -v i="$i" '$1 == i { print $5 }' "$tmp/results" | median)
    per=$(awk -F'|' -v i="$i" '$1 == i { if ($7 > 0) print $6 / $7; else print 0 }' "$tmp/results" | median)
    non2xx=$(awk -F'|' -v i="$i" '$1 == i { print $8 }' "$tmp/results" | sort -n | tail -1)
    cpu=$(awk -F'|' -v i="$i" '$1 == i { print $9 }' "$tmp/results" | median)
    pg_cpu=$(awk -F'|' -v i="$i" '$1 == i { print $10 }' "$tmp/results" | median)
    ratio=$(awk -v a="$rps" -v b="$bare" -v r="$(per_round "$i" 0)" 'BEGIN { printf "%.2f (%.2f)", a / b, r }')
    if [[ "$name" == "tenant route, c"* || "$name" == *" [pooler]" || "$name" == *" [plans]" ]]; then
        ratio="(see below)"
    elif [ "$path" = /api/v1/items ]; then
        # Database rows compare with the plain transaction, not with ping:
        # each "plain transaction (…)" or "… at N req/s" row is the
        # reference of the database rows after it.
        if [[ "$name" == "plain transaction ("* || "$name" == "plain transaction at"* ]]; then
            plain="$rps $p50 $p99"; plain_i=$i; ratio="(reference)"
        else
            read -r prps pp50 pp99 <<<"$plain"
            ratio=$(awk -v a="$rps" -v b="$prps" -v l="$p50" -v m="$pp50" -v q="$p99" -v r="$pp99" \
                -v pr="$(per_round "$i" "$plain_i")" \
                'BEGIN { printf "%.2f× (%.2f) plain req/s; latency p50 %.2f×, p99 %.2f× plain", a / b, pr, l / m, q / r }')
        fi
    fi
    printf '| %s | %.0f | %s | %.3f | %.3f | %.1f | %.1f | %.3f | %s |\n' "$name" "$rps" "$ratio" "$p50" "$p99" "$cpu" "$pg_cpu" "$per" "$non2xx"
done

# The capacity layers' cost: each "[no capacity layers]" row against the
# row of the same name with them (the defaults).
echo
echo "| stack | with capacity layers req/s | without req/s | with / without (per round) | p50 ms with / without |"
echo "|---|---|---|---|---|"
for i in "${!configs[@]}"; do
    IFS="|" read -r name _ _ _ _ _ <<<"${configs[$i]}"
    case "$name" in *" [no capacity layers]") ;; *) continue ;; esac
    base_name=${name% \[no capacity layers\]}
    for j in "${!configs[@]}"; do
        IFS="|" read -r other _ _ _ _ _ <<<"${configs[$j]}"
        [ "$other" = "$base_name" ] || continue
        without=$(awk -F'|' -v i="$i" '$1 == i { print $3 }' "$tmp/results" | median)
        with=$(awk -F'|' -v i="$j" '$1 == i { print $3 }' "$tmp/results" | median)
        p50_without=$(awk -F'|' -v i="$i" '$1 == i { print $4 }' "$tmp/results" | median)
        p50_with=$(awk -F'|' -v i="$j" '$1 == i { print $4 }' "$tmp/results" | median)
        printf '| %s | %.0f | %.0f | %.3f (%.3f) | %.3f / %.3f |\n' "$base_name" "$with" "$without" \
            "$(awk -v a="$with" -v b="$without" 'BEGIN { print a / b }')" "$(per_round "$j" "$i")" \
            "$p50_with" "$p50_without"
    done
done

# Behind a pooler, and with plans: each "[pooler]" and "[plans]" row against
# the direct tenant route (the statement cache on, straight to Postgres, no
# TENANT_PLANS) of the same run.
direct= pooled=
for i in "${!configs[@]}"; do
    IFS="|" read -r name _ _ _ _ _ <<<"${configs[$i]}"
    if [[ -z "$direct" && "$name" == "tenant route: token, limits, RLS transaction"* ]]; then direct=$i; fi
    if [[ "$name" == *" [pooler]" || "$name" == *" [plans]" ]]; then pooled=1; fi
done
if [ -n "$direct" ] && [ -n "$pooled" ]; then
    direct_rps=$(awk -F'|' -v i="$direct" '$1 == i { print $3 }' "$tmp/results" | median)
    direct_p50=$(awk -F'|' -v i="$direct" '$1 == i { print $4 }' "$tmp/results" | median)
    echo
    echo "| tenant route (c$TENANT_CONNECTIONS) | req/s | × direct with statement cache (per round) | p50 ms | × direct p50 |"
    echo "|---|---|---|---|---|"
    printf '| direct, statement cache on (the default) | %.0f | 1.00 | %.3f | 1.00 |\n' "$direct_rps" "$direct_p50"
    for i in "${!configs[@]}"; do
        IFS="|" read -r name _ _ _ _ _ <<<"${configs[$i]}"
        [[ "$name" == *" [pooler]" || "$name" == *" [plans]" ]] || continue
        rps=$(awk -F'|' -v i="$i" '$1 == i { print $3 }' "$tmp/results" | median)
        p50=$(awk -F'|' -v i="$i" '$1 == i { print $4 }' "$tmp/results" | median)
        label=${name% \[pooler\]}
        printf '| %s | %.0f | %.3f (%.3f) | %.3f | %.3f |\n' "${label% \[plans\]}" "$rps" \
            "$(awk -v a="$rps" -v b="$direct_rps" 'BEGIN { print a / b }')" "$(per_round "$i" "$direct")" "$p50" \
            "$(awk -v a="$p50" -v b="$direct_p50" 'BEGIN { print a / b }')"
    done
fi
