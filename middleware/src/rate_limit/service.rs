//! [`RateLimit`], the middleware.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use smallvec::SmallVec;
use tower_service::Service;

use super::future::{ResponseFuture, Verdict, verdict};
use super::policy::{FailurePolicy, Policy};
use super::store::{Check, Store};

/// What every clone of one layer's service shares.
#[derive(Debug)]
pub(crate) struct Shared<St> {
    pub(crate) store: St,
    pub(crate) policies: Vec<Policy>,
    pub(crate) failure: FailurePolicy,
    pub(crate) fallback: Arc<Fallback>,
    /// `RateLimit-Policy` when it is the same for every response.
    pub(crate) single_policy_field: Option<HeaderValue>,
    /// The decision metrics' extra label, if any.
    pub(crate) label: Option<Arc<MetricLabel>>,
    /// Builds the 429 instead of the default problem.
    pub(crate) on_reject: Option<Arc<super::headers::RejectHook>>,
    #[cfg(feature = "metrics")]
    metrics: std::sync::OnceLock<LimitMetrics>,
}

/// See [`RateLimitLayer::with_metric_label`](super::RateLimitLayer::with_metric_label).
pub(crate) struct MetricLabel {
    pub(crate) name: &'static str,
    pub(crate) values: Vec<Arc<str>>,
    pub(crate) value_of: Box<LabelFn>,
}

/// Chooses a request's label value.
type LabelFn = dyn Fn(&http::request::Parts) -> Option<usize> + Send + Sync;

impl std::fmt::Debug for MetricLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricLabel")
            .field("name", &self.name)
            .field("values", &self.values)
            .finish_non_exhaustive()
    }
}

impl MetricLabel {
    /// The value index of `req`: one of `values`, else `values.len()`
    /// (`none`).
    pub(crate) fn index(&self, req: &http::request::Parts) -> usize {
        (self.value_of)(req)
            .filter(|&i| i < self.values.len())
            .unwrap_or(self.values.len())
    }
}

/// The layer's metric handles, made on first use so the hot path neither
/// allocates labels nor searches the recorder's registry.
#[cfg(feature = "metrics")]
#[derive(Debug)]
pub(crate) struct LimitMetrics {
    pub(crate) store_duration: metrics::Histogram,
    /// Per policy and label value: allowed, rejected, shadow rejected,
    /// near the limit, uncharged.
    pub(crate) decisions: Vec<Vec<[metrics::Counter; 5]>>,
}

impl<St> Shared<St> {
    pub(crate) fn new(
        store: St,
        policies: Vec<Policy>,
        failure: FailurePolicy,
        fallback: Arc<Fallback>,
        label: Option<Arc<MetricLabel>>,
        on_reject: Option<Arc<super::headers::RejectHook>>,
    ) -> Self {
        Self {
            label,
            on_reject,
            store,
            single_policy_field: super::headers::single_policy_field(&policies),
            policies,
            failure,
            fallback,
            #[cfg(feature = "metrics")]
            metrics: std::sync::OnceLock::new(),
        }
    }

    #[cfg(feature = "metrics")]
    pub(crate) fn metrics(&self) -> &LimitMetrics {
        self.metrics.get_or_init(|| LimitMetrics {
            store_duration: metrics::histogram!(crate::metrics::RATELIMIT_STORE_DURATION),
            decisions: self
                .policies
                .iter()
                .map(|policy| {
                    let mut base = vec![metrics::Label::new("policy", policy.name.as_str())];
                    // No label rather than an empty one when no class is set.
                    if let Some(class) = &policy.route_class {
                        base.push(metrics::Label::new("route_class", class.to_string()));
                    }
                    // One set per label value, and one for `none`.
                    let values: Vec<Option<String>> = match &self.label {
                        None => vec![None],
                        Some(label) => label
                            .values
                            .iter()
                            .map(|v| Some(v.to_string()))
                            .chain([Some("none".to_owned())])
                            .collect(),
                    };
                    values
                        .into_iter()
                        .map(|value| {
                            let mut labels = base.clone();
                            if let (Some(label), Some(value)) = (&self.label, value) {
                                labels.push(metrics::Label::new(label.name, value));
                            }
                            let decision = |outcome: &'static str| {
                                let mut labels = labels.clone();
                                labels.push(metrics::Label::new("outcome", outcome));
                                metrics::counter!(crate::metrics::RATELIMIT_DECISIONS, labels)
                            };
                            [
                                decision("allowed"),
                                decision("rejected"),
                                decision("shadow_rejected"),
                                metrics::counter!(
                                    crate::metrics::RATELIMIT_NEAR_LIMIT,
                                    labels.clone()
                                ),
                                decision("uncharged"),
                            ]
                        })
                        .collect()
                })
                .collect(),
        })
    }

    /// The failure policy of `policy`.
    pub(crate) fn failure_of(&self, policy: usize) -> FailurePolicy {
        self.policies[policy].failure.unwrap_or(self.failure)
    }
}

/// The local store [`FailurePolicy::Local`] decides in while the store
/// fails: one per process for one store, shared by every layer on it
/// ([`RateLimitLayer::with_local_fallback`](super::RateLimitLayer::with_local_fallback)),
/// so a policy stacked on several layers (say `tenant` on the read and the
/// write routes) is counted once, as the shared store counts it. Policies
/// of one name share buckets here as they do in every store.
///
/// ```
/// use tollgate::rate_limit::{FailurePolicy, LocalFallback, MemoryStore, RateLimitLayer};
///
/// // Three replicas: each allows a third of the quota while deciding alone.
/// let fallback = LocalFallback::new(3);
/// let reads = RateLimitLayer::new(MemoryStore::new())
///     .with_failure_policy(FailurePolicy::Local)
///     .with_local_fallback(fallback.clone());
/// let writes = RateLimitLayer::new(MemoryStore::new())
///     .with_failure_policy(FailurePolicy::Local)
///     .with_local_fallback(fallback);
/// # let _ = (reads, writes);
/// ```
#[derive(Debug, Clone)]
pub struct LocalFallback(pub(crate) Arc<Fallback>);

impl LocalFallback {
    /// A fallback that divides quotas by `replicas` (at least 1) while it
    /// decides, so that many replicas deciding alone let about the quota
    /// through together. Its store is made on first use.
    pub fn new(replicas: u32) -> Self {
        Self(Arc::new(Fallback::new(replicas)))
    }

    /// Bounds the local store's exact entries, as
    /// [`MemoryStore::with_max_keys`](super::MemoryStore::with_max_keys)
    /// does (keys beyond them are decided in its fixed-size overflow).
    #[must_use]
    pub fn with_max_keys(self, max_keys: usize) -> Self {
        Self(Arc::new(Fallback {
            max_keys: Some(max_keys),
            ..Fallback::new(self.0.replicas)
        }))
    }
}

/// The local store of [`FailurePolicy::Local`], made on first use.
#[derive(Debug)]
pub(crate) struct Fallback {
    /// Quotas are divided by this while deciding locally.
    pub(crate) replicas: u32,
    /// The local store's budget of exact entries
    /// ([`MemoryStore::with_max_keys`](super::MemoryStore::with_max_keys)).
    #[cfg_attr(not(feature = "memory"), allow(dead_code))]
    max_keys: Option<usize>,
    #[cfg(feature = "memory")]
    store: std::sync::OnceLock<super::MemoryStore>,
}

impl Fallback {
    pub(crate) fn new(replicas: u32) -> Self {
        Self {
            replicas: replicas.max(1),
            max_keys: None,
            #[cfg(feature = "memory")]
            store: std::sync::OnceLock::new(),
        }
    }

    /// Decides `checks` locally, or `None` without the `memory` feature.
    #[cfg_attr(not(feature = "memory"), allow(clippy::unused_self))]
    pub(crate) fn decide(&self, checks: &[Check]) -> Option<super::Decisions> {
        #[cfg(feature = "memory")]
        {
            let store = self.store.get_or_init(|| match self.max_keys {
                Some(max) => super::MemoryStore::new().with_max_keys(max),
                None => super::MemoryStore::new(),
            });
            // The memory store's future is always ready.
            store.check(checks).into_inner().ok()
        }
        #[cfg(not(feature = "memory"))]
        {
            let _ = checks;
            None
        }
    }
}

/// Middleware that rate-limits requests by its policies.
///
/// See the [module docs](crate::rate_limit) for an example.
#[derive(Debug)]
pub struct RateLimit<S, St> {
    inner: S,
    shared: Arc<Shared<St>>,
}

// === impl RateLimit ===

impl<S, St> RateLimit<S, St> {
    pub(crate) fn new(inner: S, shared: Arc<Shared<St>>) -> Self {
        Self { inner, shared }
    }

    define_inner_service_accessors!();
}

impl<S: Clone, St> Clone for RateLimit<S, St> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S, St, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S, St>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    St: Store,
{
    type Response = Response<super::ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, St, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The key depends on the request, so the decision is made in `call`.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let mut checks: SmallVec<[Check; 4]> = SmallVec::new();
        let mut index: SmallVec<[usize; 4]> = SmallVec::new();
        for (i, policy) in self.shared.policies.iter().enumerate() {
            match policy.extractor.extract(&parts) {
                Ok(Some(key)) => {
                    let quota = policy.quota_for(&parts);
                    checks.push(Check {
                        policy: policy.name,
                        key: policy.bucket(key, quota),
                        quota,
                        cost: policy.cost_for(&parts),
                        enforce: !policy.shadow,
                    });
                    index.push(i);
                }
                Ok(None) => {}
                Err(rejection) => return ResponseFuture::rejected(rejection.into_problem()),
            }
        }
        let label = self.shared.label.as_ref().map_or(0, |l| l.index(&parts));
        let req = Request::from_parts(parts, body);

        if checks.is_empty() {
            return ResponseFuture::calling(self.inner.call(req), None);
        }
        // A store that answers at once is decided here, and the inner
        // service called now: no state to keep, no clone of it.
        if let Some(result) = self.shared.store.check_now(&checks) {
            return match verdict(&self.shared, &index, &checks, label, result) {
                Verdict::Allow(fields) => ResponseFuture::calling(self.inner.call(req), fields),
                Verdict::Reject(res) => ResponseFuture::answered(res),
            };
        }
        // Called later: take the service that was driven to readiness,
        // leave a clone (behind axum's routes a clone is an allocation).
        // https://docs.rs/tower/latest/tower/trait.Service.html#be-careful-when-cloning-inner-services
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let check = self.shared.store.check(&checks);
        ResponseFuture::checking(check, req, inner, checks, index, label, self.shared.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use axum::body::Body;
    use axum::extract::connect_info::MockConnectInfo;
    use http::{HeaderMap, StatusCode};
    use http_body_util::BodyExt;
    use tower::{ServiceBuilder, ServiceExt};

    use super::*;
    use crate::client_ip::{SetClientIpLayer, TrustedProxies};
    use crate::rate_limit::{
        ByClientIp, Decisions, Global, Key, KeyRejection, MemoryStore, Quota, RateLimitLayer,
        StoreError, StoreErrorKind, TokioClock,
    };

    fn app<St: Store + Clone>(layer: RateLimitLayer<St>) -> axum::Router {
        axum::Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .layer(
                ServiceBuilder::new()
                    .layer(SetClientIpLayer::new("10.0.0.0/8".parse().unwrap()))
                    .layer(layer),
            )
            .layer(MockConnectInfo(SocketAddr::from(([192, 0, 2, 1], 1))))
    }

    async fn get(app: &axum::Router, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, String) {
        let mut req = Request::get("/");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let (parts, body) = res.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    /// A store on tokio's clock, which `start_paused` tests control.
    fn paused_store() -> MemoryStore<TokioClock> {
        MemoryStore::with_clock(TokioClock::new())
    }

    fn ip_layer(quota: Quota) -> RateLimitLayer<MemoryStore<TokioClock>> {
        RateLimitLayer::new(paused_store()).with_policy(Policy::new("ip", ByClientIp::new(), quota))
    }

    #[tokio::test(start_paused = true)]
    async fn rejects_with_headers_and_problem_then_refills() {
        let app = app(ip_layer(Quota::per_minute(2)));
        let (status, headers, _) = get(&app, &[]).await;
        assert_eq!(status, 200);
        assert_eq!(headers["ratelimit-policy"], r#""ip";q=2;w=60"#);
        assert_eq!(headers["ratelimit"], r#""ip";r=1;t=30"#);
        let (_, headers, _) = get(&app, &[]).await;
        assert_eq!(headers["ratelimit"], r#""ip";r=0;t=60"#);

        tokio::time::advance(Duration::from_millis(500)).await;
        let (status, headers, body) = get(&app, &[]).await;
        assert_eq!(status, 429);
        // 29.5 s to wait: rounded up, and equal to the `t` of the violated policy.
        assert_eq!(headers["retry-after"], "30");
        assert_eq!(headers["ratelimit"], r#""ip";r=0;t=30"#);
        assert_eq!(headers["ratelimit-policy"], r#""ip";q=2;w=60"#);
        assert_eq!(headers["content-type"], "application/problem+json");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["type"], crate::rate_limit::QUOTA_EXCEEDED);
        assert_eq!(body["status"], 429);
        assert_eq!(body["violated-policies"], serde_json::json!(["ip"]));

        tokio::time::advance(Duration::from_millis(29_500)).await;
        assert_eq!(get(&app, &[]).await.0, 200);
        assert_eq!(get(&app, &[]).await.0, 429);
    }

    /// Polls `fut` to completion with `recorder` as the metrics recorder
    /// (it is only set while polling; the memory store never waits).
    #[cfg(feature = "metrics")]
    fn recorded<F: std::future::Future>(
        recorder: &metrics_exporter_prometheus::PrometheusRecorder,
        fut: F,
    ) -> F::Output {
        metrics::with_local_recorder(recorder, || {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let mut fut = std::pin::pin!(fut);
            loop {
                if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
                    break out;
                }
            }
        })
    }

    /// Decisions are counted by policy, outcome and the layer's label
    /// (`plan`, from a fixed list), and allowed requests that left at most
    /// 10 % of the burst count as near the limit.
    #[cfg(feature = "metrics")]
    #[test]
    fn decisions_carry_the_metric_label_and_near_limit_is_counted() {
        let recorder = crate::metrics::prometheus_builder().build_recorder();
        let handle = recorder.handle();
        let layer = RateLimitLayer::new(MemoryStore::new())
            .with_policy(Policy::new("tenant", Global, Quota::per_minute(10)))
            .with_metric_label("plan", ["free", "pro"], |req| {
                match req.headers.get("x-plan")?.to_str().ok()? {
                    "free" => Some(0),
                    "pro" => Some(1),
                    _ => Some(7),
                }
            });
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .layer(layer);
        let send = |plan: Option<&str>| {
            let mut req = Request::get("/");
            if let Some(plan) = plan {
                req = req.header("x-plan", plan);
            }
            let fut = app.clone().oneshot(req.body(Body::empty()).unwrap());
            recorded(&recorder, fut).unwrap().status()
        };
        for _ in 0..9 {
            send(Some("free"));
        }
        assert_eq!(send(Some("free")), 200);
        assert_eq!(send(Some("free")), 429);
        assert_eq!(send(None), 429);
        assert_eq!(send(Some("gold")), 429);
        let text = handle.render();
        let line = |labels: &str| {
            text.lines()
                .find(|l| l.contains(labels))
                .unwrap_or_else(|| panic!("no series with {labels} in {text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        assert_eq!(line(r#"plan="free",outcome="allowed""#), "10");
        assert_eq!(line(r#"plan="free",outcome="rejected""#), "1");
        assert_eq!(line(r#"plan="none",outcome="rejected""#), "2");
        assert_eq!(line(r#"plan="pro",outcome="allowed""#), "0");
        // r=1 and r=0 of a burst of 10.
        assert_eq!(
            line(r#"tollgate_ratelimit_near_limit_total{policy="tenant",plan="free"}"#),
            "2"
        );
    }

    /// A policy that allowed a request another policy rejected counts it
    /// as `uncharged`, not `allowed`: nothing was charged.
    #[cfg(feature = "metrics")]
    #[test]
    fn a_request_rejected_by_a_sibling_is_uncharged_not_allowed() {
        let recorder = crate::metrics::prometheus_builder().build_recorder();
        let handle = recorder.handle();
        let layer = RateLimitLayer::new(MemoryStore::new())
            .with_policy(Policy::new("wide", Global, Quota::per_minute(100)))
            .with_policy(
                Policy::new("narrow", Global, Quota::per_minute(1)).with_route_class("reads"),
            );
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .layer(layer);
        for _ in 0..3 {
            let fut = app
                .clone()
                .oneshot(Request::get("/").body(Body::empty()).unwrap());
            recorded(&recorder, fut).unwrap();
        }
        let text = handle.render();
        for (series, value) in [
            (r#"{policy="wide",outcome="allowed"}"#, "1"),
            (r#"{policy="wide",outcome="uncharged"}"#, "2"),
            (
                r#"{policy="narrow",route_class="reads",outcome="allowed"}"#,
                "1",
            ),
            (
                r#"{policy="narrow",route_class="reads",outcome="rejected"}"#,
                "2",
            ),
        ] {
            let line = format!("tollgate_ratelimit_decisions_total{series} {value}");
            assert!(text.contains(&line), "no {line} in {text}");
        }
        assert!(!text.contains(r#"="""#), "an empty label value: {text}");
    }

    /// Draft -11: `r` is the quota available and `t` its effective window.
    /// A client that takes the fields at their word is right: after `t`
    /// seconds of an allowed response the whole quota is there again, and
    /// a rejected request is allowed at `Retry-After`, not before.
    #[tokio::test(start_paused = true)]
    async fn the_effective_window_is_what_a_client_sees() {
        let app = app(ip_layer(Quota::per_minute(3)));
        get(&app, &[]).await;
        let (_, headers, _) = get(&app, &[]).await;
        assert_eq!(headers["ratelimit"], r#""ip";r=1;t=40"#);
        tokio::time::advance(Duration::from_secs(40)).await;
        let (_, headers, _) = get(&app, &[]).await;
        // Whole again: this request left q - 1.
        assert_eq!(headers["ratelimit"], r#""ip";r=2;t=20"#);
        get(&app, &[]).await;
        get(&app, &[]).await;
        let (status, headers, _) = get(&app, &[]).await;
        assert_eq!(status, 429);
        let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert_eq!(headers["ratelimit"], format!(r#""ip";r=0;t={retry_after}"#));
        tokio::time::advance(Duration::from_secs(retry_after - 1)).await;
        assert_eq!(get(&app, &[]).await.0, 429, "allowed before Retry-After");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(get(&app, &[]).await.0, 200, "denied at Retry-After");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_never_zero() {
        let app = app(ip_layer(Quota::per_second(100).with_burst(1)));
        assert_eq!(get(&app, &[]).await.0, 200);
        let (status, headers, _) = get(&app, &[]).await;
        assert_eq!(status, 429);
        assert_eq!(headers["retry-after"], "1");
        assert_eq!(headers["ratelimit"], r#""ip";r=0;t=1"#);
    }

    #[tokio::test(start_paused = true)]
    async fn spoofed_forwarded_for_from_untrusted_peer_changes_nothing() {
        // The peer 192.0.2.1 is not in 10.0.0.0/8.
        let app = app(ip_layer(Quota::per_minute(1)));
        assert_eq!(get(&app, &[("x-forwarded-for", "1.1.1.1")]).await.0, 200);
        for fake in ["2.2.2.2", "3.3.3.3", "10.0.0.1"] {
            assert_eq!(get(&app, &[("x-forwarded-for", fake)]).await.0, 429);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn forwarded_for_from_trusted_peer_is_the_client() {
        let layer = ip_layer(Quota::per_minute(1));
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .layer(
                ServiceBuilder::new()
                    .layer(SetClientIpLayer::new("10.0.0.0/8".parse().unwrap()))
                    .layer(layer),
            )
            .layer(MockConnectInfo(SocketAddr::from(([10, 0, 0, 9], 1))));
        assert_eq!(
            get(&app, &[("x-forwarded-for", "198.51.100.1")]).await.0,
            200
        );
        assert_eq!(
            get(&app, &[("x-forwarded-for", "198.51.100.1")]).await.0,
            429
        );
        // Another client behind the same proxy has its own quota.
        assert_eq!(
            get(&app, &[("x-forwarded-for", "198.51.100.2")]).await.0,
            200
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stacked_layers_each_add_their_items() {
        let store = paused_store();
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .layer(
                ServiceBuilder::new()
                    .layer(SetClientIpLayer::new(TrustedProxies::none()))
                    .layer(RateLimitLayer::new(store.clone()).with_policy(Policy::new(
                        "ip",
                        ByClientIp::new(),
                        Quota::per_minute(5),
                    )))
                    .layer(RateLimitLayer::new(store).with_policy(Policy::new(
                        "global",
                        Global,
                        Quota::per_hour(1000),
                    ))),
            )
            .layer(MockConnectInfo(SocketAddr::from(([192, 0, 2, 1], 1))));
        let (_, headers, _) = get(&app, &[]).await;
        let lines: Vec<_> = headers.get_all("ratelimit").iter().collect();
        assert_eq!(lines, [r#""global";r=999;t=4"#, r#""ip";r=4;t=12"#]);
        assert_eq!(headers.get_all("ratelimit-policy").iter().count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn several_policies_are_all_or_nothing() {
        let layer = RateLimitLayer::new(paused_store())
            .with_policy(Policy::new("ip", ByClientIp::new(), Quota::per_minute(10)))
            .with_policy(Policy::new("route", Global, Quota::per_minute(1)));
        let app = app(layer);
        assert_eq!(get(&app, &[]).await.0, 200);
        for _ in 0..3 {
            let (status, headers, body) = get(&app, &[]).await;
            assert_eq!(status, 429);
            // The IP was not charged by the rejected requests.
            assert_eq!(headers["ratelimit"], r#""ip";r=9;t=6, "route";r=0;t=60"#);
            assert!(body.contains(r#""violated-policies":["route"]"#));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn shadow_policies_count_but_never_reject() {
        let layer = RateLimitLayer::new(paused_store())
            .with_policy(Policy::new("ip", ByClientIp::new(), Quota::per_minute(1)).shadow(true));
        let app = app(layer);
        for _ in 0..5 {
            let (status, headers, _) = get(&app, &[]).await;
            assert_eq!(status, 200);
            assert!(headers.get("ratelimit").is_none());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn per_request_quota_and_cost() {
        let layer = RateLimitLayer::new(paused_store()).with_policy(
            Policy::new("plan", Global, Quota::per_minute(1))
                .with_quota_fn(|req| {
                    if req.headers.contains_key("x-premium") {
                        Quota::per_minute(100)
                    } else {
                        Quota::per_minute(10)
                    }
                })
                .with_cost_fn(|req| {
                    if req.uri.query() == Some("export") {
                        5
                    } else {
                        1
                    }
                }),
        );
        let app = app(layer);
        let (_, headers, _) = get(&app, &[]).await;
        assert_eq!(headers["ratelimit"], r#""plan";r=9;t=6"#);
        let (_, headers, _) = get(&app, &[("x-premium", "1")]).await;
        assert_eq!(headers["ratelimit-policy"], r#""plan";q=100;w=60"#);
        let res = app
            .clone()
            .oneshot(Request::get("/?export").body(Body::empty()).unwrap())
            .await
            .unwrap();
        // Each quota has its own bucket: the premium request was counted in
        // its own, so the standard bucket holds 6 s, and the export adds
        // 5 × 6 s.
        assert_eq!(res.headers()["ratelimit"], r#""plan";r=4;t=36"#);
    }

    #[tokio::test]
    async fn extractor_rejection_and_skip() {
        let layer = RateLimitLayer::new(paused_store()).with_policy(Policy::new(
            "tenant",
            |req: &http::request::Parts| match req.headers.get("x-tenant") {
                None => Ok(None),
                Some(v) if v.as_bytes().iter().all(u8::is_ascii_alphanumeric) => {
                    Ok(Some(Key::from(v.to_str().unwrap())))
                }
                Some(_) => Err(KeyRejection::bad_request("tenant must be alphanumeric")),
            },
            Quota::per_minute(1),
        ));
        let app = app(layer);
        // Skipped: no limit, no headers.
        for _ in 0..3 {
            let (status, headers, _) = get(&app, &[]).await;
            assert_eq!(status, 200);
            assert!(headers.get("ratelimit").is_none());
        }
        let (status, headers, body) = get(&app, &[("x-tenant", "a-b")]).await;
        assert_eq!(status, 400);
        assert_eq!(headers["content-type"], "application/problem+json");
        assert!(body.contains("tenant must be alphanumeric"));
        assert_eq!(get(&app, &[("x-tenant", "ab")]).await.0, 200);
        assert_eq!(get(&app, &[("x-tenant", "ab")]).await.0, 429);
    }

    /// A store that always fails, as a dead remote store would.
    #[derive(Clone, Debug)]
    struct Broken;

    impl Store for Broken {
        type Future = std::future::Ready<Result<Decisions, StoreError>>;
        fn check(&self, _: &[Check]) -> Self::Future {
            std::future::ready(Err(StoreError::new(StoreErrorKind::Connection, "refused")))
        }
    }

    #[tokio::test]
    async fn store_failure_follows_the_failure_policy() {
        let policy = Policy::new("ip", ByClientIp::new(), Quota::per_minute(1));
        let open = app(RateLimitLayer::new(Broken).with_policy(policy.clone()));
        for _ in 0..3 {
            assert_eq!(get(&open, &[]).await.0, 200);
        }
        let closed = app(RateLimitLayer::new(Broken)
            .with_policy(policy)
            .with_failure_policy(FailurePolicy::Closed));
        let (status, headers, _) = get(&closed, &[]).await;
        assert_eq!(status, 503);
        assert_eq!(headers["content-type"], "application/problem+json");
    }

    #[tokio::test]
    async fn local_failure_policy_decides_with_a_local_store() {
        let policy = Policy::new("ip", ByClientIp::new(), Quota::per_minute(4));
        let local = app(RateLimitLayer::new(Broken)
            .with_policy(policy.clone())
            .with_failure_policy(FailurePolicy::Local));
        let statuses: Vec<u16> = futures_statuses(&local, 6).await;
        assert_eq!(statuses, [200, 200, 200, 200, 429, 429]);
        let (_, headers, _) = get(&local, &[]).await;
        assert_eq!(headers["ratelimit-policy"], r#""ip";q=4;w=60"#);

        // Two layers (say reads and writes) on one fallback count a policy
        // of one name once, as the shared store would.
        let fallback = crate::rate_limit::LocalFallback::new(1);
        let layer = || {
            RateLimitLayer::new(Broken)
                .with_policy(policy.clone())
                .with_failure_policy(FailurePolicy::Local)
                .with_local_fallback(fallback.clone())
        };
        let (reads, writes) = (app(layer()), app(layer()));
        assert_eq!(futures_statuses(&reads, 3).await, [200, 200, 200]);
        assert_eq!(futures_statuses(&writes, 2).await, [200, 429]);

        // Divided among two replicas: half the quota each.
        let halved = app(RateLimitLayer::new(Broken)
            .with_policy(policy)
            .with_failure_policy(FailurePolicy::Local)
            .with_fallback_replicas(2));
        assert_eq!(futures_statuses(&halved, 3).await, [200, 200, 429]);
        // The header shows the quota that decided, not the configured one.
        let (_, headers, _) = get(&halved, &[]).await;
        assert_eq!(headers["ratelimit-policy"], r#""ip";q=2;w=60"#);
    }

    #[tokio::test]
    async fn a_policy_may_override_the_failure_policy() {
        let layer = RateLimitLayer::new(Broken)
            .with_failure_policy(FailurePolicy::Open)
            .with_policy(Policy::new("route", Global, Quota::per_minute(1)))
            .with_policy(
                Policy::new("login", ByClientIp::new(), Quota::per_minute(1))
                    .with_failure_policy(FailurePolicy::Closed),
            );
        assert_eq!(futures_statuses(&app(layer), 2).await, [503, 503]);
    }

    async fn futures_statuses(app: &axum::Router, n: usize) -> Vec<u16> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(get(app, &[]).await.0.as_u16());
        }
        out
    }

    type Mock = tower_test::mock::Mock<Request<Body>, Response<Body>>;

    fn poll_ready(
        svc: &mut RateLimit<Mock, MemoryStore<TokioClock>>,
    ) -> Poll<Result<(), tower::BoxError>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        Service::<Request<Body>>::poll_ready(svc, &mut cx)
    }

    #[tokio::test]
    async fn poll_ready_only_forwards() {
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let mut svc = ip_layer(Quota::per_minute(1)).layer(mock);
        handle.allow(0);
        assert!(poll_ready(&mut svc).is_pending());
        handle.allow(1);
        assert!(poll_ready(&mut svc).is_ready());
    }

    #[test]
    fn rejections_keep_the_error_infallible_as_axum_needs() {
        fn assert_infallible<S: Service<Request<Body>, Error = Infallible>>(_: S) {}
        assert_infallible(ip_layer(Quota::per_minute(1)).layer(axum::Router::new()));
    }

    use tower_layer::Layer as _;
}
