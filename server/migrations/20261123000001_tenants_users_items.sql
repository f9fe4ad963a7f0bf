-- Tenants, users and one tenant-scoped resource, isolated by row-level
-- security on the transaction-local setting app.tenant_id.
--
-- Runs as the owner role (tollgate_owner, BYPASSRLS so that the login
-- lookup below can find a user before the tenant is known). The server
-- runs as tollgate_app: not superuser, not owner, no BYPASSRLS; it gets
-- only the grants at the end of this file.
--
-- Policies compare with nullif(current_setting('app.tenant_id', true), ''):
-- on a connection that once had the setting it reads '' rather than NULL,
-- and NULL matches no row. No policy here falls back to anything.

CREATE TABLE tenants (
    id         uuid PRIMARY KEY,
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id     uuid NOT NULL REFERENCES tenants (id),
    email         text NOT NULL UNIQUE CHECK (email = lower(email) AND length(email) BETWEEN 3 AND 254),
    password_hash text NOT NULL,
    trust_level   text NOT NULL DEFAULT 'new' CHECK (trust_level ~ '^[a-z][a-z0-9_-]{0,31}$'),
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX users_tenant_id ON users (tenant_id);

CREATE TABLE items (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- Defaults to the transaction's tenant; the policy checks it anyway.
    tenant_id  uuid NOT NULL DEFAULT nullif(current_setting('app.tenant_id', true), '')::uuid
                   REFERENCES tenants (id),
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    body       text NOT NULL DEFAULT '' CHECK (length(body) <= 10000),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- Keyset pagination within a tenant: (created_at, id).
CREATE INDEX items_tenant_page ON items (tenant_id, created_at, id);

ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenants FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tenants
    USING (id = nullif(current_setting('app.tenant_id', true), '')::uuid)
    WITH CHECK (id = nullif(current_setting('app.tenant_id', true), '')::uuid);

ALTER TABLE users ENABLE ROW LEVEL SECURITY;
ALTER TABLE users FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON users
    USING (tenant_id = nullif(current_setting('app.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = nullif(current_setting('app.tenant_id', true), '')::uuid);

ALTER TABLE items ENABLE ROW LEVEL SECURITY;
ALTER TABLE items FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON items
    USING (tenant_id = nullif(current_setting('app.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = nullif(current_setting('app.tenant_id', true), '')::uuid);

-- Login happens before the tenant is known: this one function, running as
-- the owner, finds a user by e-mail across tenants. It returns the hash
-- for the server to verify; it reveals nothing else.
CREATE FUNCTION auth_lookup(p_email text)
RETURNS TABLE (user_id uuid, tenant_id uuid, password_hash text, trust_level text)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
    SELECT id, tenant_id, password_hash, trust_level FROM public.users WHERE email = lower(p_email)
$$;
REVOKE ALL ON FUNCTION auth_lookup(text) FROM PUBLIC;

GRANT SELECT, INSERT ON tenants TO tollgate_app;
GRANT SELECT, INSERT, UPDATE (trust_level, password_hash) ON users TO tollgate_app;
GRANT SELECT, INSERT, UPDATE (name, body, updated_at), DELETE ON items TO tollgate_app;
GRANT EXECUTE ON FUNCTION auth_lookup(text) TO tollgate_app;
-- For the "migrations applied" readiness check.
GRANT SELECT ON _sqlx_migrations TO tollgate_app;
