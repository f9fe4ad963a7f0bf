//! Postgres: the pool, migrations, the start-up audit and readiness checks.

use std::str::FromStr;

use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::{DatabaseConfig, redact_url};

/// The schema, embedded at compile time from `server/migrations/`.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The `SECURITY DEFINER` functions the migrations declare, the only ones
/// the app role may execute (the start-up audit refuses any other).
pub const SECURITY_DEFINERS: &[&str] = &["public.auth_lookup", "public.purge_deleted_items"];

/// Why the database could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// A URL sqlx cannot use.
    #[error("invalid {var} ({url}): {source}")]
    Url {
        /// The variable that held it.
        var: &'static str,
        /// The URL, password redacted.
        url: String,
        /// Why.
        source: sqlx::Error,
    },
    /// Connecting or querying failed.
    #[error("{0}")]
    Sqlx(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The role can get around row-level security.
    #[error("refusing to serve: {0}")]
    Audit(#[from] tollgate::tenant::AuditError),
}

/// `url` parsed, or an error naming `var`.
pub fn options(var: &'static str, url: &str) -> Result<PgConnectOptions, DbError> {
    PgConnectOptions::from_str(url).map_err(|source| DbError::Url {
        var,
        url: redact_url(url),
        source,
    })
}

/// The server's pool, sized from `DB_*`. Connections are opened lazily,
/// so a database that is down at start makes readiness fail, not the
/// process.
pub fn pool(config: &DatabaseConfig) -> Result<PgPool, DbError> {
    let options = options("DATABASE_URL", &config.url)?.application_name("tollgate-server");
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .min_connections(config.min_connections)
        .idle_timeout(Some(config.idle_timeout).filter(|d| !d.is_zero()))
        .max_lifetime(Some(config.max_lifetime).filter(|d| !d.is_zero()))
        .acquire_timeout(config.connection_timeout)
        .connect_lazy_with(options))
}

/// The small pool for the server's own work (readiness checks, trust
/// lookups, the LISTEN connection, singleton jobs), apart from tenant
/// traffic: however loaded the request pool is, readiness measures
/// Postgres itself.
pub fn system_pool(config: &DatabaseConfig) -> Result<PgPool, DbError> {
    let options = options("DATABASE_URL", &config.url)?.application_name("tollgate-system");
    Ok(PgPoolOptions::new()
        .max_connections(config.system_connections)
        .idle_timeout(Some(config.idle_timeout).filter(|d| !d.is_zero()))
        .max_lifetime(Some(config.max_lifetime).filter(|d| !d.is_zero()))
        .acquire_timeout(config.connection_timeout)
        .connect_lazy_with(options))
}

/// Applies pending migrations as the owner role (`MIGRATION_DATABASE_URL`,
/// else `DATABASE_URL`). Concurrent callers are serialised by sqlx's
/// advisory lock, so replicas starting together do not race.
pub async fn migrate(config: &DatabaseConfig) -> Result<(), DbError> {
    let (var, url) = match &config.migration_url {
        Some(url) => ("MIGRATION_DATABASE_URL", url),
        None => ("DATABASE_URL", &config.url),
    };
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(config.connection_timeout)
        .connect_with(options(var, url)?.application_name("tollgate-migrate"))
        .await?;
    MIGRATOR.run(&pool).await?;
    pool.close().await;
    Ok(())
}

/// Readiness: Postgres answers.
pub async fn ping(pool: &PgPool) -> Result<(), String> {
    sqlx::query("SELECT 1")
        .execute(pool)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Readiness: every migration this build knows is applied (a replica of a
/// newer build must not serve against an older schema).
pub async fn migrations_applied(pool: &PgPool) -> Result<(), String> {
    let Some(latest) = MIGRATOR.iter().map(|m| m.version).max() else {
        return Ok(());
    };
    let applied: Option<i64> =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await
            .map_err(|e| e.to_string())?;
    match applied {
        Some(v) if v >= latest => Ok(()),
        Some(v) => Err(format!("schema at {v}, this build needs {latest}")),
        None => Err(format!("no migration applied, this build needs {latest}")),
    }
}
