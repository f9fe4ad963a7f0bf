#!/usr/bin/env bash
# The docker-compose topology without Docker, on loopback: three release
# replicas (127.0.0.1:8081-8083, Redis store) whose requests go through
# PgBouncer in transaction mode (127.0.0.1:6432, from scripts/services.sh)
# and whose LISTEN connection goes to Postgres, Caddy on 127.0.0.1:8080
# (round robin, health checks on /ready), Prometheus on 127.0.0.1:9090
# scraping all three. Ctrl-C stops everything. Used by `make cluster`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/services.sh --with-test-tools
cargo build --release -p tollgate-server
bin=target/release/tollgate-server
dir=$(mktemp -d /tmp/tollgate-cluster.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT INT TERM

export DATABASE_URL=${DATABASE_URL:-postgres://tollgate_app:tollgate_app@127.0.0.1:6432/tollgate}
export DB_STATEMENT_CACHE=${DB_STATEMENT_CACHE:-0}
export DATABASE_DIRECT_URL=${DATABASE_DIRECT_URL:-postgres://tollgate_app:tollgate_app@127.0.0.1:5432/tollgate}
export MIGRATION_DATABASE_URL=${MIGRATION_DATABASE_URL:-postgres://tollgate_owner:tollgate_owner@127.0.0.1:5432/tollgate}
export AUTH_SECRET=${AUTH_SECRET:-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')}
# Migrations once, then replicas that do not run them.
"$bin" migrate
for port in 8081 8082 8083; do
    # Metrics on port + 1000 (9081…), as METRICS_ADDR in docker-compose.
    LISTEN_ADDR=127.0.0.1:$port METRICS_ADDR=127.0.0.1:$((port + 1000)) \
        DB_MIGRATE_ON_START=false RATE_LIMIT_STORE=redis \
        RATE_LIMIT_FALLBACK_REPLICAS=3 TRUSTED_PROXIES=127.0.0.1/32 \
        "$bin" >"$dir/server-$port.log" 2>&1 &
    pids+=($!)
done

cat >"$dir/Caddyfile" <<CADDY
{
	admin off
	auto_https off
	storage file_system $dir/caddy
}
http://:8080 {
	bind 127.0.0.1
	reverse_proxy 127.0.0.1:8081 127.0.0.1:8082 127.0.0.1:8083 {
		lb_policy round_robin
		lb_try_duration 2s
		health_uri /ready
		health_interval 1s
		health_timeout 1s
	}
}
CADDY
HOME=$dir caddy run --adapter caddyfile --config "$dir/Caddyfile" >"$dir/caddy.log" 2>&1 &
pids+=($!)

sed -e 's/server-1:9100/127.0.0.1:9081/; s/server-2:9100/127.0.0.1:9082/; s/server-3:9100/127.0.0.1:9083/' \
    -e "s#- alerts.yml#- $PWD/grafana/alerts.yml#" grafana/prometheus.yml >"$dir/prometheus.yml"
prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/prometheus" \
    --web.listen-address=127.0.0.1:9090 >"$dir/prometheus.log" 2>&1 &
pids+=($!)

echo "cluster: http://127.0.0.1:8080 (Caddy) → 8081, 8082, 8083; Prometheus http://127.0.0.1:9090"
echo "cluster: logs in $dir; Ctrl-C stops everything"
wait
