//! [`KeyedConcurrencyLimitLayer`]: at most N requests in flight per key.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use smallvec::SmallVec;
use tower_layer::Layer;
use tower_service::Service;

use super::headers::{QUOTA_EXCEEDED, RATELIMIT, RATELIMIT_POLICY, syntax};
use super::{Key, KeyExtractor, PolicyName};
use crate::body::ResponseBody;
use crate::problem::Problem;

/// A limit on requests in flight per key.
pub struct ConcurrencyPolicy {
    name: PolicyName,
    extractor: Box<dyn KeyExtractor>,
    max: u32,
    max_fn: Option<Box<MaxFn>>,
}

type MaxFn = dyn Fn(&http::request::Parts) -> u32 + Send + Sync;

impl std::fmt::Debug for ConcurrencyPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConcurrencyPolicy")
            .field("name", &self.name)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl ConcurrencyPolicy {
    /// At most `max` requests of each key at once (`max` 0 is taken as 1).
    pub fn new(name: &str, extractor: impl KeyExtractor, max: u32) -> Self {
        Self {
            name: PolicyName::new(name),
            extractor: Box::new(extractor),
            max: max.max(1),
            max_fn: None,
        }
    }

    /// Chooses the maximum per request (a tenant's plan): `f(req)` requests
    /// of the request's key at once (0 is taken as 1). The maximum given to
    /// [`new`](Self::new) is then only a fallback for documentation. A
    /// lowered maximum applies to requests arriving after the change:
    /// those already in flight finish, and new ones wait for the count to
    /// fall below it.
    #[must_use]
    pub fn with_max_fn(
        mut self,
        f: impl Fn(&http::request::Parts) -> u32 + Send + Sync + 'static,
    ) -> Self {
        self.max_fn = Some(Box::new(f));
        self
    }

    fn max_for(&self, req: &http::request::Parts) -> u32 {
        self.max_fn.as_ref().map_or(self.max, |f| f(req).max(1))
    }

    /// The policy's name.
    pub fn name(&self) -> PolicyName {
        self.name
    }

    /// Requests of one key allowed in flight at once.
    pub fn max(&self) -> u32 {
        self.max
    }
}

/// Limits requests in flight per key, by one or more
/// [`ConcurrencyPolicy`]s. Clones share their counts, so one layer added
/// to several routes bounds them together.
///
/// A rate limit counts requests as they arrive; it does not see how long
/// each one holds what it holds. A client with a modest rate can still
/// open many slow requests at once (half-sent bodies, expensive queries)
/// and hold a replica's connections, pool slots and memory. A concurrency
/// policy bounds that per key (tenant, subject, client IP: any
/// [`KeyExtractor`]): the request over the limit is answered `429` at
/// once, with `Retry-After: 1` and, in the form of
/// draft-ietf-httpapi-ratelimit-headers-11, a `RateLimit-Policy` item whose
/// quota unit is `qu="concurrent-requests"`.
///
/// A request's slots are taken all-or-nothing across the layer's policies
/// and given back when its response body has been sent, when the response
/// or its future is dropped (the client went away), or when the handler
/// panics: a slot cannot leak. Counts are per process (a replica's
/// resources are what they protect) and an idle key holds no memory.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use axum::{Router, routing::get};
/// use tollgate::rate_limit::{KeyedConcurrencyLimitLayer, ConcurrencyPolicy, Key};
/// use tower::{Service, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let per_tenant = |req: &http::request::Parts| {
///     Ok(req.headers.get("x-tenant").and_then(|v| v.to_str().ok()).map(Key::from))
/// };
/// let app = Router::new()
///     .route("/", get(|| async { "ok" }))
///     .layer(KeyedConcurrencyLimitLayer::new().with_policy(ConcurrencyPolicy::new(
///         "tenant-concurrency",
///         per_tenant,
///         1,
///     )));
/// let req = |tenant: &str| {
///     http::Request::get("/").header("x-tenant", tenant).body(axum::body::Body::empty()).unwrap()
/// };
///
/// // Tenant a's first response is still held (its body not yet sent).
/// let held = app.clone().oneshot(req("a")).await.unwrap();
/// let res = app.clone().oneshot(req("a")).await.unwrap();
/// assert_eq!(res.status(), 429);
/// assert_eq!(res.headers()["retry-after"], "1");
/// assert_eq!(
///     res.headers()["ratelimit-policy"],
///     r#""tenant-concurrency";q=1;qu="concurrent-requests""#
/// );
/// // Tenant b is not affected.
/// assert_eq!(app.clone().oneshot(req("b")).await.unwrap().status(), 200);
/// // Dropping the held response gives the slot back.
/// drop(held);
/// assert_eq!(app.oneshot(req("a")).await.unwrap().status(), 200);
/// # }
/// ```
///
/// # Ordering
///
/// Above the rate limiter, so a request refused for concurrency is not
/// charged a rate quota, and below authentication, so subject and tenant
/// keys come from verified claims.
#[derive(Debug, Clone, Default)]
pub struct KeyedConcurrencyLimitLayer {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    policies: Vec<ConcurrencyPolicy>,
    /// In-flight count per (policy index, key); a key at zero is removed,
    /// so it holds only the requests in flight. foldhash (seeded per
    /// process), as the stores' maps: SipHash was most of a lookup.
    in_flight: Mutex<InFlight>,
    #[cfg(feature = "metrics")]
    metrics: std::sync::OnceLock<Vec<PolicyMetrics>>,
}

#[cfg(feature = "metrics")]
#[derive(Debug)]
struct PolicyMetrics {
    in_flight: metrics::Gauge,
    rejected: metrics::Counter,
}

impl KeyedConcurrencyLimitLayer {
    /// A layer with no policy yet (it lets everything through).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a policy. Call before the layer is cloned or used.
    ///
    /// # Panics
    ///
    /// If the layer has already been cloned.
    #[must_use]
    pub fn with_policy(mut self, policy: ConcurrencyPolicy) -> Self {
        Arc::get_mut(&mut self.shared)
            .expect("add policies before cloning the layer")
            .policies
            .push(policy);
        self
    }

    /// Requests in flight under `policy` for `key` right now.
    pub fn in_flight(&self, policy: &str, key: &Key) -> u32 {
        let Some(index) = self
            .shared
            .policies
            .iter()
            .position(|p| p.name.as_str() == policy)
        else {
            return 0;
        };
        self.shared
            .lock()
            .get(&(index, key.clone()))
            .copied()
            .unwrap_or(0)
    }
}

impl<S> Layer<S> for KeyedConcurrencyLimitLayer {
    type Service = KeyedConcurrencyLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedConcurrencyLimit {
            inner,
            shared: self.shared.clone(),
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, InFlight> {
        // Counts are changed in single statements; a panic cannot leave
        // one half-written.
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(feature = "metrics")]
    fn metrics(&self) -> &[PolicyMetrics] {
        self.metrics.get_or_init(|| {
            self.policies
                .iter()
                .map(|p| PolicyMetrics {
                    in_flight: metrics::gauge!(crate::metrics::CONCURRENCY_IN_FLIGHT, "policy" => p.name.as_str()),
                    rejected: metrics::counter!(crate::metrics::CONCURRENCY_REJECTED, "policy" => p.name.as_str()),
                })
                .collect()
        })
    }

    /// Takes a slot of every key, or none: the indexes of the policies at
    /// their limit.
    fn acquire(
        self: &Arc<Self>,
        keys: SmallVec<[(usize, Key); 2]>,
        maxes: &[u32],
    ) -> Result<Slots, SmallVec<[(usize, u32); 2]>> {
        // One map lookup per key on the way in and one on the way out
        // (each hashes the key): take each slot that has room, then give
        // them back if any was full.
        let mut map = self.lock();
        let mut full: SmallVec<[(usize, u32); 2]> = SmallVec::new();
        for (slot, &max) in keys.iter().zip(maxes) {
            let n = map.entry(slot.clone()).or_insert(0);
            if *n < max {
                *n += 1;
            } else {
                full.push((slot.0, max));
            }
        }
        if !full.is_empty() {
            for slot in &keys {
                let taken = !full.iter().any(|(i, _)| *i == slot.0);
                give_back(&mut map, slot, taken);
            }
            return Err(full);
        }
        drop(map);
        #[cfg(feature = "metrics")]
        for (i, _) in &keys {
            self.metrics()[*i].in_flight.increment(1.0);
        }
        Ok(Slots {
            shared: self.clone(),
            keys,
        })
    }
}

/// In-flight requests per (policy index, key).
type InFlight = HashMap<(usize, Key), u32, foldhash::fast::RandomState>;

/// Gives back `slot` (if `taken`), removing its key at zero.
fn give_back(map: &mut InFlight, slot: &(usize, Key), taken: bool) {
    if let Entry::Occupied(mut n) = map.entry(slot.clone()) {
        if taken {
            *n.get_mut() -= 1;
        }
        if *n.get() == 0 {
            n.remove();
        }
    }
}

/// Slots held by one request; given back on drop.
#[derive(Debug)]
struct Slots {
    shared: Arc<Shared>,
    keys: SmallVec<[(usize, Key); 2]>,
}

impl Drop for Slots {
    fn drop(&mut self) {
        let mut map = self.shared.lock();
        for slot in &self.keys {
            give_back(&mut map, slot, true);
        }
        drop(map);
        #[cfg(feature = "metrics")]
        for (i, _) in &self.keys {
            self.shared.metrics()[*i].in_flight.decrement(1.0);
        }
    }
}

/// The service of [`KeyedConcurrencyLimitLayer`].
#[derive(Debug, Clone)]
pub struct KeyedConcurrencyLimit<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> KeyedConcurrencyLimit<S> {
    define_inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for KeyedConcurrencyLimit<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResponseBody<SlotBody<ResBody>>>;
    type Error = S::Error;
    type Future = ConcurrencyFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let mut keys = SmallVec::new();
        let mut maxes: SmallVec<[u32; 2]> = SmallVec::new();
        for (i, policy) in self.shared.policies.iter().enumerate() {
            match policy.extractor.extract(&parts) {
                Ok(Some(key)) => {
                    keys.push((i, key));
                    maxes.push(policy.max_for(&parts));
                }
                Ok(None) => {}
                Err(rejection) => {
                    return ConcurrencyFuture::rejected(
                        rejection.into_problem().into_http_response(),
                    );
                }
            }
        }
        let slots = if keys.is_empty() {
            None
        } else {
            match self.shared.acquire(keys, &maxes) {
                Ok(slots) => Some(slots),
                Err(full) => return ConcurrencyFuture::rejected(self.rejection(&full)),
            }
        };
        ConcurrencyFuture {
            state: State::Calling {
                future: self.inner.call(Request::from_parts(parts, body)),
                slots,
            },
        }
    }
}

impl<S> KeyedConcurrencyLimit<S> {
    /// The 429 for the policies in `full`, with the maximum each applied.
    fn rejection(&self, full: &[(usize, u32)]) -> Response<Bytes> {
        let mut violated = Vec::new();
        let mut policy_line = String::new();
        let mut limit_line = String::new();
        for &(i, max) in full {
            let policy = &self.shared.policies[i];
            #[cfg(feature = "metrics")]
            self.shared.metrics()[i].rejected.increment(1);
            violated.push(serde_json::Value::from(policy.name.as_str()));
            let sep = if limit_line.is_empty() { "" } else { ", " };
            let sf_name = syntax::sf_string(policy.name.as_str());
            policy_line.push_str(sep);
            syntax::concurrency_policy_item(&mut policy_line, &sf_name, max.into());
            // No `t`: when a slot frees depends on other requests.
            limit_line.push_str(sep);
            syntax::limit_item(&mut limit_line, &sf_name, 0, None);
        }
        let mut res = Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "Request cannot be satisfied as assigned quota has been exceeded",
        )
        .with_type(QUOTA_EXCEEDED)
        .with_detail("too many requests in flight; retry in 1 s")
        .with_extension("violated-policies", violated)
        .into_http_response();
        let headers = res.headers_mut();
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        // Policy names are HTTP-safe tokens; a value that is not is left out.
        if let Ok(v) = HeaderValue::try_from(policy_line) {
            headers.insert(RATELIMIT_POLICY.clone(), v);
        }
        if let Ok(v) = HeaderValue::try_from(limit_line) {
            headers.insert(RATELIMIT.clone(), v);
        }
        res
    }
}

pin_project! {
    /// The response future of [`KeyedConcurrencyLimit`].
    pub struct ConcurrencyFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Rejected { response: Option<Response<Bytes>> },
        Calling { #[pin] future: F, slots: Option<Slots> },
    }
}

impl<F> std::fmt::Debug for ConcurrencyFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConcurrencyFuture").finish_non_exhaustive()
    }
}

impl<F> ConcurrencyFuture<F> {
    fn rejected(response: Response<Bytes>) -> Self {
        Self {
            state: State::Rejected {
                response: Some(response),
            },
        }
    }
}

impl<F, B, E> Future for ConcurrencyFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<SlotBody<B>>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Rejected { response } => {
                let res = response.take().expect("polled after completion");
                Poll::Ready(Ok(res.map(ResponseBody::full)))
            }
            StateProj::Calling { future, slots } => {
                let res = ready!(future.poll(cx))?;
                let slots = slots.take();
                Poll::Ready(Ok(res.map(|inner| {
                    ResponseBody::inner(SlotBody {
                        inner,
                        slots: SlotsHeld { slots },
                    })
                })))
            }
        }
    }
}

/// Holds slots until dropped (a plain field, so the body can release them
/// early through a pinned projection).
#[derive(Debug)]
struct SlotsHeld {
    slots: Option<Slots>,
}

pin_project! {
    /// A response body that holds its request's concurrency slots until
    /// it has been sent whole (or dropped).
    #[derive(Debug)]
    pub struct SlotBody<B> {
        #[pin]
        inner: B,
        slots: SlotsHeld,
    }
}

impl<B: Body<Data = Bytes>> Body for SlotBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        if frame.is_none() || matches!(frame, Some(Err(_))) || this.inner.is_end_stream() {
            this.slots.slots = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::Body as AxumBody;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    fn by_header(name: &'static str) -> impl KeyExtractor {
        move |req: &http::request::Parts| {
            Ok(req
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(Key::from))
        }
    }

    /// One request in flight per `x-tenant`.
    fn one_per_tenant() -> KeyedConcurrencyLimitLayer {
        KeyedConcurrencyLimitLayer::new().with_policy(ConcurrencyPolicy::new(
            "tenant",
            by_header("x-tenant"),
            1,
        ))
    }

    fn req(tenant: &str, user: &str) -> Request<AxumBody> {
        Request::get("/")
            .header("x-tenant", tenant)
            .header("x-user", user)
            .body(AxumBody::empty())
            .unwrap()
    }

    /// A maximum chosen per request (a plan): each request is held to the
    /// one it carries, and the 429 reports it.
    #[tokio::test]
    async fn per_request_maximum() {
        let layer = KeyedConcurrencyLimitLayer::new().with_policy(
            ConcurrencyPolicy::new("tenant", by_header("x-tenant"), 1).with_max_fn(|req| {
                req.headers
                    .get("x-max")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(1)
            }),
        );
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .layer(layer.clone());
        let with_max = |max: &str| {
            let mut req = req("t", "u");
            req.headers_mut().insert("x-max", max.parse().unwrap());
            req
        };
        let mut held = Vec::new();
        for _ in 0..3 {
            let res = app.clone().oneshot(with_max("3")).await.unwrap();
            assert_eq!(res.status(), 200);
            held.push(res);
        }
        let res = app.clone().oneshot(with_max("3")).await.unwrap();
        assert_eq!(res.status(), 429);
        assert_eq!(
            res.headers()["ratelimit-policy"],
            r#""tenant";q=3;qu="concurrent-requests""#
        );
        // Lowered to 2: refused until the count falls below it.
        held.pop();
        assert_eq!(
            app.clone().oneshot(with_max("2")).await.unwrap().status(),
            429
        );
        held.pop();
        assert_eq!(
            app.clone().oneshot(with_max("2")).await.unwrap().status(),
            200
        );
    }

    #[tokio::test]
    async fn all_or_nothing_and_released_when_the_body_ends() {
        let layer = KeyedConcurrencyLimitLayer::new()
            .with_policy(ConcurrencyPolicy::new("tenant", by_header("x-tenant"), 2))
            .with_policy(ConcurrencyPolicy::new("subject", by_header("x-user"), 1));
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .layer(layer.clone());
        let first = app.clone().oneshot(req("t", "u1")).await.unwrap();
        assert_eq!(first.status(), 200);
        // u1 is at its limit: refused, and the tenant is not charged.
        let res = app.clone().oneshot(req("t", "u1")).await.unwrap();
        assert_eq!(res.status(), 429);
        assert_eq!(res.headers()["ratelimit"], r#""subject";r=0"#);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["violated-policies"], serde_json::json!(["subject"]));
        assert_eq!(layer.in_flight("tenant", &Key::from("t")), 1);
        let second = app.clone().oneshot(req("t", "u2")).await.unwrap();
        let res = app.clone().oneshot(req("t", "u3")).await.unwrap();
        assert_eq!(res.status(), 429);
        assert_eq!(
            res.headers()["ratelimit-policy"],
            r#""tenant";q=2;qu="concurrent-requests""#
        );
        // Reading a body to its end gives its slots back.
        first.into_body().collect().await.unwrap();
        assert_eq!(layer.in_flight("subject", &Key::from("u1")), 0);
        assert_eq!(layer.in_flight("tenant", &Key::from("t")), 1);
        drop(second);
        assert_eq!(layer.in_flight("tenant", &Key::from("t")), 0);
        assert!(layer.shared.lock().is_empty(), "idle keys hold no memory");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_request_gives_its_slot_back() {
        let layer = one_per_tenant();
        let app = axum::Router::new()
            .route(
                "/",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    "late"
                }),
            )
            .layer(layer.clone());
        let pending = tokio::spawn(app.clone().oneshot(req("t", "u")));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(layer.in_flight("tenant", &Key::from("t")), 1);
        pending.abort();
        let _ = pending.await;
        assert_eq!(layer.in_flight("tenant", &Key::from("t")), 0);
    }

    #[tokio::test]
    async fn a_panicking_handler_gives_its_slot_back() {
        let layer = one_per_tenant();
        let app = axum::Router::new()
            .route(
                "/",
                axum::routing::get(|| async {
                    if true {
                        panic!("handler bug");
                    }
                    "never"
                }),
            )
            .layer(layer.clone());
        let result = tokio::spawn(app.oneshot(req("t", "u"))).await;
        assert!(result.is_err());
        assert_eq!(layer.in_flight("tenant", &Key::from("t")), 0);
    }
}
