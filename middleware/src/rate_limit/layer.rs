//! [`RateLimitLayer`].

use std::sync::Arc;

use tower_layer::Layer;

use super::policy::{FailurePolicy, Policy};
use super::service::{RateLimit, Shared};

/// Applies [`RateLimit`] to a service: a store, the policies decided
/// together, and a [`FailurePolicy`].
///
/// See the [module docs](crate::rate_limit) for an example.
#[derive(Debug, Clone)]
pub struct RateLimitLayer<St> {
    store: St,
    policies: Vec<Policy>,
    failure: FailurePolicy,
}

impl<St> RateLimitLayer<St> {
    /// A layer deciding against `store`, with no policy yet and
    /// [`FailurePolicy::Open`].
    pub fn new(store: St) -> Self {
        Self {
            store,
            policies: Vec::new(),
            failure: FailurePolicy::default(),
        }
    }

    /// Adds a policy, decided together with the others of this layer.
    #[must_use]
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policies.push(policy);
        self
    }

    /// Sets what to do when the store fails.
    #[must_use]
    pub fn with_failure_policy(mut self, failure: FailurePolicy) -> Self {
        self.failure = failure;
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
            )),
        )
    }
}
