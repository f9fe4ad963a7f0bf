//! [`RateLimitLayer`].

use std::sync::Arc;

use tower_layer::Layer;

use super::headers::{RejectHook, Rejection};
use super::policy::{FailurePolicy, Policy};
use super::service::{Fallback, LocalFallback, MetricLabel, RateLimit, Shared};

/// Applies [`RateLimit`] to a service: a store, the policies decided
/// together, and a [`FailurePolicy`].
///
/// See the [module docs](crate::rate_limit) for an example.
#[derive(Clone)]
pub struct RateLimitLayer<St> {
    store: St,
    policies: Vec<Policy>,
    failure: FailurePolicy,
    /// Shared by every service this layer makes (axum's `route_layer`
    /// makes one per route), so the local fallback counts them together.
    fallback: Arc<Fallback>,
    label: Option<Arc<MetricLabel>>,
    on_reject: Option<Arc<RejectHook>>,
}

impl<St: std::fmt::Debug> std::fmt::Debug for RateLimitLayer<St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("store", &self.store)
            .field("policies", &self.policies)
            .field("failure", &self.failure)
            .field("label", &self.label)
            .field("custom_rejection", &self.on_reject.is_some())
            .finish_non_exhaustive()
    }
}

impl<St> RateLimitLayer<St> {
    /// A layer deciding against `store`, with no policy yet and
    /// [`FailurePolicy::Open`].
    pub fn new(store: St) -> Self {
        Self {
            store,
            policies: Vec::new(),
            failure: FailurePolicy::default(),
            fallback: Arc::new(Fallback::new(1)),
            label: None,
            on_reject: None,
        }
    }

    /// Answers refused requests with `hook`'s response instead of the
    /// `quota-exceeded` problem (a legacy error format, a page for
    /// browsers). The layer still sets `Retry-After` and the `RateLimit`
    /// fields on it; the hook sees the wait, the violated policies and the
    /// default problem.
    ///
    /// ```
    /// use tollgate::rate_limit::{Global, MemoryStore, Policy, Quota, RateLimitLayer};
    /// use tower::ServiceExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let layer = RateLimitLayer::new(MemoryStore::new())
    ///     .with_policy(Policy::new("route", Global, Quota::per_minute(1)))
    ///     .with_rejection(|rejection| {
    ///         let body = format!(r#"{{"error":"slow down","retry_in":{}}}"#, rejection.retry_after());
    ///         http::Response::builder()
    ///             .status(429)
    ///             .header("content-type", "application/json")
    ///             .body(bytes::Bytes::from(body))
    ///             .unwrap()
    ///     });
    /// let app = axum::Router::new()
    ///     .route("/", axum::routing::get(|| async { "ok" }))
    ///     .layer(layer);
    /// let get = || http::Request::get("/").body(axum::body::Body::empty()).unwrap();
    /// app.clone().oneshot(get()).await.unwrap();
    /// let res = app.oneshot(get()).await.unwrap();
    /// assert_eq!(res.status(), 429);
    /// assert_eq!(res.headers()["retry-after"], "60");
    /// assert_eq!(res.headers()["ratelimit"], r#""route";r=0;t=60"#);
    /// let body = axum::body::to_bytes(res.into_body(), 1024).await.unwrap();
    /// assert_eq!(&body[..], br#"{"error":"slow down","retry_in":60}"#);
    /// # }
    /// ```
    #[must_use]
    pub fn with_rejection(
        mut self,
        hook: impl Fn(&Rejection) -> http::Response<bytes::Bytes> + Send + Sync + 'static,
    ) -> Self {
        self.on_reject = Some(Arc::new(RejectHook(Box::new(hook))));
        self
    }

    /// Labels this layer's decision metrics
    /// ([`RATELIMIT_DECISIONS`](crate::metrics::RATELIMIT_DECISIONS),
    /// [`RATELIMIT_NEAR_LIMIT`](crate::metrics::RATELIMIT_NEAR_LIMIT)) with
    /// `name`, whose value for a request is `values[f(request)]` (`none`
    /// when `f` says `None` or names no value). The values are fixed here,
    /// so a label can never grow the series without bound: label by a
    /// tenant's *plan*, never by the tenant.
    ///
    /// ```
    /// use std::sync::Arc;
    ///
    /// use tollgate::rate_limit::{Global, MemoryStore, Policy, Quota, RateLimitLayer};
    ///
    /// /// What an authentication layer put in the request.
    /// #[derive(Clone)]
    /// struct Plan(usize);
    ///
    /// let layer = RateLimitLayer::new(MemoryStore::new())
    ///     .with_policy(Policy::new("tenant", Global, Quota::per_minute(100)))
    ///     .with_metric_label("plan", ["free", "pro"], |req| {
    ///         req.extensions.get::<Plan>().map(|plan| plan.0)
    ///     });
    /// # let _ = layer;
    /// ```
    #[must_use]
    pub fn with_metric_label<V: Into<Arc<str>>>(
        mut self,
        name: &'static str,
        values: impl IntoIterator<Item = V>,
        f: impl Fn(&http::request::Parts) -> Option<usize> + Send + Sync + 'static,
    ) -> Self {
        self.label = Some(Arc::new(MetricLabel {
            name,
            values: values.into_iter().map(Into::into).collect(),
            value_of: Box::new(f),
        }));
        self
    }

    /// Adds a policy, decided together with the others of this layer.
    #[must_use]
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policies.push(policy);
        self
    }

    /// Sets what to do when the store fails (each policy may override it).
    #[must_use]
    pub fn with_failure_policy(mut self, failure: FailurePolicy) -> Self {
        self.failure = failure;
        self
    }

    /// For [`FailurePolicy::Local`]: divide quotas by `replicas` while
    /// deciding locally, so a fleet of that many replicas, each counting
    /// alone, still lets about the quota through. 1 (the default) keeps
    /// quotas whole: each replica then allows the full quota.
    ///
    /// This gives the layer a fallback of its own; layers on one store
    /// should share one instead ([`with_local_fallback`](Self::with_local_fallback)).
    #[must_use]
    pub fn with_fallback_replicas(mut self, replicas: u32) -> Self {
        self.fallback = Arc::new(Fallback::new(replicas));
        self
    }

    /// Decides in `fallback` under [`FailurePolicy::Local`]: give every
    /// layer on one store the same one, so each key is counted once while
    /// the store fails.
    #[must_use]
    pub fn with_local_fallback(mut self, fallback: LocalFallback) -> Self {
        self.fallback = fallback.0;
        self
    }
}

impl<S, St: Clone> Layer<S> for RateLimitLayer<St> {
    type Service = RateLimit<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(
            inner,
            Arc::new(Shared::new(
                self.store.clone(),
                self.policies.clone(),
                self.failure,
                self.fallback.clone(),
                self.label.clone(),
                self.on_reject.clone(),
            )),
        )
    }
}
