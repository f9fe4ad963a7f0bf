//! Prometheus metrics in the OpenTelemetry HTTP conventions' Prometheus
//! form, so dashboards and alerts from that world work unchanged.
//!
//! [`HttpMetricsLayer`] records, per request:
//! - `http_server_request_duration_seconds` (histogram) by
//!   `http_request_method` (standard methods, anything else `_OTHER`),
//!   `http_route` (axum's matched route template, `unmatched` otherwise)
//!   and `http_response_status_code`;
//! - `http_server_active_requests` (gauge) by `http_request_method`.
//!
//! Raw paths, addresses, tenants and users never become labels, so the
//! number of series stays bounded whatever clients send. The duration is
//! measured until the response head is ready.
//!
//! The rate limiter, the Redis store and readiness record their own
//! metrics (see the README for the full list) through the same
//! [`metrics`](https://docs.rs/metrics) facade. [`prometheus_builder`]
//! gives an exporter with explicit histogram buckets (0.5 ms to 10 s)
//! rather than the exporter's default summaries, which cannot be
//! aggregated across replicas.
//!
//! # Example
//!
//! ```
//! use axum::{Router, routing::get};
//! use tollgate::metrics::{HttpMetricsLayer, prometheus_builder};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let recorder = prometheus_builder().build_recorder();
//! let handle = recorder.handle();
//! let app = Router::new()
//!     .route("/items/{id}", get(|| async { "item" }))
//!     .layer(HttpMetricsLayer::new());
//!
//! metrics::with_local_recorder(&recorder, || {
//!     let req = http::Request::get("/items/42").body(axum::body::Body::empty()).unwrap();
//!     futures_executor(app.oneshot(req));
//! });
//! let text = handle.render();
//! assert!(text.contains(r#"http_route="/items/{id}""#));
//! assert!(!text.contains("/items/42"));
//! # }
//! # fn futures_executor<F: std::future::Future>(f: F) -> F::Output {
//! #     let waker = std::task::Waker::noop();
//! #     let mut cx = std::task::Context::from_waker(waker);
//! #     let mut f = std::pin::pin!(f);
//! #     loop { if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; } }
//! # }
//! ```
//!
//! # Ordering
//!
//! Add the layer with `Router::layer`, so it sees the matched route, and
//! outside the rate limiter, so 429s are counted. Or give it the route
//! templates ([`HttpMetricsLayer::with_routes`]) and wrap the whole app
//! from outside: cheaper per request, and the layers around the router are
//! timed and counted too.

mod http;

pub use metrics_exporter_prometheus::{BuildError, PrometheusHandle};

pub use self::http::{HttpMetrics, HttpMetricsLayer, ResponseFuture, RouteError};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// `http_server_request_duration_seconds`.
pub const HTTP_SERVER_REQUEST_DURATION: &str = "http_server_request_duration_seconds";
/// `http_server_active_requests`.
pub const HTTP_SERVER_ACTIVE_REQUESTS: &str = "http_server_active_requests";
/// `tollgate_ratelimit_decisions_total{policy,route_class,outcome}`
/// (`route_class` only when the policy has one; `outcome` one of `allowed`:
/// allowed and charged, `rejected`, `shadow_rejected`, `uncharged`: this
/// policy allowed but another rejected the request, so nothing was
/// charged), and the
/// layer's [metric label](crate::rate_limit::RateLimitLayer::with_metric_label)
/// when it has one (`plan`).
pub const RATELIMIT_DECISIONS: &str = "tollgate_ratelimit_decisions_total";
/// `tollgate_ratelimit_near_limit_total{policy,route_class}` (and the
/// layer's metric label): allowed requests that left at most 10 % of the
/// policy's burst, as envoy's `near_limit`: who is about to be limited.
pub const RATELIMIT_NEAR_LIMIT: &str = "tollgate_ratelimit_near_limit_total";
/// `tollgate_ratelimit_store_duration_seconds`: a store's answer time.
pub const RATELIMIT_STORE_DURATION: &str = "tollgate_ratelimit_store_duration_seconds";
/// `tollgate_ratelimit_store_errors_total{kind}`.
pub const RATELIMIT_STORE_ERRORS: &str = "tollgate_ratelimit_store_errors_total";
/// `tollgate_ratelimit_fallback_active`: 1 while the Redis store's
/// circuit breaker is open and failure policies decide.
pub const RATELIMIT_FALLBACK_ACTIVE: &str = "tollgate_ratelimit_fallback_active";
/// `tollgate_ratelimit_redis_calls_total{node}`: script calls to each
/// Redis node (one per node per batch).
pub const RATELIMIT_REDIS_CALLS: &str = "tollgate_ratelimit_redis_calls_total";
/// `tollgate_ratelimit_redis_node_errors_total{node,kind}`: failed or
/// timed-out calls to each Redis node.
pub const RATELIMIT_REDIS_NODE_ERRORS: &str = "tollgate_ratelimit_redis_node_errors_total";
/// `tollgate_ratelimit_redis_node_up{node}`: 0 while the node's circuit
/// breaker is open (its keys go to the failure policy).
pub const RATELIMIT_REDIS_NODE_UP: &str = "tollgate_ratelimit_redis_node_up";
/// `tollgate_ratelimit_redis_refunds_total{outcome}`: charges given back
/// because another node denied the request (`done`), or that could not be
/// (`failed`).
pub const RATELIMIT_REDIS_REFUNDS: &str = "tollgate_ratelimit_redis_refunds_total";
/// `tollgate_ratelimit_leases_total`: leases of hot keys granted by Redis.
pub const RATELIMIT_LEASES: &str = "tollgate_ratelimit_leases_total";
/// `tollgate_ratelimit_lease_hits_total`: requests decided from a lease,
/// without Redis.
pub const RATELIMIT_LEASE_HITS: &str = "tollgate_ratelimit_lease_hits_total";
/// `tollgate_ratelimit_lease_outstanding_units`: leased units held, neither
/// used nor given back — the most requests the fleet may deny early
/// because of this replica.
pub const RATELIMIT_LEASE_OUTSTANDING: &str = "tollgate_ratelimit_lease_outstanding_units";
/// `tollgate_ratelimit_lease_returned_units_total`: leased units not used
/// and given back when their lease ended (each one could have been denied
/// early elsewhere while held).
pub const RATELIMIT_LEASE_RETURNED: &str = "tollgate_ratelimit_lease_returned_units_total";
/// `tollgate_ratelimit_local_cache_hits_total`: requests the Redis store
/// denied from its local over-limit cache.
pub const RATELIMIT_LOCAL_CACHE_HITS: &str = "tollgate_ratelimit_local_cache_hits_total";
/// `tollgate_ratelimit_memory_entries`: exact entries the memory store
/// holds, set at each purge.
pub const RATELIMIT_MEMORY_ENTRIES: &str = "tollgate_ratelimit_memory_entries";
/// `tollgate_ratelimit_overflow_decisions_total`: checks of keys beyond the
/// memory store's budget, decided in its fixed-size overflow sketch.
pub const RATELIMIT_OVERFLOW_DECISIONS: &str = "tollgate_ratelimit_overflow_decisions_total";
/// `tollgate_ratelimit_overflow_denials_total`: of those, the denied ones.
pub const RATELIMIT_OVERFLOW_DENIALS: &str = "tollgate_ratelimit_overflow_denials_total";
/// `tollgate_ready`: 1 when ready.
pub const READY: &str = "tollgate_ready";
/// `tollgate_draining`: 1 while draining.
pub const DRAINING: &str = "tollgate_draining";
/// `tollgate_readiness_check{check}`: 1 while a check passes.
pub const READINESS_CHECK: &str = "tollgate_readiness_check";

/// `tollgate_tenant_transactions_total{outcome}`: tenant transactions by
/// how they ended (`commit`, `rollback`, `commit_error`).
pub const TENANT_TRANSACTIONS: &str = "tollgate_tenant_transactions_total";
/// `tollgate_tenant_begin_duration_seconds`: time to get a pooled
/// connection and begin a tenant transaction (pool wait + one round trip).
pub const TENANT_BEGIN_DURATION: &str = "tollgate_tenant_begin_duration_seconds";
/// `tollgate_db_pool_acquire_timeouts_total`: transactions that found no
/// free connection within the pool's acquire timeout.
pub const DB_POOL_ACQUIRE_TIMEOUTS: &str = "tollgate_db_pool_acquire_timeouts_total";

/// `tollgate_http_timeouts_total{stage}`: requests cut off by a deadline
/// (`body`: the body did not arrive in time, 408; `request`: the whole
/// request took too long, 503). Header timeouts are counted by the server,
/// which owns the connection.
pub const HTTP_TIMEOUTS: &str = "tollgate_http_timeouts_total";
/// `tollgate_concurrency_in_flight{policy}`: requests holding a slot of a
/// concurrency policy, summed over its keys.
pub const CONCURRENCY_IN_FLIGHT: &str = "tollgate_concurrency_in_flight";
/// `tollgate_concurrency_rejected_total{policy}`: requests refused because
/// their key had the policy's maximum in flight.
pub const CONCURRENCY_REJECTED: &str = "tollgate_concurrency_rejected_total";
/// `tollgate_db_pool_waiters`: tenant work waiting for a connection (at
/// its tenant's cap or for the pool).
pub const DB_POOL_WAITERS: &str = "tollgate_db_pool_waiters";
/// `tollgate_db_pool_acquire_duration_seconds`: time from asking for a
/// tenant connection to holding one (fair queue + pool).
pub const DB_POOL_ACQUIRE_DURATION: &str = "tollgate_db_pool_acquire_duration_seconds";
/// `tollgate_db_tenant_cap_rejections_total`: tenant work that gave up
/// waiting while its tenant held its whole share of the pool.
pub const DB_TENANT_CAP_REJECTIONS: &str = "tollgate_db_tenant_cap_rejections_total";
/// `tollgate_shed_requests_total{priority}`: requests shed under overload,
/// by the priority (e.g. trust level) they were shed at.
pub const SHED_REQUESTS: &str = "tollgate_shed_requests_total";
/// `tollgate_load`: the load the shedder last saw (1 = the pool fully in
/// use, above 1 = a queue).
pub const LOAD: &str = "tollgate_load";

/// Buckets for latencies of a fast API, in seconds: 0.5 ms to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A Prometheus exporter builder with [`LATENCY_BUCKETS`] for every
/// histogram (the default would be summaries, which cannot be aggregated
/// across replicas). [`MetricsExporter::install`] installs it and keeps it;
/// by hand: `install_recorder()`, serve `handle.render()` on `/metrics`,
/// and call `handle.run_upkeep()` periodically so memory stays flat when
/// scrapes are rare.
pub fn prometheus_builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
        .expect("the buckets are not empty")
}

/// How often [`MetricsExporter`] runs the exporter's upkeep.
pub const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `handle`'s upkeep every [`UPKEEP_INTERVAL`] on a Tokio task (until
/// the task is aborted), so histogram memory stays flat when scrapes are
/// rare. [`MetricsExporter::install`] starts one; call it yourself when you
/// install the recorder by hand.
pub fn spawn_upkeep(handle: PrometheusHandle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    })
}

/// The process's Prometheus exporter, installed and kept: what a service
/// needs to serve `/metrics` without depending on
/// `metrics-exporter-prometheus` itself.
///
/// [`install`](Self::install) installs [`prometheus_builder`]'s recorder as
/// the global one (every Tollgate layer and your own `metrics::counter!`
/// record into it) and runs its upkeep every [`UPKEEP_INTERVAL`] on a Tokio
/// task, so histogram memory stays flat when scrapes are rare;
/// [`router`](Self::router) serves `GET /metrics` in the text format, to
/// merge into your router or to serve on an address of its own.
///
/// ```rust,standalone_crate
/// use axum::{Router, routing::get};
/// use tollgate::metrics::{HttpMetricsLayer, MetricsExporter};
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let exporter = MetricsExporter::install().expect("the first recorder of this process");
/// let app = Router::new()
///     .route("/items", get(|| async { "[]" }))
///     .layer(HttpMetricsLayer::new())
///     .merge(exporter.router());
///
/// let get = |path| http::Request::get(path).body(axum::body::Body::empty()).unwrap();
/// app.clone().oneshot(get("/items")).await.unwrap();
/// let res = app.oneshot(get("/metrics")).await.unwrap();
/// assert_eq!(res.status(), 200);
/// let body = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap();
/// assert!(std::str::from_utf8(&body).unwrap().contains(r#"http_route="/items""#));
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct MetricsExporter {
    handle: PrometheusHandle,
}

impl MetricsExporter {
    /// Installs the recorder and starts its upkeep. Call once per process,
    /// within a Tokio runtime; fails when a recorder is installed already.
    pub fn install() -> Result<Self, BuildError> {
        let handle = prometheus_builder().install_recorder()?;
        // For the life of the process, like the recorder.
        drop(spawn_upkeep(handle.clone()));
        Ok(Self { handle })
    }

    /// The exporter's handle.
    pub fn handle(&self) -> &PrometheusHandle {
        &self.handle
    }

    /// Every metric, in the Prometheus text format.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// `GET /metrics`, answered with [`render`](Self::render) as
    /// `text/plain; version=0.0.4`.
    pub fn router<S: Clone + Send + Sync + 'static>(&self) -> axum::Router<S> {
        let handle = self.handle.clone();
        axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let text = handle.render();
                async move {
                    (
                        [(
                            ::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        )
    }
}
