//! [`RateLimitLayer`].

use std::sync::Arc;

use tower_layer::Layer;

use super::policy::{FailurePolicy, Policy};
use super::service::{Fallback, LocalFallback, MetricLabel, RateLimit, Shared};

/// Applies [`RateLimit`] to a service: a store, the policies decided
/// together, and a [`FailurePolicy`].
///
/// See the [module docs](crate::rate_limit) for an example.
#[derive(Debug, Clone)]
pub struct RateLimitLayer<St> {
    store: St,
    policies: Vec<Policy>,
    failure: FailurePolicy,
    /// Shared by every service this layer makes (axum's `route_layer`
    /// makes one per route), so the local fallback counts them together.
    fallback: Arc<Fallback>,
    label: Option<Arc<MetricLabel>>,
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
        }
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
            )),
        )
    }
}
