//! Requests through one axum app with one stack of layers
//! (`support/stacks.rs`), in-process on a current-thread runtime, for
//! counting instructions per request under valgrind
//! (`load-tests/instructions.sh` runs N and 3N requests and takes the
//! difference, so start-up cancels out).
//!
//! `cargo run --release -p tollgate-server --example instructions -- STACK N`
//! with STACK one of `bare`, `ratelimit`, `governor`, `metrics`,
//! `prometheus`.

use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::routing::get;
use tower::{Service, ServiceExt};

#[path = "support/stacks.rs"]
mod stacks;

fn main() {
    let mut args = std::env::args().skip(1);
    let stack = args.next().unwrap_or_else(|| "bare".to_owned());
    let n: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(1000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let router = Router::new().route("/ping", get(|| async { "pong" }));
        let app = stacks::layered(router, &stack);
        let peer = ConnectInfo(SocketAddr::from(([192, 0, 2, 1], 4000)));
        // As `axum::serve` does per connection: handlers become routes once.
        let mut app = app.with_state(()).into_service::<Body>();
        for _ in 0..n {
            let mut req = http::Request::get("/ping").body(Body::empty()).unwrap();
            // As `into_make_service_with_connect_info` does per request.
            req.extensions_mut().insert(peer);
            let res = app.ready().await.unwrap().call(req).await.unwrap();
            assert_eq!(res.status(), 200, "{:?}", res.into_body());
        }
    });
}
