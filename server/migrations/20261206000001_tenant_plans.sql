-- Tenant plans: each tenant's plan (NULL: the deployment's default plan,
-- TENANT_DEFAULT_PLAN) and its overrides of the plan's limits, by limit
-- name ('tenant', 'read', 'write', 'concurrency'), as the text the server
-- parses (e.g. '100/min,burst=20', 'unlimited'). Changed by the CLI and the
-- operator API, which NOTIFY tollgate_plans in the same transaction.

ALTER TABLE tenants
    ADD COLUMN plan text CHECK (plan ~ '^[a-z][a-z0-9_-]{0,31}$'),
    ADD COLUMN limit_overrides jsonb NOT NULL DEFAULT '{}'::jsonb
        CHECK (jsonb_typeof(limit_overrides) = 'object'
               AND limit_overrides - ARRAY['tenant', 'read', 'write', 'concurrency'] = '{}'::jsonb);

-- Only these two columns; row-level security still limits a transaction to
-- its own tenant's row, and only the operator paths write them.
GRANT UPDATE (plan, limit_overrides) ON tenants TO tollgate_app;
