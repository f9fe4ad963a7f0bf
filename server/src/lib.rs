//! The Tollgate reference server: a small axum API wired with Tollgate's
//! layers, configured from the environment.
//!
//! `main.rs` stays thin; [`app`] builds the router (tests drive it with
//! `oneshot`) and [`run`] serves it until a shutdown signal.

pub mod auth;
pub mod cleanup;
pub mod cli;
pub mod config;
pub mod db;
pub mod error;
pub mod limits;
pub mod openapi;
pub mod routes;
pub mod serve;
pub mod store;
pub mod trust;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::DefaultBodyLimit;
use axum::http::Request;
use axum::response::Response;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tollgate::client_ip::SetClientIpLayer;
use tollgate::health::Readiness;
use tollgate::metrics::HttpMetricsLayer;
use tollgate::rate_limit::FailurePolicy;
use tollgate::tenant::{FromClaims, TenantLayer, TenantPool};
use tollgate::timeout::{BodyTimeoutLayer, RequestTimeoutLayer};
use tower::{Service, ServiceBuilder};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

use crate::auth::{Claims, Tokens};
use crate::config::Config;
use crate::db::DbError;
use crate::limits::RouteClass;
use crate::store::AppStore;

/// Largest request body the API reads (413 above).
pub const BODY_LIMIT: usize = 64 * 1024;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The rate-limit store.
    #[error("rate-limit store: {0}")]
    Store(#[from] tollgate::rate_limit::StoreError),
    /// The database.
    #[error("database: {0}")]
    Db(#[from] DbError),
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
    /// Where rate limits are counted.
    pub store: AppStore,
    /// Where they are counted while `store` fails (`RATE_LIMIT_FAILURE_MODE=local`):
    /// one for the whole server.
    pub fallback: tollgate::rate_limit::LocalFallback,
    /// Whether this replica should get traffic.
    pub readiness: Readiness,
    /// Renders `/metrics`; `None` when no recorder is installed (tests).
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
    pub trust: trust::TrustLevels,
}

impl AppState {
    /// State for `config`, with its readiness checks started. Call within a
    /// Tokio runtime (stores and checks run background tasks).
    pub fn new(config: Config, metrics: Option<PrometheusHandle>) -> Result<Self, StartError> {
        let store = AppStore::new(&config.store)?;
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
        if let AppStore::Redis(redis) = &store {
            let redis = redis.clone();
            let ping = move || {
                let redis = redis.clone();
                async move { redis.ping().await.map_err(|e| e.to_string()) }
            };
            // Without Redis a replica still serves under `open` or `local`:
            // then Redis is reported, not gating.
            checks = if config.failure_mode == FailurePolicy::Closed {
                checks.check("redis", ping)
            } else {
                checks.non_critical_check("redis", ping)
            };
        }
        Ok(Self(Arc::new(AppStateInner {
            store,
            fallback: tollgate::rate_limit::LocalFallback::new(config.fallback_replicas),
            readiness: checks.start(),
            metrics,
            // Leaves a system connection each for a readiness check and a
            // singleton job.
            trust: trust::TrustLevels::new(
                system_pool.clone(),
                config.trust_cache_ttl,
                config.database.system_connections.saturating_sub(2) as usize,
                config.database.connection_timeout,
            ),
            hashing: auth::HashGate::new(config.capacity.hash_workers, config.capacity.hash_queue),
            pool,
            tenant_pool,
            system_pool,
            tokens,
            config: Arc::new(config),
        })))
    }
}

/// The server: the router, wrapped in the request-wide layers, outermost
/// first: request id → trace → request deadline → client IP → body
/// deadline → body limit → `Connection: close` while draining. They wrap
/// the router as one service instead of being added with `Router::layer`,
/// which would box and clone the whole stack for every route on every
/// request; only the metrics layer sits in the router, because it labels
/// by the matched route. Limits sit on routes (see [`limits`] for which
/// policy applies where), so health probes are never limited or shed.
/// Tenant routes: authentication → concurrency per tenant and user →
/// current trust level → load shedding by level → tenant transaction →
/// route-class limits → handler; the transaction begins only when the
/// handler asks for it (after reading its body), so neither a rejected
/// request nor a slow client holds a database connection.
pub fn app(
    state: AppState,
) -> impl Service<Request<Body>, Response = Response, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    let config = &state.config;
    let public_api = routes::api::router()
        .merge(openapi::router())
        .route_layer(limits::public(&state));
    let login = routes::auth::router().route_layer(limits::login(&state));
    let tenant_api = routes::items::router(
        limits::authenticated(&state, RouteClass::Read),
        limits::authenticated(&state, RouteClass::Write),
    )
    .merge(routes::users::router(limits::authenticated(
        &state,
        RouteClass::Write,
    )))
    .route_layer(TenantLayer::new(
        state.tenant_pool.clone(),
        FromClaims::<Claims>::new(),
    ))
    .route_layer(limits::shed(&state))
    // The level in the token may be stale: the limits use the current one.
    .route_layer(axum::middleware::from_fn_with_state(
        trust::CurrentTrust {
            levels: state.trust.clone(),
            lowest: config
                .limits
                .trust
                .first()
                .map_or_else(|| "".into(), |(l, _)| l.as_str().into()),
        },
        trust::current_trust,
    ))
    .route_layer(limits::concurrency(config))
    .route_layer(axum::middleware::from_fn_with_state(
        state.tokens.clone(),
        auth::require_auth,
    ));

    let mut router = Router::new()
        .merge(state.readiness.router())
        .merge(public_api)
        .merge(login)
        .merge(tenant_api);
    if config.metrics_addr.is_none() {
        router = router.merge(routes::metrics::router());
    }
    let readiness = state.readiness.clone();
    let proxies = config.trusted_proxies.clone();
    let http = config.http;
    let router = router
        .fallback(routes::not_found)
        // Inside the router (so it sees the matched route), outside the
        // limiter (so 429s are counted).
        .layer(HttpMetricsLayer::new())
        .with_state(state);
    ServiceBuilder::new()
        // axum::serve wants axum's body type.
        .map_response(|res: http::Response<_>| res.map(Body::new))
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request<_>| {
                    let request_id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-");
                    tracing::info_span!(
                        "request",
                        method = %req.method(),
                        uri = %req.uri(),
                        request_id,
                    )
                })
                // One line per request at the default level.
                .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)),
        )
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(RequestTimeoutLayer::optional(http.request_timeout))
        .layer(SetClientIpLayer::new(proxies))
        .layer(BodyTimeoutLayer::optional(http.body_read_timeout))
        .map_request(|req: Request<_>| req.map(Body::new))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .map_response(move |res| close_when_draining(&readiness, res))
        .service(router)
}

/// While draining, asks clients to close their connection after this
/// response, so keep-alive clients reconnect through the load balancer to
/// another replica.
fn close_when_draining(readiness: &Readiness, mut res: Response) -> Response {
    if readiness.is_draining() {
        res.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    res
}

/// Serves on `listener` until `shutdown` resolves, then drains: readiness
/// fails and responses carry `Connection: close` for the drain delay, while
/// the server keeps serving; then it stops accepting and lets in-flight
/// requests finish for at most the shutdown timeout.
///
/// `metrics` renders `/metrics` (the recorder is installed by the caller,
/// once per process); its upkeep runs here.
pub async fn run(
    listener: TcpListener,
    config: Config,
    metrics: Option<PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let timeout = config.shutdown_timeout;
    let drain_delay = config.shutdown_drain_delay;
    let metrics_addr = config.metrics_addr;
    let database = config.database.clone();
    if config.auth.secret_generated {
        tracing::warn!(
            "AUTH_SECRET unset (development): tokens are signed with a random per-process key"
        );
    }
    let state = AppState::new(config, metrics).map_err(std::io::Error::other)?;
    prepare_database(&database, &state.pool)
        .await
        .map_err(std::io::Error::other)?;
    let _metrics_tasks = routes::metrics::spawn(&state, metrics_addr).await?;
    let readiness = state.readiness.clone();
    let _trust_listener = if state.config.trust_broadcast {
        let options = db::options("DATABASE_URL", &state.config.database.url)
            .map_err(std::io::Error::other)?;
        Some(AbortOnDrop(trust::spawn_listener(
            state.trust.clone(),
            options,
            format!("tollgate-listener {addr}"),
        )))
    } else {
        None
    };
    let _cleanup = AbortOnDrop(cleanup::spawn(
        state.system_pool.clone(),
        state.config.cleanup_interval,
        state.config.item_retention,
        addr.to_string(),
    ));
    if let AppStore::Redis(redis) = &state.store {
        // Not fatal: the failure policy covers a Redis that is down.
        match redis.ping().await {
            Ok(()) => tracing::info!("rate limits counted in redis"),
            Err(err) => {
                tracing::warn!(%err, "redis not reachable at start; failure policy applies")
            }
        }
    }
    tracing::info!(%addr, "listening");

    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        readiness.drain();
        tracing::info!(?drain_delay, "shutdown signal received; draining");
        tokio::time::sleep(drain_delay).await;
        tracing::info!("no longer accepting; finishing in-flight requests");
        let _ = signalled_tx.send(());
    };
    let header_read_timeout = state.config.http.header_read_timeout;
    let server = serve::serve(listener, app(state), header_read_timeout, signal);
    // axum's graceful shutdown waits forever for open connections; enforce
    // a deadline so one idle keep-alive connection cannot stall a deploy.
    let deadline = async move {
        if signalled_rx.await.is_ok() {
            tokio::time::sleep(timeout).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = server => {},
        () = deadline => tracing::warn!(?timeout, "shutdown deadline passed; closing remaining connections"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// Start-up database work: migrations (unless `DB_MIGRATE_ON_START=false`)
/// and the row-level security audit of the server's own role, which stops
/// the server when the role could read across tenants.
pub async fn prepare_database(
    config: &config::DatabaseConfig,
    pool: &PgPool,
) -> Result<(), DbError> {
    if config.migrate_on_start {
        db::migrate(config).await?;
        tracing::info!("migrations applied");
    }
    tollgate::tenant::audit_allowing(pool, db::SECURITY_DEFINERS).await?;
    tracing::info!("database role audited: row-level security applies to it");
    Ok(())
}

/// Aborts a background task when dropped (when `run` returns).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(%err, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(err) => {
                tracing::error!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
