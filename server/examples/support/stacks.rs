//! One layer (or pair) alone on an axum app, ours and a peer's for the same
//! job, so the load harness (`examples/baseline.rs`, `STACK=…`) and the
//! instruction count (`examples/instructions.rs`) measure the same stacks.

use axum::Router;
use tollgate::client_ip::{SetClientIpLayer, TrustedProxies};
use tollgate::metrics::{HttpMetricsLayer, MetricsExporter};
use tollgate::rate_limit::{ByClientIp, MemoryStore, Policy, Quota, RateLimitLayer};
use tower::ServiceBuilder;
use tower_governor::GovernorLayer;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::SmartIpKeyExtractor;

/// The stacks, `bare` first.
pub(crate) const STACKS: [&str; 5] = ["bare", "ratelimit", "governor", "metrics", "prometheus"];

/// A quota no benchmark reaches: every request is allowed and charged.
const PER_SECOND: u32 = 1_000_000_000;

/// `router` with `stack` on it:
/// - `ratelimit`: Tollgate's client IP (X-Forwarded-For from loopback
///   trusted) and one per-IP policy on the memory store, headers included;
/// - `governor`: tower_governor, keyed by the same address
///   (`SmartIpKeyExtractor`), with its headers;
/// - `metrics`: Tollgate's `HttpMetricsLayer` with its recorder installed;
/// - `prometheus`: axum-prometheus with its recorder installed.
///
/// Call within a Tokio runtime (the recorders start their upkeep).
pub(crate) fn layered(router: Router, stack: &str) -> Router {
    match stack {
        "bare" => router,
        "ratelimit" => router.layer(
            ServiceBuilder::new()
                .layer(SetClientIpLayer::new(
                    "127.0.0.1".parse::<TrustedProxies>().expect("an address"),
                ))
                .layer(
                    RateLimitLayer::new(MemoryStore::new()).with_policy(Policy::new(
                        "ip",
                        ByClientIp::new(),
                        Quota::per_second(PER_SECOND),
                    )),
                ),
        ),
        "governor" => {
            let config = GovernorConfigBuilder::default()
                .per_nanosecond(1)
                .burst_size(PER_SECOND)
                .key_extractor(SmartIpKeyExtractor)
                .use_headers()
                .finish()
                .expect("a governor config");
            router.layer(GovernorLayer::new(config))
        }
        "metrics" => {
            MetricsExporter::install().expect("the only recorder");
            router.layer(HttpMetricsLayer::new())
        }
        "prometheus" => {
            let (layer, _handle) = axum_prometheus::PrometheusMetricLayer::pair();
            router.layer(layer)
        }
        other => panic!("unknown stack {other}: one of {STACKS:?}"),
    }
}
