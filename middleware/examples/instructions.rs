//! Requests through one axum app with one stack of layers, in-process on a
//! current-thread runtime, for counting instructions per request under
//! valgrind (`load-tests/instructions.sh` runs N and 3N requests and takes
//! the difference, so start-up cancels out).
//!
//! `cargo run --release -p tollgate --all-features --example instructions -- STACK N`
//! with STACK one of `bare`, `ratelimit` (client IP + one per-IP policy on
//! the memory store, headers included), `metrics` (`HttpMetricsLayer`).

use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::routing::get;
use tollgate::client_ip::{SetClientIpLayer, TrustedProxies};
use tollgate::metrics::HttpMetricsLayer;
use tollgate::rate_limit::{ByClientIp, MemoryStore, Policy, Quota, RateLimitLayer};
use tower::{Service, ServiceBuilder, ServiceExt};

fn app(stack: &str) -> Router {
    let router = Router::new().route("/ping", get(|| async { "pong" }));
    let router = match stack {
        "bare" => router,
        "ratelimit" => router.layer(
            ServiceBuilder::new()
                .layer(SetClientIpLayer::new(TrustedProxies::none()))
                .layer(
                    RateLimitLayer::new(MemoryStore::new()).with_policy(Policy::new(
                        "ip",
                        ByClientIp::new(),
                        Quota::per_second(1_000_000_000),
                    )),
                ),
        ),
        "metrics" => router.layer(HttpMetricsLayer::new()),
        other => panic!("unknown stack {other}: bare, ratelimit or metrics"),
    };
    router.layer(MockConnectInfo(SocketAddr::from(([192, 0, 2, 1], 4000))))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let stack = args.next().unwrap_or_else(|| "bare".to_owned());
    let n: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(1000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        // As `axum::serve` does per connection: handlers become routes once.
        let mut app = app(&stack).with_state(()).into_service::<Body>();
        for _ in 0..n {
            let req = http::Request::get("/ping").body(Body::empty()).unwrap();
            let res = app.ready().await.unwrap().call(req).await.unwrap();
            assert_eq!(res.status(), 200);
        }
    });
}
