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
use tokio::net::TcpListener;
use tollgate::client_ip::SetClientIpLayer;
use tollgate::rate_limit::{ByClientIp, Policy, RateLimitLayer, StoreError};
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
}

impl AppState {
    /// State for `config`. Call within a Tokio runtime (stores start
    /// background tasks).
    pub fn new(config: Config) -> Result<Self, StoreError> {
        Ok(Self {
            store: AppStore::new(&config.store)?,
            config: Arc::new(config),
        })
    }
}

/// The router with every layer, outermost first: request id → trace →
/// client IP; the per-IP limit sits on the public API routes only, so
/// liveness is never limited.
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

    Router::new()
        .merge(routes::health::router())
        .merge(public_api)
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
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(SetClientIpLayer::new(config.trusted_proxies.clone())),
        )
        .with_state(state)
}

/// Serves on `listener` until `shutdown` resolves, then lets in-flight
/// requests finish for at most the configured shutdown timeout.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let timeout = config.shutdown_timeout;
    let state = AppState::new(config).map_err(std::io::Error::other)?;
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
        tracing::info!("shutdown signal received; finishing in-flight requests");
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
