//! Priority load shedding: under overload, refuse the least important
//! traffic first, before latency collapses for everyone.
//!
//! A [`LoadShedLayer`] reads a [`Load`] on each request (for a replica
//! whose bottleneck is its database pool, the pool's
//! [`TenantPool::load`](crate::tenant::TenantPool::load): connections held
//! plus queued work, over the pool's size) and the request's priority
//! (for example its trust level). Each priority has a threshold; when the
//! load is at or above it, requests of that priority get `503 Service
//! Unavailable` with `Retry-After: 1` and problem details, at once and
//! without touching anything shared. Lower priorities get lower
//! thresholds, so as load rises `new` users are shed first, then `basic`,
//! and the highest priority last or never. This is the shape of Stripe's
//! fleet-usage load shedder: critical traffic keeps its capacity because
//! less important traffic gives way early.
//!
//! Requests without a priority (the extractor says `None`) are never shed;
//! keep probes (`/health`, `/ready`) and `/metrics` out of the layer
//! altogether.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use axum::{Router, routing::get};
//! use tollgate::shed::LoadShedLayer;
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // Any source of load: here a number the test sets.
//! let load = Arc::new(AtomicU64::new(0));
//! let reading = load.clone();
//! let layer = LoadShedLayer::new(move || f64::from_bits(reading.load(Ordering::Relaxed)))
//!     .with_priority("free", Some(1.0))
//!     .with_priority("paid", Some(2.0))
//!     .with_priority_fn(|req: &http::request::Parts| {
//!         Some(if req.headers.contains_key("x-paid") { 1 } else { 0 })
//!     });
//! let app = Router::new().route("/", get(|| async { "ok" })).layer(layer);
//! let req = |paid: bool| {
//!     let mut req = http::Request::get("/");
//!     if paid { req = req.header("x-paid", "1"); }
//!     req.body(axum::body::Body::empty()).unwrap()
//! };
//!
//! load.store(1.5f64.to_bits(), Ordering::Relaxed);
//! let res = app.clone().oneshot(req(false)).await.unwrap();
//! assert_eq!(res.status(), 503);
//! assert_eq!(res.headers()["retry-after"], "1");
//! let body = axum::body::to_bytes(res.into_body(), 1024).await.unwrap();
//! assert!(std::str::from_utf8(&body).unwrap().contains(
//!     r#""type":"https://iana.org/assignments/http-problem-types#temporary-reduced-capacity""#
//! ));
//! assert_eq!(app.clone().oneshot(req(true)).await.unwrap().status(), 200);
//!
//! load.store(0.5f64.to_bits(), Ordering::Relaxed);
//! assert_eq!(app.oneshot(req(false)).await.unwrap().status(), 200);
//! # }
//! ```
//!
//! # Ordering
//!
//! After authentication and whatever sets the priority (a trust lookup),
//! before anything that waits for the shared resource.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Request, Response, StatusCode, header};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

/// The problem type of a shed request, from the IETF draft's registration
/// (draft-ietf-httpapi-ratelimit-headers): the service is shedding load,
/// not enforcing a client's quota.
pub const TEMPORARY_REDUCED_CAPACITY: &str =
    "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity";

use crate::body::ResponseBody;
use crate::problem::Problem;

/// How loaded the shared resource is: 1.0 is fully used, above 1.0 work
/// queues for it.
pub trait Load: Send + Sync + 'static {
    /// The current load.
    fn load(&self) -> f64;
}

impl<F: Fn() -> f64 + Send + Sync + 'static> Load for F {
    fn load(&self) -> f64 {
        self()
    }
}

#[cfg(feature = "postgres")]
impl Load for crate::tenant::TenantPool {
    fn load(&self) -> f64 {
        crate::tenant::TenantPool::load(self)
    }
}

type PriorityFn = dyn Fn(&Parts) -> Option<usize> + Send + Sync;

/// Sheds requests by priority when the load passes their threshold.
///
/// See the [module docs](self) for an example.
#[derive(Clone)]
pub struct LoadShedLayer {
    shared: Arc<Shared>,
}

struct Shared {
    load: Box<dyn Load>,
    /// Lowest priority first: name and threshold (`None`: never shed).
    priorities: Vec<(Arc<str>, Option<f64>)>,
    priority: Box<PriorityFn>,
    #[cfg(feature = "metrics")]
    shed: std::sync::OnceLock<Vec<metrics::Counter>>,
}

impl std::fmt::Debug for LoadShedLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadShedLayer")
            .field("priorities", &self.shared.priorities)
            .finish_non_exhaustive()
    }
}

impl LoadShedLayer {
    /// Sheds by `load`; add priorities, lowest first, and say how a request
    /// finds its own.
    pub fn new(load: impl Load) -> Self {
        Self {
            shared: Arc::new(Shared {
                load: Box::new(load),
                priorities: Vec::new(),
                priority: Box::new(|_| None),
                #[cfg(feature = "metrics")]
                shed: std::sync::OnceLock::new(),
            }),
        }
    }

    fn shared_mut(&mut self) -> &mut Shared {
        Arc::get_mut(&mut self.shared).expect("configure the layer before cloning it")
    }

    /// Adds the next priority (the first added is the lowest): requests of
    /// it are shed while the load is at or above `threshold` (`None`:
    /// never). Call before cloning.
    ///
    /// # Panics
    ///
    /// If the layer has already been cloned.
    #[must_use]
    pub fn with_priority(mut self, name: &str, threshold: Option<f64>) -> Self {
        self.shared_mut().priorities.push((name.into(), threshold));
        self
    }

    /// How a request's priority is found: an index into the priorities
    /// (beyond the last: the last), or `None` for never shed.
    ///
    /// # Panics
    ///
    /// If the layer has already been cloned.
    #[must_use]
    pub fn with_priority_fn(
        mut self,
        f: impl Fn(&Parts) -> Option<usize> + Send + Sync + 'static,
    ) -> Self {
        self.shared_mut().priority = Box::new(f);
        self
    }
}

impl<S> Layer<S> for LoadShedLayer {
    type Service = LoadShed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LoadShed {
            inner,
            shared: self.shared.clone(),
        }
    }
}

impl Shared {
    /// The index of the priority to shed `req` at, if it is to be shed.
    fn shed(&self, req: &Parts) -> Option<usize> {
        let last = self.priorities.len().checked_sub(1)?;
        let index = (self.priority)(req)?.min(last);
        let threshold = self.priorities[index].1?;
        (self.load.load() >= threshold).then_some(index)
    }
}

/// The service of [`LoadShedLayer`].
#[derive(Clone)]
pub struct LoadShed<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for LoadShed<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadShed")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> LoadShed<S> {
    define_inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for LoadShed<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = LoadShedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let (parts, body) = req.into_parts();
        if let Some(index) = self.shared.shed(&parts) {
            let name = &self.shared.priorities[index].0;
            #[cfg(feature = "metrics")]
            self.shared
                .shed
                .get_or_init(|| {
                    self.shared
                        .priorities
                        .iter()
                        .map(|(p, _)| {
                            metrics::counter!(crate::metrics::SHED_REQUESTS, "priority" => p.to_string())
                        })
                        .collect()
                })[index]
                .increment(1);
            let mut res = Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Service is temporarily running at reduced capacity",
            )
            .with_type(TEMPORARY_REDUCED_CAPACITY)
            .with_detail(format!(
                "the server is shedding {name} traffic under load; retry shortly"
            ))
            .into_http_response();
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return LoadShedFuture {
                state: State::Shed {
                    response: Some(res),
                },
            };
        }
        LoadShedFuture {
            state: State::Inner {
                future: self.inner.call(Request::from_parts(parts, body)),
            },
        }
    }
}

pin_project! {
    /// The response future of [`LoadShed`].
    pub struct LoadShedFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Shed { response: Option<Response<Bytes>> },
        Inner { #[pin] future: F },
    }
}

impl<F> std::fmt::Debug for LoadShedFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadShedFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for LoadShedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Shed { response } => Poll::Ready(Ok(response
                .take()
                .expect("polled after completion")
                .map(ResponseBody::full))),
            StateProj::Inner { future } => {
                Poll::Ready(ready!(future.poll(cx)).map(|res| res.map(ResponseBody::inner)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn lowest_priority_first_and_unprioritised_never() {
        let load = Arc::new(AtomicU64::new(0));
        let reading = load.clone();
        let layer = LoadShedLayer::new(move || f64::from_bits(reading.load(Ordering::Relaxed)))
            .with_priority("new", Some(1.5))
            .with_priority("basic", Some(2.0))
            .with_priority("staff", None)
            .with_priority_fn(|req: &Parts| {
                req.headers
                    .get("x-level")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
            });
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .layer(layer);
        let status = |level: Option<&str>| {
            let mut req = Request::get("/");
            if let Some(level) = level {
                req = req.header("x-level", level);
            }
            let app = app.clone();
            async move {
                app.oneshot(req.body(axum::body::Body::empty()).unwrap())
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }
        };
        let levels = [Some("0"), Some("1"), Some("2"), Some("9"), None];
        for (load_now, expected) in [
            (1.0, [200, 200, 200, 200, 200]),
            (1.5, [503, 200, 200, 200, 200]),
            (2.5, [503, 503, 200, 200, 200]),
            (100.0, [503, 503, 200, 200, 200]),
        ] {
            load.store(f64::to_bits(load_now), Ordering::Relaxed);
            for (level, want) in levels.iter().zip(expected) {
                assert_eq!(
                    status(*level).await,
                    want,
                    "load {load_now}, level {level:?}"
                );
            }
        }
    }
}
