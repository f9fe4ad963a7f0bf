//! Postgres: the pool, migrations, the start-up audit and readiness checks.

use std::str::FromStr;
use std::time::Duration;

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
    Sqlx(sqlx::Error),
    /// A named prepared statement met another client's on the same server
    /// connection, or was gone: the signature of a transaction-mode pooler.
    #[error(
        "{0} (DATABASE_URL looks like a transaction-mode pooler such as PgBouncer: set DB_STATEMENT_CACHE=0)"
    )]
    PreparedStatements(sqlx::Error),
    /// A migration failed.
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The role can get around row-level security.
    #[error("refusing to serve: {0}")]
    Audit(#[from] tollgate::tenant::AuditError),
}

impl From<sqlx::Error> for DbError {
    fn from(err: sqlx::Error) -> Self {
        // 42P05 duplicate_prepared_statement ("sqlx_s_1 already exists"),
        // 26000 invalid_sql_statement_name ("… does not exist").
        match &err {
            sqlx::Error::Database(db)
                if matches!(db.code().as_deref(), Some("42P05" | "26000")) =>
            {
                Self::PreparedStatements(err)
            }
            _ => Self::Sqlx(err),
        }
    }
}

/// `url` parsed, or an error naming `var`.
pub fn options(var: &'static str, url: &str) -> Result<PgConnectOptions, DbError> {
    PgConnectOptions::from_str(url).map_err(|source| DbError::Url {
        var,
        url: redact_url(url),
        source,
    })
}

/// `DATABASE_URL`'s options: the app role, through a pooler or not, with
/// `DB_STATEMENT_CACHE`.
///
/// Behind a transaction-mode pooler every statement must also run inside
/// an explicit transaction: with the cache off sqlx parses an unnamed
/// statement and binds it in a second exchange, and outside a transaction
/// the pooler may hand that exchange to another server connection, whose
/// unnamed statement is some other client's (measured through PgBouncer
/// 1.18: most such queries returned another query's result, silently).
/// A transaction keeps one server connection until it ends. The server
/// runs every query of its own in one.
pub fn app_options(config: &DatabaseConfig) -> Result<PgConnectOptions, DbError> {
    Ok(options("DATABASE_URL", &config.url)?.statement_cache_capacity(config.statement_cache))
}

/// `DATABASE_DIRECT_URL`'s options (else `DATABASE_URL`'s): a session of
/// its own, for LISTEN.
pub fn direct_options(config: &DatabaseConfig) -> Result<PgConnectOptions, DbError> {
    match &config.direct_url {
        Some(url) => options("DATABASE_DIRECT_URL", url),
        None => app_options(config),
    }
}

/// What falls back when `DATABASE_URL` is declared to go through a
/// transaction-mode pooler (`DB_STATEMENT_CACHE=0`) and no direct
/// connection is configured: said once at start-up, not discovered later.
pub fn pooler_fallbacks(config: &DatabaseConfig, listening: bool) -> Vec<&'static str> {
    let mut fallbacks = Vec::new();
    if config.statement_cache != 0 || config.direct_url.is_some() {
        return fallbacks;
    }
    if listening {
        fallbacks.push(
            "LISTEN runs on DATABASE_URL; through a transaction-mode pooler it receives \
             nothing, so trust changes made on other replicas apply within TRUST_CACHE_TTL only",
        );
    }
    if config.migrate_on_start && config.migration_url.is_none() {
        fallbacks.push(
            "migrations run on DATABASE_URL; through a transaction-mode pooler their session \
             lock is not held: set MIGRATION_DATABASE_URL (or DATABASE_DIRECT_URL)",
        );
    }
    fallbacks
}

/// A connection idle at least this long is tested (a round trip) before a
/// request gets it; one used more recently is not. sqlx already tests
/// every connection when it comes back to the pool, so a busy connection
/// was tested moments ago, and the test on acquire cost every request a
/// round trip for nothing (HikariCP's `aliveBypassWindowMs` is the same
/// idea, at 500 ms).
pub const TEST_IDLE_AFTER: Duration = Duration::from_secs(1);

/// Pool options that test a connection before a request gets it only
/// when it has been idle [`TEST_IDLE_AFTER`] or longer (sqlx's default
/// tests every one, a round trip per request).
pub fn tested_when_idle() -> PgPoolOptions {
    PgPoolOptions::new()
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            if meta.idle_for < TEST_IDLE_AFTER {
                return Box::pin(UsedRecently);
            }
            Box::pin(async move {
                sqlx::Connection::ping(conn).await?;
                Ok(true)
            })
        })
}

/// The answer for a connection used within [`TEST_IDLE_AFTER`]: keep it.
/// Zero-sized, so the box sqlx asks for allocates nothing (this is every
/// request's acquire).
struct UsedRecently;

impl std::future::Future for UsedRecently {
    type Output = Result<bool, sqlx::Error>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::task::Poll::Ready(Ok(true))
    }
}

/// The server's pool, sized from `DB_*`. Connections are opened lazily,
/// so a database that is down at start makes readiness fail, not the
/// process.
pub fn pool(config: &DatabaseConfig) -> Result<PgPool, DbError> {
    let options = app_options(config)?.application_name("tollgate-server");
    Ok(tested_when_idle()
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
    let options = app_options(config)?.application_name("tollgate-system");
    Ok(PgPoolOptions::new()
        .max_connections(config.system_connections)
        .idle_timeout(Some(config.idle_timeout).filter(|d| !d.is_zero()))
        .max_lifetime(Some(config.max_lifetime).filter(|d| !d.is_zero()))
        .acquire_timeout(config.connection_timeout)
        .connect_lazy_with(options))
}

/// Applies pending migrations as the owner role (`MIGRATION_DATABASE_URL`,
/// else `DATABASE_DIRECT_URL`, else `DATABASE_URL`). Concurrent callers
/// are serialised by sqlx's session advisory lock, so replicas starting
/// together do not race; that lock is why the connection must be direct.
pub async fn migrate(config: &DatabaseConfig) -> Result<(), DbError> {
    let options = match (&config.migration_url, &config.direct_url) {
        (Some(url), _) => options("MIGRATION_DATABASE_URL", url)?,
        (None, Some(url)) => options("DATABASE_DIRECT_URL", url)?,
        (None, None) => app_options(config)?,
    };
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(config.connection_timeout)
        .connect_with(options.application_name("tollgate-migrate"))
        .await?;
    MIGRATOR.run(&pool).await?;
    pool.close().await;
    Ok(())
}

/// Readiness: Postgres answers. One simple-protocol message, so it is
/// safe through a transaction-mode pooler outside a transaction.
pub async fn ping(pool: &PgPool) -> Result<(), String> {
    sqlx::raw_sql("SELECT 1")
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
    let read = async {
        // In a transaction, as every query behind a pooler (see `app_options`).
        let mut tx = pool.begin_with("BEGIN READ ONLY").await?;
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>(applied)
    };
    let applied = read.await.map_err(|e| e.to_string())?;
    match applied {
        Some(v) if v >= latest => Ok(()),
        Some(v) => Err(format!("schema at {v}, this build needs {latest}")),
        None => Err(format!("no migration applied, this build needs {latest}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database(vars: &[(&str, &str)]) -> DatabaseConfig {
        DatabaseConfig::from_lookup(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        })
        .unwrap()
    }

    #[test]
    fn a_declared_pooler_without_a_direct_url_names_what_falls_back() {
        // Direct (the default cache): nothing to say.
        assert!(pooler_fallbacks(&database(&[]), true).is_empty());
        let pooled = database(&[("DB_STATEMENT_CACHE", "0")]);
        let said = pooler_fallbacks(&pooled, true);
        assert_eq!(said.len(), 2, "{said:?}");
        assert!(said[0].contains("TRUST_CACHE_TTL") && said[1].contains("MIGRATION_DATABASE_URL"));
        // Without the listener, or with migrations elsewhere: less to say.
        assert_eq!(pooler_fallbacks(&pooled, false).len(), 1);
        let migrated = database(&[
            ("DB_STATEMENT_CACHE", "0"),
            ("MIGRATION_DATABASE_URL", "postgres://o@db/t"),
        ]);
        assert_eq!(pooler_fallbacks(&migrated, true).len(), 1);
        // A direct URL: nothing falls back.
        let direct = database(&[
            ("DB_STATEMENT_CACHE", "0"),
            ("DATABASE_DIRECT_URL", "postgres://a@db/t"),
        ]);
        assert!(pooler_fallbacks(&direct, true).is_empty());
        assert_eq!(
            direct_options(&direct).unwrap().get_host(),
            "db",
            "LISTEN on the direct URL"
        );
    }
}
