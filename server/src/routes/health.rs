//! Liveness: 200 while the process runs. It touches no dependency and sits
//! outside every limit, so a busy or degraded replica is not restarted for
//! being busy.

use axum::{Json, Router, routing::get};
use serde_json::{Value, json};

use crate::AppState;

/// `/health` and its Kubernetes-style alias `/healthz`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/health", get(live))
        .route("/healthz", get(live))
}

async fn live() -> Json<Value> {
    Json(json!({ "status": "pass" }))
}
