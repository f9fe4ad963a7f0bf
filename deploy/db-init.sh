#!/bin/sh
# Postgres image init hook (docker-entrypoint-initdb.d): creates the two
# roles and the database with scripts/db-setup.sql, passwords from env.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v owner_password="$TOLLGATE_OWNER_PASSWORD" \
    -v app_password="$TOLLGATE_APP_PASSWORD" \
    -f /tollgate/db-setup.sql
