//! Public API routes, under the per-IP limit.

use axum::{Extension, Json, Router, routing::get};
use serde_json::{Value, json};
use tollgate::client_ip::ClientIp;

use crate::AppState;

/// `/api/v1/ping`: a database-free route for probing limits and load.
pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/ping", get(ping))
}

async fn ping(client: Option<Extension<ClientIp>>) -> Json<Value> {
    let client_ip = client.map(|Extension(ClientIp(ip))| ip.to_string());
    Json(json!({ "pong": true, "client_ip": client_ip }))
}
