//! Liveness and readiness probes (`tollgate::health`), never limited.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use utoipa_axum::routes;

use super::{Class, Route};
use crate::state::AppState;

/// `/health`, `/healthz`, `/ready`, `/readyz`.
pub fn routes() -> Vec<Route> {
    vec![
        Route::new(Class::Probe, routes!(health)),
        Route::new(Class::Probe, routes!(healthz)),
        Route::new(Class::Probe, routes!(ready)),
        Route::new(Class::Probe, routes!(readyz)),
    ]
}

/// Liveness: 200 while the process runs; touches no dependency.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "Alive", content_type = "application/health+json")))]
pub async fn health() -> Response {
    tollgate::health::live()
}

/// Liveness, Kubernetes' spelling.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", content_type = "application/health+json")))]
pub async fn healthz() -> Response {
    health().await
}

/// Readiness: 200 when every critical background check passes and the
/// replica is not draining, else 503; the body names each check.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses(
        (status = 200, description = "Ready", content_type = "application/health+json"),
        (status = 503, description = "Not ready (a check fails, or draining)", content_type = "application/health+json"),
    ))]
pub async fn ready(State(state): State<AppState>) -> Response {
    state.readiness.report().into_response()
}

/// Readiness, Kubernetes' spelling.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", content_type = "application/health+json"),
        (status = 503, description = "Not ready (a check fails, or draining)", content_type = "application/health+json"),
    ))]
pub async fn readyz(state: State<AppState>) -> Response {
    ready(state).await
}
