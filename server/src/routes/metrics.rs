//! `/metrics` in the Prometheus text format, on the main listener or on
//! `METRICS_ADDR`, and the exporter's upkeep.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use tokio::task::JoinHandle;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{Class, Route};
use crate::state::AppState;

/// `/metrics`.
pub fn routes() -> Vec<Route> {
    vec![Route::new(Class::Admin, routes!(render))]
}

/// Prometheus metrics (text format), on `METRICS_ADDR` when set, else here.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain; version=0.0.4")))]
pub async fn render(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => {
            record_pool(&state.pool, state.config.database.max_connections);
            metrics::gauge!(tollgate::metrics::LOAD).set(state.tenant_pool.load());
            let mut res = handle.render().into_response();
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            res
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The pool's gauges, read at scrape time so they are current.
fn record_pool(pool: &sqlx::PgPool, max: u32) {
    let idle = pool.num_idle() as f64;
    let open = f64::from(pool.size());
    metrics::gauge!(DB_POOL_CONNECTIONS, "state" => "in_use").set((open - idle).max(0.0));
    metrics::gauge!(DB_POOL_CONNECTIONS, "state" => "idle").set(idle);
    metrics::gauge!(DB_POOL_MAX_CONNECTIONS).set(f64::from(max));
}

/// `tollgate_db_pool_connections{state}`: the tenant pool's connections,
/// `in_use` or `idle`, read at scrape time.
pub const DB_POOL_CONNECTIONS: &str = "tollgate_db_pool_connections";
/// `tollgate_db_pool_max_connections`: `DB_MAX_CONNECTIONS`.
pub const DB_POOL_MAX_CONNECTIONS: &str = "tollgate_db_pool_max_connections";
/// `tollgate_build_info{version,git_sha}`: always 1.
pub const BUILD_INFO: &str = "tollgate_build_info";

/// Background pieces of metrics, stopped when dropped: the exporter's
/// upkeep (so histogram memory stays flat when scrapes are rare) and the
/// admin listener when `METRICS_ADDR` is set.
#[derive(Debug, Default)]
pub struct MetricsTasks(Vec<JoinHandle<()>>);

impl Drop for MetricsTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Starts the upkeep, `tollgate_build_info`, and the admin listener.
pub async fn spawn(state: &AppState, admin: Option<SocketAddr>) -> std::io::Result<MetricsTasks> {
    let mut tasks = MetricsTasks::default();
    let Some(handle) = state.metrics.clone() else {
        return Ok(tasks);
    };
    metrics::gauge!(
        BUILD_INFO,
        "version" => env!("CARGO_PKG_VERSION"),
        "git_sha" => option_env!("TOLLGATE_GIT_SHA").unwrap_or("unknown"),
    )
    .set(1.0);
    tasks.0.push(tollgate::metrics::spawn_upkeep(handle));
    if let Some(addr) = admin {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(metrics_on = %listener.local_addr()?, "metrics listening");
        let app: Router = routes()
            .into_iter()
            .fold(OpenApiRouter::new(), |router, route| {
                router.routes(route.handler)
            })
            .with_state(state.clone())
            .into();
        tasks.0.push(tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                tracing::error!(%err, "metrics listener failed");
            }
        }));
    }
    Ok(tasks)
}
