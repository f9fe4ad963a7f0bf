//! [`AppState`]: what handlers and layers share, built once from the
//! configuration.

use std::sync::{Arc, OnceLock};

use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tollgate::health::Readiness;
use tollgate::rate_limit::FailurePolicy;
use tollgate::tenant::TenantPool;

use crate::auth::{self, Tokens};
use crate::config::Config;
use crate::db::{self, DbError};
use crate::limits::Limits;
use crate::plans::Plans;
use crate::trust::TrustLevels;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The rate-limit store.
    #[error("rate-limit store: {0}")]
    Store(#[from] tollgate::rate_limit::StoreError),
    /// The database.
    #[error("database: {0}")]
    Db(#[from] DbError),
    /// The listener.
    #[error("listen: {0}")]
    Io(#[from] std::io::Error),
}

/// What handlers and layers share: one pointer, so the clone axum makes
/// for every request is a single reference-count increment.
#[derive(Debug, Clone)]
pub struct AppState(Arc<AppStateInner>);

impl std::ops::Deref for AppState {
    type Target = AppStateInner;

    fn deref(&self) -> &AppStateInner {
        &self.0
    }
}

/// The fields of [`AppState`].
#[derive(Debug)]
pub struct AppStateInner {
    /// The configuration the server started with.
    pub config: Arc<Config>,
    /// Every limit: store, fallback, trust table, store health.
    pub limits: Limits,
    /// Whether this replica should get traffic.
    pub readiness: Readiness,
    /// Renders `/metrics`; `None` when no recorder is installed.
    pub metrics: Option<PrometheusHandle>,
    /// Postgres, as the app role: tenant requests (and logins), always
    /// through [`tenant_pool`](Self::tenant_pool).
    pub pool: PgPool,
    /// [`pool`](Self::pool), shared fairly between tenants.
    pub tenant_pool: TenantPool,
    /// The server's own small pool: readiness, trust lookups, jobs.
    pub system_pool: PgPool,
    /// Bounds password hashing.
    pub hashing: auth::HashGate,
    /// Issues and verifies bearer tokens.
    pub tokens: Tokens,
    /// Current trust levels, cached.
    pub trust: TrustLevels,
    /// Tenants' plans and overrides, cached.
    pub plans: Plans,
    /// `/openapi.json`, rendered once from the route declarations.
    pub openapi: OnceLock<bytes::Bytes>,
}

impl AppState {
    /// State for `config`, with its readiness checks started. Call within a
    /// Tokio runtime (stores and checks run background tasks).
    pub fn new(config: Config, metrics: Option<PrometheusHandle>) -> Result<Self, StartError> {
        let config = Arc::new(config);
        let limits = Limits::new(config.clone())?;
        let pool = db::pool(&config.database)?;
        let system_pool = db::system_pool(&config.database)?;
        let tenant_pool =
            TenantPool::new(pool.clone()).with_tenant_max(config.database.tenant_max_connections);
        let tokens = Tokens::new(
            &config.auth.secret,
            config.auth.token_ttl,
            &config.auth.issuer,
            &config.auth.audience,
        );
        let (ping_pool, schema_pool) = (system_pool.clone(), system_pool.clone());
        let mut checks = Readiness::builder()
            .interval(config.ready_check_interval)
            .timeout(config.ready_check_timeout)
            .check("postgres", move || {
                let pool = ping_pool.clone();
                async move { db::ping(&pool).await }
            })
            .check("migrations", move || {
                let pool = schema_pool.clone();
                async move { db::migrations_applied(&pool).await }
            });
        if limits.is_remote() {
            let store = limits.clone();
            let check = move || {
                let store = store.clone();
                async move { store.check_store().await }
            };
            // Without Redis a replica still serves under `open` or `local`:
            // then Redis is reported, not gating. The store's breaker logs
            // its transitions; the check does not log them again.
            checks = if config.failure_mode == FailurePolicy::Closed {
                checks.check("redis", check)
            } else {
                checks.non_critical_check("redis", check)
            }
            .logged_by_source();
        }
        // Trust and plan lookups together leave a system connection each
        // for a readiness check and a singleton job.
        let lookups = Arc::new(tokio::sync::Semaphore::new(
            (config.database.system_connections.saturating_sub(2) as usize).max(1),
        ));
        Ok(Self(Arc::new(AppStateInner {
            limits,
            readiness: checks.start(),
            metrics,
            trust: TrustLevels::new(
                system_pool.clone(),
                config.trust_cache_ttl,
                lookups.clone(),
                config.database.connection_timeout,
            ),
            plans: Plans::new(
                Arc::new(config.plans.clone()),
                system_pool.clone(),
                config.plan_cache_ttl,
                lookups,
                config.database.connection_timeout,
            ),
            hashing: auth::HashGate::new(config.capacity.hash_workers, config.capacity.hash_queue),
            pool,
            tenant_pool,
            system_pool,
            tokens,
            config,
            openapi: OnceLock::new(),
        })))
    }
}
