//! The smallest runnable stack: per-IP limiting of an axum router.
//!
//! Run with `cargo run -p tollgate --example per_ip`, then
//! `curl -i http://127.0.0.1:3000/` a few times.

use std::net::SocketAddr;

use axum::{Router, routing::get};
use tollgate::client_ip::{SetClientIpLayer, TrustedProxies};
use tollgate::rate_limit::{ByClientIp, MemoryStore, Policy, Quota, RateLimitLayer};
use tower::ServiceBuilder;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let app = Router::new().route("/", get(|| async { "hello\n" })).layer(
        ServiceBuilder::new()
            .layer(SetClientIpLayer::new(TrustedProxies::none()))
            .layer(
                RateLimitLayer::new(MemoryStore::new()).with_policy(Policy::new(
                    "ip",
                    ByClientIp::new(),
                    Quota::per_minute(3),
                )),
            ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await
}
