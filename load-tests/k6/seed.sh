#!/usr/bin/env bash
# Creates N tenants (default 20), each with user k6-user-<n>@example.com
# (trust level `trusted`, password $K6_PASSWORD), for the k6 scripts. Uses
# the server's CLI with the same DATABASE_URL as the server.
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-20}
password=${K6_PASSWORD:-k6-password-123}
cargo build -q --release -p tollgate-server
bin=target/release/tollgate-server
for i in $(seq "$n"); do
    tenant=$("$bin" tenant add "k6 tenant $i")
    "$bin" user add --tenant "$tenant" --email "k6-user-$i@example.com" \
        --password "$password" --trust-level trusted >/dev/null 2>&1 \
        || echo "seed: k6-user-$i exists already" >&2
done
echo "seed: $n k6 users"
