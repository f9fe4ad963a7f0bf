#!/usr/bin/env bash
# Instructions per request of each stack, a measure that does not move
# with the machine: cachegrind's instruction count for N and 3N in-process
# requests (examples/instructions.rs, current-thread runtime), difference
# over 2N. Needs valgrind (Debian's package).
#
#   bash load-tests/instructions.sh            # N = 3000
#   N=10000 bash load-tests/instructions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-3000}
command -v valgrind >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
cargo build --release -q -p tollgate --all-features --example instructions
bin=target/release/examples/instructions
irefs() { valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null "$bin" "$1" "$2" 2>&1 | awk '/I *refs:/ { gsub(",", "", $4); print $4 }'; }
echo "| stack | instructions per request | over bare |"
echo "|---|---|---|"
bare=
for stack in bare ratelimit metrics; do
    one=$(irefs "$stack" "$N"); three=$(irefs "$stack" $((3 * N)))
    per=$(( (three - one) / (2 * N) ))
    [ -z "$bare" ] && bare=$per
    echo "| $stack | $per | +$(( per - bare )) |"
done
echo
echo "$(date -u +%F), N=$N and 3N requests, cachegrind I refs, current-thread runtime"
