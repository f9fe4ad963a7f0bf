//! Rate limiting with GCRA: named policies, decided all-or-nothing against a
//! pluggable store, answered with the IETF `RateLimit` header fields.
//!
//! A [`RateLimitLayer`] carries one or more [`Policy`]s. For each request,
//! each policy's [`KeyExtractor`] names the bucket (client IP, tenant,
//! subject, …, or none: the policy is skipped) and its [`Quota`] (fixed or
//! chosen per request, e.g. by trust level) says how much is allowed. The
//! layer hands all of them to its [`Store`] as one batch; when any policy
//! denies, none is charged.
//!
//! # Responses
//!
//! Allowed responses carry, per enforced policy, a `RateLimit-Policy` item
//! (`"ip";q=100;w=60`: quota units `q` per window `w` seconds) and a
//! `RateLimit` item (`"ip";r=42;t=12`: `r` units available, and `t` their
//! effective window: the seconds until the quota is whole again), in the
//! form of
//! [draft-ietf-httpapi-ratelimit-headers-11](https://datatracker.ietf.org/doc/draft-ietf-httpapi-ratelimit-headers/11/).
//! Several stacked layers each add their own items (header lines), which
//! HTTP joins into one list.
//!
//! A rejected request gets `429 Too Many Requests` with
//! - `Retry-After` in whole seconds, rounded up, at least 1;
//! - the same two fields, where a violated policy's `r` is 0 and its `t`
//!   (the window in which nothing is available) the wait until the request
//!   would be allowed, so `Retry-After` is never earlier than the end of
//!   that window;
//! - an RFC 9457 `application/problem+json` body of the draft's
//!   `quota-exceeded` type listing the `violated-policies`.
//!
//! When the store fails, the layer's [`FailurePolicy`] decides: let the
//! request through, or answer 503 with a problem body. A store error never
//! becomes a 500.
//!
//! # Example
//!
//! ```
//! use std::net::SocketAddr;
//! use axum::{Router, routing::get, extract::connect_info::MockConnectInfo};
//! use tollgate::rate_limit::{ByClientIp, Global, MemoryStore, Policy, Quota, RateLimitLayer};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // Per IP, and for the route as a whole, decided together.
//! let layer = RateLimitLayer::new(MemoryStore::new())
//!     .with_policy(Policy::new("ip", ByClientIp::new(), Quota::per_minute(1)))
//!     .with_policy(Policy::new("route", Global, Quota::per_minute(100)));
//! let app = Router::new()
//!     .route("/", get(|| async { "ok" }))
//!     .layer(layer)
//!     .layer(MockConnectInfo(SocketAddr::from(([192, 0, 2, 1], 1))));
//!
//! let req = || http::Request::get("/").body(axum::body::Body::empty()).unwrap();
//! let res = app.clone().oneshot(req()).await.unwrap();
//! assert_eq!(res.status(), 200);
//! assert_eq!(res.headers()["ratelimit-policy"], r#""ip";q=1;w=60, "route";q=100;w=60"#);
//! assert_eq!(res.headers()["ratelimit"], r#""ip";r=0;t=60, "route";r=99;t=1"#);
//!
//! let res = app.oneshot(req()).await.unwrap();
//! assert_eq!(res.status(), 429);
//! assert_eq!(res.headers()["retry-after"], "60");
//! assert_eq!(res.headers()["content-type"], "application/problem+json");
//! // Rejected: the route-wide policy was not charged.
//! assert_eq!(res.headers()["ratelimit"], r#""ip";r=0;t=60, "route";r=99;t=1"#);
//! # }
//! ```
//!
//! # Around the router, or inside it
//!
//! `Router::layer` (as above) wraps every route: for each request axum
//! clones the layered route and boxes its future and its body, about a
//! thousand instructions on top of the layer's own cost
//! (`load-tests/instructions.sh`). A layer that applies to every route
//! can wrap the router instead, as the reference server does:
//!
//! ```
//! use std::net::SocketAddr;
//! use axum::{Router, body::Body, routing::get, extract::connect_info::MockConnectInfo};
//! use tollgate::client_ip::{SetClientIpLayer, TrustedProxies};
//! use tollgate::rate_limit::{ByClientIp, MemoryStore, Policy, Quota, RateLimitLayer};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let router = Router::new().route("/", get(|| async { "ok" }));
//! let app = ServiceBuilder::new()
//!     // `axum::serve` inserts the peer's address with
//!     // `app.into_make_service_with_connect_info::<SocketAddr>()`.
//!     .layer(MockConnectInfo(SocketAddr::from(([192, 0, 2, 1], 1))))
//!     // `axum::serve` wants axum's body type.
//!     .map_response(|res: http::Response<_>| res.map(Body::new))
//!     .layer(SetClientIpLayer::new(TrustedProxies::none()))
//!     .layer(RateLimitLayer::new(MemoryStore::new()).with_policy(Policy::new(
//!         "ip",
//!         ByClientIp::new(),
//!         Quota::per_minute(60),
//!     )))
//!     .service(router);
//!
//! let req = http::Request::get("/").body(Body::empty()).unwrap();
//! let res = app.oneshot(req).await.unwrap();
//! assert_eq!(res.headers()["ratelimit"], r#""ip";r=59;t=1"#);
//! # }
//! ```
//!
//! # Concurrency
//!
//! A rate does not bound what requests *hold*. [`KeyedConcurrencyLimitLayer`]
//! bounds requests in flight per key (tenant, subject, client IP), answered
//! 429 with `qu="concurrent-requests"`; put it above the rate limiter.
//! (Unlike `tower::limit::ConcurrencyLimitLayer`, which bounds a whole
//! service and makes callers wait, it counts per key and refuses at once.)
//!
//! # Compared with other crates
//!
//! - `tower::limit::RateLimit` limits a whole service by delaying
//!   `poll_ready`: no keys, and axum does not use `poll_ready` backpressure.
//! - `tower_governor` keys requests and answers 429, but decides each layer
//!   on its own (a request denied by its second layer was already charged by
//!   the first), keeps state per process only, and emits the older
//!   `X-RateLimit-*` headers. Tollgate decides stacked policies together,
//!   has a store seam for shared state and speaks the current IETF draft.
//!
//! # Ordering
//!
//! Put [`SetClientIpLayer`](crate::client_ip::SetClientIpLayer) above this
//! layer, and metrics above it too, so rejections are counted.

mod clock;
mod concurrency;
mod future;
mod gcra;
mod headers;
mod key;
mod layer;
mod policy;
mod quota;
mod service;
mod store;

pub use crate::body::ResponseBody;
#[cfg(feature = "memory")]
pub use clock::MonotonicClock;
pub use clock::{Clock, ManualClock, TokioClock};
pub use concurrency::{
    ConcurrencyFuture, ConcurrencyPolicy, KeyedConcurrencyLimit, KeyedConcurrencyLimitLayer,
    SlotBody,
};

/// The former name of [`KeyedConcurrencyLimitLayer`] (it clashed with
/// `tower::limit::ConcurrencyLimitLayer`, which limits a whole service).
#[deprecated(since = "0.1.0", note = "renamed KeyedConcurrencyLimitLayer")]
pub type ConcurrencyLimitLayer = KeyedConcurrencyLimitLayer;

/// The former name of [`KeyedConcurrencyLimit`].
#[deprecated(since = "0.1.0", note = "renamed KeyedConcurrencyLimit")]
pub type ConcurrencyLimit<S> = KeyedConcurrencyLimit<S>;
pub use future::ResponseFuture;
pub use headers::{QUOTA_EXCEEDED, Rejection};
pub use key::{ByClientIp, ByExtension, Global, Key, KeyExtractor, KeyRejection};
pub use layer::RateLimitLayer;
pub use policy::{FailurePolicy, ParseFailurePolicyError, Policy, PolicyName};
pub use quota::{ParseQuotaError, QUOTA_FORMAT, Quota};
pub use service::{LocalFallback, RateLimit};
pub use store::{
    Check, Decision, Decisions, EitherFuture, EitherStore, Store, StoreError, StoreErrorKind,
};
#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub use store::{DEFAULT_OVERFLOW_WIDTH, DEFAULT_PURGE_INTERVAL, MemoryStore};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use store::{
    DEFAULT_REDIS_TIMEOUT, LeaseConfig, OVER_LIMIT_CACHE_CAPACITY, RedisConfig, RedisFuture,
    RedisStats, RedisStore, RedisStoreBuilder, RedisTarget, Sharding,
};
