//! Public API routes, under the per-IP limit.

use std::net::IpAddr;

use axum::{Extension, Json};
use serde::Serialize;
use tollgate::client_ip::ClientIp;
use utoipa::ToSchema;
use utoipa_axum::routes;

use super::{Class, Route};

/// `/api/v1/ping`: a database-free route for probing limits and load.
pub fn routes() -> Vec<Route> {
    vec![Route::new(Class::Public, routes!(ping))]
}

/// The answer to a ping.
#[derive(Debug, Serialize, ToSchema)]
pub struct Pong {
    /// Always true.
    pub pong: bool,
    /// The client address as the server sees it (after trusted proxies).
    // Serialized by serde straight into the body (no `fmt`, no String).
    #[schema(value_type = Option<String>)]
    pub client_ip: Option<IpAddr>,
}

/// Answers without touching a database: for probing limits and load.
#[utoipa::path(
    get, path = "/api/v1/ping", tag = "public",
    responses(
        (status = 200, body = Pong),
        (status = 429, body = crate::openapi::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn ping(client: Option<Extension<ClientIp>>) -> Json<Pong> {
    let client_ip = client.map(|Extension(ClientIp(ip))| ip);
    Json(Pong {
        pong: true,
        client_ip,
    })
}
