#!/usr/bin/env bash
# Accuracy of every store mode against its documented bound: runs
# server/tests/accuracy.rs for ACCURACY_SECONDS per mode (default 20) and
# prints its markdown table (admitted vs an exact GCRA bucket fed the same
# arrivals, the largest over-admission, early denials, 503s).
#
#   bash load-tests/accuracy.sh
#   ACCURACY_SECONDS=60 bash load-tests/accuracy.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh --with-test-tools >/dev/null
export ACCURACY_SECONDS=${ACCURACY_SECONDS:-20}
echo "$(date -u +%F), $(nproc) cores, ACCURACY_SECONDS=$ACCURACY_SECONDS"
cargo test -q --release -p tollgate-server --test accuracy -- --nocapture 2>&1 |
    sed -n '/per mode/,/^| redis killed half way, fail closed/p'
