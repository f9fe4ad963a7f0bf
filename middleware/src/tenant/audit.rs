//! [`audit`]: refuse to serve when the database role could bypass
//! row-level security.

use sqlx::{PgConnection, PgPool};

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
    /// A view over a tenant-scoped table that the role can read runs with
    /// its owner's rights (row-level security as the owner, who may bypass
    /// it) unless it is `security_invoker`; a materialized view always
    /// holds every tenant's rows.
    #[error(
        "view {view} reads tenant-scoped tables and the role can select from it, but it is not security_invoker (a materialized view never is); make it WITH (security_invoker = true) or revoke SELECT"
    )]
    ViewWithoutInvoker {
        /// `schema.view`.
        view: String,
    },
    /// A `SECURITY DEFINER` function the role can execute and the caller
    /// did not declare: it runs as its owner, around row-level security.
    #[error(
        "the role can execute SECURITY DEFINER function {function}, which is not one the schema declares; revoke EXECUTE or declare it"
    )]
    SecurityDefiner {
        /// `schema.name(argument types)`.
        function: String,
    },
    /// The audit's own queries failed.
    #[error("auditing the database role failed: {0}")]
    Database(#[from] sqlx::Error),
}

/// (table, owner, can act as owner, RLS enabled, RLS forced, has policy).
type TenantTable = (String, String, bool, bool, bool, bool);

/// Checks, once at start-up, that the role `pool` connects as cannot get
/// around row-level security: not a superuser, no `BYPASSRLS`, owns no
/// tenant-scoped table (directly or through role membership); that every
/// table with a `tenant_id` column in the schemas it can see has row level
/// security enabled, forced, and at least one policy; that no view it can
/// read runs over such a table with its owner's rights; and that it can
/// execute no `SECURITY DEFINER` function (see [`audit_allowing`] to
/// declare the ones a schema needs). The first failure is returned, naming
/// the role attribute, table, view or function.
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
    audit_allowing(pool, &[]).await
}

/// [`audit`], and also: no view over a tenant-scoped table that the role
/// can read runs with its owner's rights (it must be `security_invoker`;
/// no materialized view), and the only `SECURITY DEFINER` functions the
/// role can execute are those in `definers` (`schema.name`, e.g.
/// `public.auth_lookup`): the ones the schema declares on purpose.
pub async fn audit_allowing(pool: &PgPool, definers: &[&str]) -> Result<(), AuditError> {
    // One read-only transaction: one snapshot, and safe behind a
    // transaction-mode pooler, which keeps a server connection only for
    // the length of a transaction.
    let mut tx = pool.begin_with("BEGIN READ ONLY").await?;
    audit_in(&mut tx, definers).await?;
    tx.commit().await?;
    Ok(())
}

async fn audit_in(conn: &mut PgConnection, definers: &[&str]) -> Result<(), AuditError> {
    audit_role_and_tables(conn).await?;
    let views: Vec<(String,)> = sqlx::query_as(
        "SELECT DISTINCT format('%I.%I', vn.nspname, v.relname)
           FROM pg_class v
           JOIN pg_namespace vn ON vn.oid = v.relnamespace
           JOIN pg_rewrite r ON r.ev_class = v.oid
           JOIN pg_depend d ON d.objid = r.oid
                           AND d.classid = 'pg_rewrite'::regclass
                           AND d.refclassid = 'pg_class'::regclass
                           AND d.refobjid <> v.oid
           JOIN pg_attribute a ON a.attrelid = d.refobjid
                              AND a.attname = 'tenant_id' AND NOT a.attisdropped
          WHERE v.relkind IN ('v', 'm')
            AND has_table_privilege(current_user, v.oid, 'SELECT')
            AND (v.relkind = 'm'
                 OR NOT coalesce(v.reloptions @> ARRAY['security_invoker=true']
                                 OR v.reloptions @> ARRAY['security_invoker=on'], false))
            AND vn.nspname NOT IN ('pg_catalog', 'information_schema')
          ORDER BY 1",
    )
    .fetch_all(&mut *conn)
    .await?;
    if let Some((view,)) = views.into_iter().next() {
        return Err(AuditError::ViewWithoutInvoker { view });
    }
    let functions: Vec<(String, String)> = sqlx::query_as(
        "SELECT format('%I.%I', n.nspname, p.proname),
                format('%I.%I(%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid))
           FROM pg_proc p
           JOIN pg_namespace n ON n.oid = p.pronamespace
          WHERE p.prosecdef
            AND has_function_privilege(current_user, p.oid, 'EXECUTE')
            AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          ORDER BY 2",
    )
    .fetch_all(&mut *conn)
    .await?;
    match functions
        .into_iter()
        .find(|(name, _)| !definers.contains(&name.as_str()))
    {
        Some((_, function)) => Err(AuditError::SecurityDefiner { function }),
        None => Ok(()),
    }
}

/// The role's attributes and the tenant tables' row-level security.
async fn audit_role_and_tables(conn: &mut PgConnection) -> Result<(), AuditError> {
    let (role, superuser, bypass): (String, bool, bool) = sqlx::query_as(
        "SELECT rolname::text, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(&mut *conn)
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
    .fetch_all(&mut *conn)
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
