//! [`begin`]: a transaction that has told Postgres its tenant.

use http::StatusCode;
use sqlx::{PgPool, Postgres, Transaction};

use super::TenantId;
use crate::problem::Problem;

/// The setting row-level security policies read:
/// `nullif(current_setting('app.tenant_id', true), '')::uuid`.
pub const TENANT_SETTING: &str = "app.tenant_id";

/// Whether a transaction may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `BEGIN READ WRITE`.
    ReadWrite,
    /// `BEGIN READ ONLY`: a handler bug cannot write, and a read-only
    /// transaction is cheaper to commit.
    ReadOnly,
}

impl Access {
    /// `ReadOnly` for `GET` and `HEAD`, `ReadWrite` otherwise.
    pub fn for_method(method: &http::Method) -> Self {
        if method == http::Method::GET || method == http::Method::HEAD {
            Self::ReadOnly
        } else {
            Self::ReadWrite
        }
    }
}

/// Begins a transaction on a connection from `pool` and sets
/// [`TENANT_SETTING`] to `tenant` for that transaction only.
///
/// - `SET LOCAL` is `set_config(…, true)` in statement form: the setting
///   dies with the transaction, commit or rollback, so a pooled connection
///   never carries a tenant into the next request that borrows it. As a
///   utility statement it is neither planned nor given a snapshot and
///   returns no row: Postgres spends about 27 µs less CPU per request
///   than on `SELECT set_config(…)` (the load harness, medians of five).
/// - `BEGIN` and the setting go in one simple-query message: one round
///   trip instead of two. Interpolating is safe because a [`TenantId`]
///   prints only `[0-9a-f-]` (a UUID) or `[A-Za-z0-9_.:-]` (a text id),
///   never a quote or a backslash.
/// - Cancel-safe: if the caller is dropped (the client went away) while
///   `BEGIN` is on the wire, sqlx (0.9.1 and later) has already queued the
///   `ROLLBACK` that ends it before the connection is reused, so no
///   connection goes back to the pool inside a transaction that still
///   holds the tenant (sqlx issue 4393). No task is spawned for it.
///
/// Dropping the returned transaction without committing rolls it back.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), sqlx::Error> {
/// use tollgate::tenant::{Access, TenantId, begin};
///
/// let tenant: TenantId = "0b9e3d4c-7c0e-4a55-9d8e-3f0a1b2c3d4e".parse().unwrap();
/// let mut tx = begin(&pool, tenant, Access::ReadOnly).await?;
/// // Row-level security now shows this tenant's rows only.
/// let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM items")
///     .fetch_one(&mut *tx)
///     .await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
pub async fn begin(
    pool: &PgPool,
    tenant: TenantId,
    access: Access,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    begin_recorded(pool, tenant, access, None).await
}

/// [`begin`], recorded with the handles of `registered` (a pool's,
/// registered once) or, without them, with handles registered now.
pub(crate) async fn begin_recorded(
    pool: &PgPool,
    tenant: TenantId,
    access: Access,
    registered: Option<&TxMetrics>,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    #[cfg(feature = "metrics")]
    let started = tokio::time::Instant::now();
    // Safe to interpolate: see above.
    let sql = sqlx::AssertSqlSafe(begin_sql(tenant, access));
    // Boxed: sqlx's `acquire` future holds the whole connect path (TLS
    // included), about 13 KB, which would otherwise be inline in every
    // future that awaits this one (handlers, extractors) and be copied
    // each time one of them is moved or boxed.
    let result = Box::pin(pool.begin_with(sql)).await;
    #[cfg(feature = "metrics")]
    match registered {
        Some(handles) => record_begin(
            &handles.begin_duration,
            &handles.acquire_timeouts,
            started,
            &result,
        ),
        None => record_begin(
            &metrics::histogram!(crate::metrics::TENANT_BEGIN_DURATION),
            &metrics::counter!(crate::metrics::DB_POOL_ACQUIRE_TIMEOUTS),
            started,
            &result,
        ),
    }
    #[cfg(not(feature = "metrics"))]
    let _ = registered;
    result
}

#[cfg(feature = "metrics")]
fn record_begin(
    duration: &metrics::Histogram,
    timeouts: &metrics::Counter,
    started: tokio::time::Instant,
    result: &Result<Transaction<'static, Postgres>, sqlx::Error>,
) {
    duration.record(started.elapsed().as_secs_f64());
    if let Err(sqlx::Error::PoolTimedOut) = result {
        timeouts.increment(1);
    }
}

fn begin_sql(tenant: TenantId, access: Access) -> String {
    let mode = match access {
        Access::ReadWrite => "READ WRITE",
        Access::ReadOnly => "READ ONLY",
    };
    // Pieces pushed, not `format!`: this runs on every tenant request.
    let mut sql = String::with_capacity(112);
    for piece in ["BEGIN ", mode, "; SET LOCAL ", TENANT_SETTING, " = '"] {
        sql.push_str(piece);
    }
    tenant.push_to(&mut sql);
    sql.push('\'');
    sql
}

/// How a tenant transaction ended (`tollgate_tenant_transactions_total`'s
/// `outcome`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome {
    Commit,
    Rollback,
    CommitError,
}

/// The tenant pool's and transactions' metric handles, registered on a
/// pool's first use rather than on every request (each `histogram!` or
/// `counter!` call hashes its name and searches the registry).
#[derive(Debug)]
pub(crate) struct TxMetrics {
    #[cfg(feature = "metrics")]
    begin_duration: metrics::Histogram,
    #[cfg(feature = "metrics")]
    pub(crate) acquire_duration: metrics::Histogram,
    #[cfg(feature = "metrics")]
    pub(crate) acquire_timeouts: metrics::Counter,
    #[cfg(feature = "metrics")]
    pub(crate) tenant_cap_rejections: metrics::Counter,
    /// Requests waiting at their tenant's cap or for the pool.
    #[cfg(feature = "metrics")]
    pub(crate) waiters: metrics::Gauge,
    /// By [`Outcome`].
    #[cfg(feature = "metrics")]
    outcomes: [metrics::Counter; 3],
}

impl TxMetrics {
    pub(crate) fn register() -> Self {
        #[cfg(feature = "metrics")]
        {
            use crate::metrics::{
                DB_POOL_ACQUIRE_DURATION, DB_POOL_ACQUIRE_TIMEOUTS, DB_POOL_WAITERS,
                DB_TENANT_CAP_REJECTIONS, TENANT_BEGIN_DURATION, TENANT_TRANSACTIONS,
            };
            Self {
                begin_duration: metrics::histogram!(TENANT_BEGIN_DURATION),
                acquire_duration: metrics::histogram!(DB_POOL_ACQUIRE_DURATION),
                acquire_timeouts: metrics::counter!(DB_POOL_ACQUIRE_TIMEOUTS),
                tenant_cap_rejections: metrics::counter!(DB_TENANT_CAP_REJECTIONS),
                waiters: metrics::gauge!(DB_POOL_WAITERS),
                outcomes: ["commit", "rollback", "commit_error"]
                    .map(|outcome| metrics::counter!(TENANT_TRANSACTIONS, "outcome" => outcome)),
            }
        }
        #[cfg(not(feature = "metrics"))]
        Self {}
    }

    /// Counts a transaction that ended as `outcome`.
    #[cfg_attr(not(feature = "metrics"), allow(clippy::unused_self))]
    pub(crate) fn ended(&self, outcome: Outcome) {
        #[cfg(feature = "metrics")]
        self.outcomes[outcome as usize].increment(1);
        #[cfg(not(feature = "metrics"))]
        let _ = outcome;
    }
}

/// A database error met in a tenant transaction, answered as problem
/// details that say no more than the client needs.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    /// The route has no [`TenantLayer`](super::TenantLayer) above it: a
    /// wiring bug, 500.
    #[error("no tenant layer above this handler")]
    MissingLayer,
    /// The handler asked for the transaction while it already held it.
    #[error("the tenant transaction is already in use by this request")]
    AlreadyInUse,
    /// The tenant held its whole share of the pool
    /// ([`TenantPool::with_tenant_max`](super::TenantPool::with_tenant_max))
    /// for as long as this request could wait.
    #[error("the tenant holds its whole share of database connections")]
    TenantAtCapacity,
    /// From Postgres or the pool.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl TenantError {
    /// 403 for a row-level security violation (SQLSTATE `42501`), 503 with
    /// `Retry-After` when no connection was free in time (for the pool, or
    /// within the tenant's share), 500 otherwise.
    pub fn to_problem(&self) -> Problem {
        match self {
            Self::Database(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42501") => {
                Problem::new(StatusCode::FORBIDDEN, "Forbidden")
                    .with_detail("the row belongs to another tenant")
            }
            Self::Database(sqlx::Error::PoolTimedOut) => {
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, "Database busy")
                    .with_detail("no database connection was free in time; retry shortly")
            }
            Self::TenantAtCapacity => Problem::new(StatusCode::SERVICE_UNAVAILABLE, "Tenant busy")
                .with_detail(
                    "this tenant's requests hold all the database connections it may have; \
                     retry shortly",
                ),
            _ => Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error"),
        }
    }
}

impl axum::response::IntoResponse for TenantError {
    fn into_response(self) -> axum::response::Response {
        let problem = self.to_problem();
        if problem.status().is_server_error() {
            tracing::error!(error = %self, "tenant transaction failed");
        }
        let busy = problem.status() == StatusCode::SERVICE_UNAVAILABLE;
        let mut res = problem.into_http_response().map(axum::body::Body::from);
        if busy {
            res.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("1"),
            );
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_statement_for_begin_and_setting() {
        let tenant: TenantId = "0B9E3D4C-7C0E-4A55-9D8E-3F0A1B2C3D4E".parse().unwrap();
        assert_eq!(
            begin_sql(tenant, Access::ReadOnly),
            "BEGIN READ ONLY; SET LOCAL app.tenant_id = '0b9e3d4c-7c0e-4a55-9d8e-3f0a1b2c3d4e'"
        );
        let text = TenantId::parse_any("org:42").unwrap();
        assert_eq!(
            begin_sql(text, Access::ReadWrite),
            "BEGIN READ WRITE; SET LOCAL app.tenant_id = 'org:42'"
        );
        for id in [tenant, text] {
            let mut pushed = String::new();
            id.push_to(&mut pushed);
            assert_eq!(pushed, id.to_string());
        }
        assert_eq!(Access::for_method(&http::Method::HEAD), Access::ReadOnly);
        assert_eq!(Access::for_method(&http::Method::PATCH), Access::ReadWrite);
    }
}
