//! The Tollgate reference server: a small axum API wired with Tollgate's
//! layers, configured from the environment.
//!
//! `main.rs` stays thin; [`app`] builds the router (tests drive it with
//! `oneshot`) and [`run`] serves it until a shutdown signal.

pub mod config;
pub mod error;
pub mod routes;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::Request;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tollgate::client_ip::SetClientIpLayer;
use tollgate::health::Readiness;
use tollgate::metrics::HttpMetricsLayer;
use tollgate::rate_limit::{ByClientIp, FailurePolicy, Policy, RateLimitLayer, StoreError};
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

use crate::config::Config;
use crate::store::AppStore;

/// What handlers and layers share.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The configuration the server started with.
    pub config: Arc<Config>,
    /// Where rate limits are counted.
    pub store: AppStore,
    /// Whether this replica should get traffic.
    pub readiness: Readiness,
    /// Renders `/metrics`; `None` when no recorder is installed (tests).
    pub metrics: Option<PrometheusHandle>,
}

impl AppState {
    /// State for `config`, with its readiness checks started. Call within a
    /// Tokio runtime (stores and checks run background tasks).
    pub fn new(config: Config, metrics: Option<PrometheusHandle>) -> Result<Self, StoreError> {
        let store = AppStore::new(&config.store)?;
        let mut checks = Readiness::builder()
            .interval(config.ready_check_interval)
            .timeout(config.ready_check_timeout);
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
        Ok(Self {
            store,
            readiness: checks.start(),
            metrics,
            config: Arc::new(config),
        })
    }
}

/// The router with every layer, outermost first: request id → trace →
/// metrics → client IP → `Connection: close` while draining; the per-IP limit sits
/// on the public API routes only, so health probes are never limited.
pub fn app(state: AppState) -> Router {
    let config = &state.config;
    let per_ip = Policy::new(
        "ip",
        ByClientIp::new().with_ipv6_prefix(config.ipv6_prefix),
        config.rate_limit_ip,
    )
    .with_route_class("public")
    .shadow(config.rate_limit_shadow);
    let public_api = routes::api::router().route_layer(
        RateLimitLayer::new(state.store.clone())
            .with_failure_policy(config.failure_mode)
            .with_fallback_replicas(config.fallback_replicas)
            .with_policy(per_ip),
    );

    let mut router = Router::new()
        .merge(state.readiness.router())
        .merge(public_api);
    if config.metrics_addr.is_none() {
        router = router.merge(routes::metrics::router());
    }
    router
        .fallback(routes::not_found)
        .layer(
            ServiceBuilder::new()
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
                // Inside the router (so it sees the matched route), outside
                // the limiter (so 429s are counted).
                .layer(HttpMetricsLayer::new())
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(SetClientIpLayer::new(config.trusted_proxies.clone()))
                .layer(axum::middleware::map_response_with_state(
                    state.readiness.clone(),
                    close_when_draining,
                )),
        )
        .with_state(state)
}

/// While draining, asks clients to close their connection after this
/// response, so keep-alive clients reconnect through the load balancer to
/// another replica.
async fn close_when_draining(
    axum::extract::State(readiness): axum::extract::State<Readiness>,
    mut res: axum::response::Response,
) -> axum::response::Response {
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
    let state = AppState::new(config, metrics).map_err(std::io::Error::other)?;
    let _metrics_tasks = routes::metrics::spawn(&state, metrics_addr).await?;
    let readiness = state.readiness.clone();
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
    let server = axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(signal);
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
        result = server => result?,
        () = deadline => tracing::warn!(?timeout, "shutdown deadline passed; closing remaining connections"),
    }
    tracing::info!("stopped");
    Ok(())
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
