//! Bare axum: the same route and runtime as `tollgate-server`, no layers.
//! The load harness measures every configuration against it.
//!
//! Run with `LISTEN_ADDR=127.0.0.1:8090 cargo run --release -p tollgate-server --example baseline`.

use axum::{Json, Router, routing::get};
use serde_json::json;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::var("LISTEN_ADDR").unwrap_or_else(|_| "127.0.0.1:8090".to_owned());
    let app = Router::new().route(
        "/api/v1/ping",
        get(|| async { Json(json!({ "pong": true, "client_ip": "127.0.0.1" })) }),
    );
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening addr={}", listener.local_addr()?);
    axum::serve(listener, app).await
}
