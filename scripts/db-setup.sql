-- Roles and database for Tollgate, run once by a superuser (or, on a
-- managed Postgres, by its admin role), e.g.:
--   psql -h HOST -U postgres -v owner_password=… -v app_password=… -f scripts/db-setup.sql
-- Re-running it is harmless.
--
-- tollgate_owner owns the schema and runs migrations. It has BYPASSRLS only
-- for the login lookup function (see the first migration).
-- tollgate_app is what the server connects as: not superuser, not the owner
-- of any table, no BYPASSRLS, not a member of tollgate_owner. The server
-- checks all of this at start-up and refuses to run otherwise.

\if :{?owner_password} \else \set owner_password tollgate_owner \endif
\if :{?app_password} \else \set app_password tollgate_app \endif
\if :{?database} \else \set database tollgate \endif

SELECT format('CREATE ROLE tollgate_owner LOGIN CREATEDB BYPASSRLS PASSWORD %L', :'owner_password')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tollgate_owner') \gexec
SELECT format('CREATE ROLE tollgate_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS PASSWORD %L', :'app_password')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tollgate_app') \gexec
SELECT format('CREATE DATABASE %I OWNER tollgate_owner', :'database')
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'database') \gexec

-- Postgres 14 and older let every role create objects in schema public;
-- an app role that can create a function or view there can plant one the
-- owner later runs. Only the owner creates (15 and later: the default).
\connect :database
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
