//! Requests through one axum app with one stack of layers
//! (`support/stacks.rs`), or through the whole server's app with its
//! defaults, in-process on a current-thread runtime, for counting
//! instructions per request under valgrind (`load-tests/instructions.sh`
//! runs N and 3N requests and takes the difference, so start-up cancels
//! out).
//!
//! `cargo run --release -p tollgate-server --example instructions -- STACK N`
//! with STACK one of `bare`, `ratelimit`, `governor`, `metrics`,
//! `prometheus`, or `server`: `GET /api/v1/ping` through
//! `tollgate_server::app` as `Config::from_env` sets it up (the metrics
//! recorder installed, access lines formatted into the binary's sink when
//! `RUST_LOG` enables them), the client's address in `X-Forwarded-For`
//! from a trusted loopback peer as behind a load balancer.

use std::convert::Infallible;
use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::Response;
use axum::routing::get;
use http::Request;
use tower::{Service, ServiceExt};

#[path = "support/stacks.rs"]
mod stacks;

fn main() {
    let mut args = std::env::args().skip(1);
    let stack = args.next().unwrap_or_else(|| "bare".to_owned());
    let n: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(1000);
    // The recorders and governor calibrate one clock, once, spinning for a
    // while (a varying number of instructions): before the measured part,
    // which `instructions.sh` limits to `main`'s future.
    let _ = quanta::Instant::now();
    let metrics = (stack == "server").then(|| {
        tollgate::metrics::prometheus_builder()
            .install_recorder()
            .expect("the only recorder")
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        if let Some(metrics) = metrics {
            let _sink = server_logging();
            let app = server_app(metrics);
            let peer = ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 4000)));
            drive(app, n, "/api/v1/ping", peer, Some("192.0.2.1")).await;
        } else {
            let router = Router::new().route("/ping", get(|| async { "pong" }));
            let app = stacks::layered(router, &stack);
            let peer = ConnectInfo(SocketAddr::from(([192, 0, 2, 1], 4000)));
            // As `axum::serve` does per connection: handlers become routes once.
            let app = app.with_state(()).into_service::<Body>();
            drive(app, n, "/ping", peer, None).await;
        }
    });
}

/// `n` requests for `path`, one after another, as from one keep-alive
/// connection from `peer`, with `forwarded_for` in `X-Forwarded-For`.
async fn drive<S>(
    mut app: S,
    n: u64,
    path: &str,
    peer: ConnectInfo<SocketAddr>,
    forwarded_for: Option<&'static str>,
) where
    S: Service<Request<Body>, Response = Response, Error = Infallible>,
{
    for _ in 0..n {
        let mut req = Request::get(path).body(Body::empty()).unwrap();
        if let Some(client) = forwarded_for {
            req.headers_mut()
                .insert("x-forwarded-for", http::HeaderValue::from_static(client));
        }
        // As `into_make_service_with_connect_info` does per request.
        req.extensions_mut().insert(peer);
        let res = app.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(res.status(), 200, "{:?}", res.into_body());
    }
}

/// The server's app with its defaults from the environment (the database
/// is not touched by `/api/v1/ping`; its pools connect lazily).
fn server_app(
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> impl Service<Request<Body>, Response = Response, Error = Infallible, Future: Send> {
    let config = tollgate_server::config::Config::from_env().expect("a valid configuration");
    let state = tollgate_server::state::AppState::new(config, Some(metrics)).expect("the state");
    tollgate_server::app(state)
}

/// As the binary sets up logging: `RUST_LOG` (default `info`) decides
/// whether access lines are written, into the access-log sink.
fn server_logging() -> Option<tollgate_server::access_log::SinkGuard> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::sink)
        .init();
    tollgate_server::access_log::install(false)
}
