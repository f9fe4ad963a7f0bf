#!/usr/bin/env bash
# Instructions per request of each stack, a measure that does not move
# with the machine: cachegrind's instruction count for N and 3N in-process
# requests (server/examples/instructions.rs, current-thread runtime), difference
# over 2N. Needs valgrind (Debian's package).
#
#   bash load-tests/instructions.sh            # N = 3000
#   N=10000 ROUNDS=5 bash load-tests/instructions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-3000}
command -v valgrind >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
cargo build --release -q -p tollgate-server --example instructions
bin=target/release/examples/instructions
irefs() { valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null "$bin" "$1" "$2" 2>&1 | awk '/I *refs:/ { gsub(",", "", $4); print $4 }'; }
# Hash seeds and addresses differ between runs (a few hundred instructions
# of noise per request): each count is the median of ROUNDS runs (5).
ROUNDS=${ROUNDS:-5}
echo "| stack | instructions per request | over bare |"
echo "|---|---|---|"
bare=
for stack in bare ratelimit governor metrics prometheus; do
    per=$(for _ in $(seq "$ROUNDS"); do
        one=$(irefs "$stack" "$N"); three=$(irefs "$stack" $((3 * N)))
        echo $(( (three - one) / (2 * N) ))
    done | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
    [ -z "$bare" ] && bare=$per
    echo "| $stack | $per | +$(( per - bare )) |"
done
echo
echo "$(date -u +%F), N=$N and 3N requests, median of $ROUNDS, cachegrind I refs, current-thread runtime"
