//! [`audit`]: refuse to serve when the database role could bypass
//! row-level security.

use sqlx::PgPool;

/// A reason row-level security would not isolate tenants for this role.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The role is a superuser: row-level security does not apply to it.
    #[error("database role {role:?} is a superuser; run the server as a role without SUPERUSER")]
    Superuser {
        /// The role the server connected as.
        role: String,
    },
    /// The role has `BYPASSRLS`.
    #[error("database role {role:?} has BYPASSRLS; run the server as a role without it")]
    BypassRls {
        /// The role the server connected as.
        role: String,
    },
    /// The role owns (or is a member of the owner of) a tenant-scoped
    /// table, so it could disable row-level security on it.
    #[error(
        "database role {role:?} owns, or can act as {owner:?} who owns, tenant-scoped table {table}"
    )]
    OwnsTable {
        /// The role the server connected as.
        role: String,
        /// The table's owner.
        owner: String,
        /// `schema.table`.
        table: String,
    },
    /// A table with a `tenant_id` column lacks `ENABLE ROW LEVEL SECURITY`.
    #[error("table {table} has a tenant_id column but row-level security is not enabled")]
    RlsDisabled {
        /// `schema.table`.
        table: String,
    },
    /// A table with a `tenant_id` column lacks `FORCE ROW LEVEL SECURITY`.
    #[error("table {table} has a tenant_id column but row-level security is not forced")]
    RlsNotForced {
        /// `schema.table`.
        table: String,
    },
    /// A table with a `tenant_id` column has no policy (so nobody sees a
    /// row; certainly a mistake).
    #[error("table {table} has a tenant_id column but no row-level security policy")]
    NoPolicy {
        /// `schema.table`.
        table: String,
    },
    /// The audit's own queries failed.
    #[error("auditing the database role failed: {0}")]
    Database(#[from] sqlx::Error),
}

/// (table, owner, can act as owner, RLS enabled, RLS forced, has policy).
type TenantTable = (String, String, bool, bool, bool, bool);

/// Checks, once at start-up, that the role `pool` connects as cannot get
/// around row-level security: not a superuser, no `BYPASSRLS`, owns no
/// tenant-scoped table (directly or through role membership); and that
/// every table with a `tenant_id` column in the schemas it can see has row
/// level security enabled, forced, and at least one policy. The first
/// failure is returned, naming the role attribute or the table.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) {
/// if let Err(err) = tollgate::tenant::audit(&pool).await {
///     eprintln!("refusing to start: {err}");
///     std::process::exit(1);
/// }
/// # }
/// ```
pub async fn audit(pool: &PgPool) -> Result<(), AuditError> {
    let (role, superuser, bypass): (String, bool, bool) = sqlx::query_as(
        "SELECT rolname::text, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(pool)
    .await?;
    if superuser {
        return Err(AuditError::Superuser { role });
    }
    if bypass {
        return Err(AuditError::BypassRls { role });
    }
    let tables: Vec<TenantTable> = sqlx::query_as(
        "SELECT format('%I.%I', n.nspname, c.relname) AS table,
                pg_get_userbyid(c.relowner)::text AS owner,
                pg_has_role(current_user, c.relowner, 'MEMBER') AS can_act_as_owner,
                c.relrowsecurity AS rls_enabled,
                c.relforcerowsecurity AS rls_forced,
                EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid) AS has_policy
           FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
           JOIN pg_attribute a ON a.attrelid = c.oid
          WHERE a.attname = 'tenant_id' AND NOT a.attisdropped
            AND c.relkind IN ('r', 'p')
            AND n.nspname NOT IN ('pg_catalog', 'information_schema')
            AND n.nspname NOT LIKE 'pg_toast%'
          ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    for (table, owner, can_act_as_owner, enabled, forced, has_policy) in tables {
        if can_act_as_owner {
            return Err(AuditError::OwnsTable { role, owner, table });
        }
        if !enabled {
            return Err(AuditError::RlsDisabled { table });
        }
        if !forced {
            return Err(AuditError::RlsNotForced { table });
        }
        if !has_policy {
            return Err(AuditError::NoPolicy { table });
        }
    }
    Ok(())
}
