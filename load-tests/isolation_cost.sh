#!/usr/bin/env bash
# What tenant isolation costs Postgres, with no server in the way: pgbench
# runs the tenant route's list query (a first page of 20 items) in three
# transactions, in interleaved rounds:
# - plain: BEGIN; the query with the tenant as a literal; COMMIT, as the
#   owner role, which row-level security does not filter (the load
#   harness's plain reference);
# - set local: BEGIN READ ONLY and SET LOCAL app.tenant_id in one round
#   trip, as `tollgate::tenant` begins; the same query; COMMIT;
# - row-level security: as set local, but as the application role, the
#   tenant taken from the setting by the table's policy (the tenant
#   route's transaction).
# Simple protocol: every statement is parsed, as the BEGIN … SET LOCAL
# string always is. Needs the migrated database of scripts/services.sh.
#
#   bash load-tests/isolation_cost.sh
#   CLIENTS=8 ROUNDS=5 DURATION=10 bash load-tests/isolation_cost.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${CLIENTS:-4}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
APP_URL=${DATABASE_URL:-postgres://tollgate_app:tollgate_app@127.0.0.1:5432/tollgate}
OWNER_URL=${MIGRATION_DATABASE_URL:-postgres://tollgate_owner:tollgate_owner@127.0.0.1:5432/tollgate}
# Debian ships pgbench with the server, off the PATH.
pgbench=$(command -v pgbench || ls /usr/lib/postgresql/*/bin/pgbench 2>/dev/null | tail -1)
[ -x "$pgbench" ] || { echo "pgbench not found (Debian: postgresql-15)" >&2; exit 1; }

tmp=$(mktemp -d)
# A tenant of its own with 20 items, written as the route writes them,
# removed at the end.
tenant=$(cat /proc/sys/kernel/random/uuid)
cleanup() {
    psql -q "$OWNER_URL" -c "DELETE FROM items WHERE tenant_id = '$tenant'" \
        -c "DELETE FROM tenants WHERE id = '$tenant'" >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT
psql -q -v ON_ERROR_STOP=1 "$APP_URL" >/dev/null <<SQL
BEGIN;
SET LOCAL app.tenant_id = '$tenant';
INSERT INTO tenants (id, name) VALUES ('$tenant', 'isolation-cost');
INSERT INTO items (name) SELECT 'item ' || n FROM generate_series(1, 20) AS n;
COMMIT;
SQL

# The route's query (server/src/routes/items.rs), first page.
query="SELECT id, name, body, created_at, updated_at FROM items
 WHERE deleted_at IS NULL AND (NULL::uuid IS NULL
   OR (created_at, id) > (SELECT created_at, id FROM items WHERE id = NULL::uuid))"
page="ORDER BY created_at, id LIMIT 21"
begin="BEGIN READ ONLY \\; SET LOCAL app.tenant_id = '$tenant';"
printf 'BEGIN;\n%s AND tenant_id = %s %s;\nCOMMIT;\n' "$(echo $query)" "'$tenant'" "$page" >"$tmp/plain.sql"
printf '%s\n%s AND tenant_id = %s %s;\nCOMMIT;\n' "$begin" "$(echo $query)" "'$tenant'" "$page" >"$tmp/set_local.sql"
printf '%s\n%s %s;\nCOMMIT;\n' "$begin" "$(echo $query)" "$page" >"$tmp/rls.sql"

# Each transaction must see the 20 items, or the comparison is of nothing.
for shape in plain set_local rls; do
    url=$OWNER_URL
    [ "$shape" = rls ] && url=$APP_URL
    rows=$(sed 's/\\;/;/' "$tmp/$shape.sql" | psql -qAt "$url" | grep -c . || true)
    [ "$rows" -ge 20 ] || { echo "$shape: $rows rows, not 20" >&2; exit 1; }
done

declare -A tps
for round in $(seq "$ROUNDS"); do
    for shape in plain set_local rls; do
        url=$OWNER_URL
        [ "$shape" = rls ] && url=$APP_URL
        t=$("$pgbench" -n -M simple -c "$CLIENTS" -j 1 -T "$DURATION" -f "$tmp/$shape.sql" "$url" 2>/dev/null |
            awk '/^tps/ { printf "%.0f", $3 }')
        tps[$shape]="${tps[$shape]:-} $t"
        echo "round $round $shape $t tps" >&2
    done
done

median() { tr ' ' '\n' | grep . | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
plain=$(echo "${tps[plain]}" | median)
echo "| transaction | transactions/s | × plain | rounds |"
echo "|---|---|---|---|"
for shape in plain set_local rls; do
    m=$(echo "${tps[$shape]}" | median)
    case $shape in
        plain) name="BEGIN; the query, tenant as a literal; COMMIT (owner)" ;;
        set_local) name="BEGIN READ ONLY + SET LOCAL; the same; COMMIT (owner)" ;;
        rls) name="BEGIN READ ONLY + SET LOCAL; the query under row-level security; COMMIT (app role)" ;;
    esac
    echo "| $name | $m | $(awk -v a="$m" -v b="$plain" 'BEGIN { printf "%.2f", a / b }') |${tps[$shape]} |"
done
echo
echo "$(date -u +%F), pgbench -M simple -c $CLIENTS -j 1 -T $DURATION, medians of $ROUNDS interleaved rounds"
