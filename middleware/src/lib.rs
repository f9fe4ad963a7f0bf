//! Tower layers for running an HTTP API as many stateless replicas.
//!
//! Tollgate is a set of composable [`tower`](https://docs.rs/tower) layers:
//!
//! - [`client_ip`]: who is calling, from the socket peer and, only behind
//!   trusted proxies, `X-Forwarded-For` / `Forwarded`;
//! - [`health`]: liveness, readiness from background checks, drain on
//!   shutdown;
//! - `metrics` (feature `metrics`): request metrics in the OpenTelemetry
//!   HTTP conventions, and a Prometheus exporter with real histograms;
//! - [`rate_limit`]: GCRA rate limiting with named policies (per IP, per
//!   tenant, per trust level, …) decided all-or-nothing against a pluggable
//!   [`Store`](rate_limit::Store), answering with the IETF `RateLimit`
//!   header fields and RFC 9457 problem details;
//! - `tenant` (feature `postgres`): per-request Postgres transactions that
//!   set the tenant for row-level security;
//! - `singleton` (feature `postgres`): periodic jobs that run on one replica
//!   of the fleet per cycle, on advisory locks;
//! - [`timeout`]: deadlines on the request body and the whole request;
//! - [`shed`]: priority load shedding under overload.
//!
//! Capacity, not only rate: besides rate policies, [`rate_limit`] has
//! keyed concurrency limits ([`KeyedConcurrencyLimitLayer`](rate_limit::KeyedConcurrencyLimitLayer)),
//! and `tenant` a pool shared fairly between tenants (`TenantPool`), so no
//! client holds a shared resource for as long as it likes.
//!
//! # Example
//!
//! The smallest useful stack: per-IP limiting of an axum router.
//!
//! ```
//! use std::net::SocketAddr;
//! use axum::{Router, routing::get, extract::connect_info::MockConnectInfo};
//! use tollgate::client_ip::{SetClientIpLayer, TrustedProxies};
//! use tollgate::rate_limit::{ByClientIp, MemoryStore, Policy, Quota, RateLimitLayer};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let limit = RateLimitLayer::new(MemoryStore::new())
//!     .with_policy(Policy::new("ip", ByClientIp::new(), Quota::per_minute(2)));
//!
//! let app = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(
//!         ServiceBuilder::new()
//!             .layer(SetClientIpLayer::new(TrustedProxies::none()))
//!             .layer(limit),
//!     )
//!     // In a real server: `into_make_service_with_connect_info::<SocketAddr>()`.
//!     .layer(MockConnectInfo(SocketAddr::from(([192, 0, 2, 1], 4000))));
//!
//! let get = || http::Request::get("/").body(axum::body::Body::empty()).unwrap();
//! assert_eq!(app.clone().oneshot(get()).await.unwrap().status(), 200);
//! assert_eq!(app.clone().oneshot(get()).await.unwrap().status(), 200);
//! let res = app.oneshot(get()).await.unwrap();
//! assert_eq!(res.status(), 429);
//! assert_eq!(res.headers()["retry-after"], "30");
//! # }
//! ```
//!
//! # Ordering
//!
//! Layers read what layers above them put into request extensions, so the
//! recommended order, outermost first, is: client IP → request id → trace
//! → metrics → your authentication → `tenant::TenantLayer`
//! → rate limit → handler (the README's "Stacking the layers in your own
//! axum app" uses the same). Metrics above the limiter count the 429s. The
//! tenant layer above the limiter validates the tenant (400 for a malformed
//! id) and puts the `tenant::TenantId` in the request
//! before a per-tenant key is built from it, and costs the rejected request
//! nothing: the transaction begins only when the handler asks for it, so a
//! request the limiter rejects never touches the database.
//!
//! # Feature flags
//!
//! - `memory` (default): [`MemoryStore`](rate_limit::MemoryStore), the
//!   in-process GCRA store (also the local fallback of a remote store).
//! - `redis`: `RedisStore`, fleet-wide limits in Redis (one server or a
//!   Redis Cluster), with leases for hot keys; implies `memory`.
//! - `metrics`: request metrics ([`HttpMetricsLayer`](crate::metrics::HttpMetricsLayer)),
//!   the limiter's, stores' and readiness's metrics through the
//!   [`metrics`](https://docs.rs/metrics) facade, and the Prometheus
//!   exporter (`metrics::MetricsExporter`).
//! - `postgres`: the `tenant` and `singleton` modules, on sqlx.
//! - `full`: everything.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]

#[macro_use]
mod macros;

mod body;
pub mod client_ip;
pub mod health;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
pub mod problem;
pub mod rate_limit;
pub mod shed;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod singleton;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod tenant;
pub mod timeout;

/// The repository README's Rust blocks, compiled as doctests, so a change
/// of API breaks the build rather than the reader who copies them.
#[cfg(all(doctest, feature = "postgres"))]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
