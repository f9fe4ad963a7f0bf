-- Items are soft-deleted; the cleanup job (one replica per cycle, see
-- tollgate::singleton) purges them after ITEM_RETENTION.

ALTER TABLE items ADD COLUMN deleted_at timestamptz;
CREATE INDEX items_deleted_at ON items (deleted_at) WHERE deleted_at IS NOT NULL;
GRANT UPDATE (deleted_at) ON items TO tollgate_app;

-- The cleanup works across tenants, so it runs as the owner, through this
-- one function; it can only purge rows deleted longer ago than `retention`.
CREATE FUNCTION purge_deleted_items(retention interval)
RETURNS bigint
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
    WITH purged AS (
        DELETE FROM public.items WHERE deleted_at < now() - retention RETURNING 1
    )
    SELECT count(*) FROM purged
$$;
REVOKE ALL ON FUNCTION purge_deleted_items(interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION purge_deleted_items(interval) TO tollgate_app;

-- tollgate::singleton::SCHEMA: which replica ran which cycle of which job.
CREATE TABLE tollgate_singleton_runs (
    job         text        NOT NULL,
    cycle       bigint      NOT NULL,
    origin      text        NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job, cycle)
);
GRANT SELECT, INSERT ON tollgate_singleton_runs TO tollgate_app;
