//! One layer (or pair) alone on an axum app, ours and a peer's for the same
//! job, so the load harness (`examples/baseline.rs`, `STACK=…`) and the
//! instruction count (`examples/instructions.rs`) measure the same stacks.

use std::convert::Infallible;

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use http::Request;
use tollgate::client_ip::{SetClientIpLayer, TrustedProxies};
use tollgate::metrics::{HttpMetricsLayer, MetricsExporter};
use tollgate::rate_limit::{ByClientIp, MemoryStore, Policy, Quota, RateLimitLayer};
use tower::{Service, ServiceBuilder};
use tower_governor::GovernorLayer;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::SmartIpKeyExtractor;

/// The stacks, `bare` first.
pub(crate) const STACKS: [&str; 7] = [
    "bare",
    "noop",
    "ratelimit",
    "ratelimit-outside",
    "governor",
    "metrics",
    "prometheus",
];

/// `GET /api/v1/ping`'s answer as the server gives it (`routes::api::ping`:
/// its `Pong`, serialized the same way), so bare axum does the handler's
/// work the server does and only the stacks differ.
pub(crate) async fn pong() -> axum::Json<tollgate_server::routes::api::Pong> {
    axum::Json(tollgate_server::routes::api::Pong {
        pong: true,
        client_ip: Some(std::net::IpAddr::from([127, 0, 0, 1])),
    })
}

/// A quota no benchmark reaches: every request is allowed and charged.
const PER_SECOND: u32 = 1_000_000_000;

/// An app with its stack on it: the service type differs per stack.
pub(crate) trait App:
    Service<Request<Body>, Response = Response, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> App for S where
    S: Service<Request<Body>, Response = Response, Error = Infallible, Future: Send + 'static>
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// What to do with the app once its stack is on it (serve it, drive it).
pub(crate) trait Run {
    type Output;

    fn run<S: App>(self, app: S) -> Self::Output;
}

/// Runs `router` (its state given) with `stack` on it:
/// - `noop`: a layer that does nothing (`Identity`), added with
///   `Router::layer`: what axum charges for any layer added that way (it
///   boxes the route again, clones the box and boxes the future per
///   request), the floor of every `Router::layer` row;
/// - `ratelimit`: Tollgate's client IP (X-Forwarded-For from loopback
///   trusted) and one per-IP policy on the memory store, headers included,
///   added with `Router::layer` as the README shows;
/// - `ratelimit-outside`: the same around the router, for the instruction
///   count of the layers without the box and clone axum adds to any
///   `Router::layer` (the server puts its request-wide layers there);
/// - `governor`: tower_governor, keyed by the same address
///   (`SmartIpKeyExtractor`), with its headers;
/// - `metrics`: Tollgate's `HttpMetricsLayer` with its recorder installed;
/// - `prometheus`: axum-prometheus with its recorder installed.
///
/// Call within a Tokio runtime (the recorders start their upkeep).
pub(crate) fn run<R: Run>(router: Router, stack: &str, run: R) -> R::Output {
    // As `axum::serve` does per connection: handlers become routes once.
    let routes = |router: Router| router.with_state(());
    match stack {
        "bare" => run.run(routes(router)),
        "noop" => run.run(routes(router.layer(tower::layer::util::Identity::new()))),
        "ratelimit" => run.run(routes(
            router.layer(ServiceBuilder::new().layer(client_ip()).layer(rate_limit())),
        )),
        "ratelimit-outside" => run.run(
            ServiceBuilder::new()
                // axum::serve wants axum's body type.
                .map_response(|res: Response<_>| res.map(Body::new))
                .layer(client_ip())
                .layer(rate_limit())
                .service(routes(router)),
        ),
        "governor" => {
            let config = GovernorConfigBuilder::default()
                .per_nanosecond(1)
                .burst_size(PER_SECOND)
                .key_extractor(SmartIpKeyExtractor)
                .use_headers()
                .finish()
                .expect("a governor config");
            run.run(routes(router.layer(GovernorLayer::new(config))))
        }
        "metrics" => {
            MetricsExporter::install().expect("the only recorder");
            run.run(routes(router.layer(HttpMetricsLayer::new())))
        }
        "prometheus" => {
            let (layer, _handle) = axum_prometheus::PrometheusMetricLayer::pair();
            run.run(routes(router.layer(layer)))
        }
        other => panic!("unknown stack {other}: one of {STACKS:?}"),
    }
}

fn client_ip() -> SetClientIpLayer {
    SetClientIpLayer::new("127.0.0.1".parse::<TrustedProxies>().expect("an address"))
}

fn rate_limit() -> RateLimitLayer<MemoryStore> {
    RateLimitLayer::new(MemoryStore::new()).with_policy(Policy::new(
        "ip",
        ByClientIp::new(),
        Quota::per_second(PER_SECOND),
    ))
}
