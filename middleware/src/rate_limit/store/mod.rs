//! Where GCRA state lives: the [`Store`] trait and its implementations.
//!
//! A store decides a *batch* of checks — one per policy of a request —
//! all-or-nothing: when any enforced check is denied, none is charged. That
//! lets a remote store (Redis) decide all of a request's policies in one
//! round trip, and keeps a rejected request from eating a quota it did not
//! use.

mod either;
#[cfg(feature = "memory")]
mod memory;
#[cfg(feature = "memory")]
mod overflow;
#[cfg(feature = "redis")]
mod redis;

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::{
    DEFAULT_REDIS_TIMEOUT, LeaseConfig, OVER_LIMIT_CACHE_CAPACITY, RedisConfig, RedisFuture,
    RedisStats, RedisStore, RedisStoreBuilder, RedisTarget, Sharding,
};

pub use either::{EitherFuture, EitherStore};

#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub use memory::{DEFAULT_OVERFLOW_WIDTH, DEFAULT_PURGE_INTERVAL, MemoryStore};

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use smallvec::SmallVec;

use super::key::Key;
use super::policy::PolicyName;
use super::quota::Quota;

/// One policy's part of a request.
#[derive(Debug, Clone)]
pub struct Check {
    /// The policy's name: it namespaces the key, so policies of the same
    /// name share buckets.
    pub policy: PolicyName,
    /// The key within the policy.
    pub key: Key,
    /// The quota to apply.
    pub quota: Quota,
    /// Units this request costs.
    pub cost: u32,
    /// `false` for shadow policies: decided and charged when they allow,
    /// but a denial does not deny the batch.
    pub enforce: bool,
}

/// One check's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether this check alone allows the request.
    pub allowed: bool,
    /// Cost-1 requests left after this one (when the batch was charged) or
    /// now (when it was not).
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset_after: Duration,
    /// Until this check would allow the request; zero when it allows.
    pub retry_after: Duration,
}

/// A batch's result: one [`Decision`] per [`Check`], in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decisions {
    /// Whether every enforced check allowed, so the batch was charged.
    pub allowed: bool,
    /// Per check, in the order given.
    pub each: SmallVec<[Decision; 2]>,
}

/// A store decides batches of checks.
///
/// The associated future lets the in-memory store answer with a ready
/// future and no allocation, and a remote store with its own state machine.
pub trait Store: Send + Sync + 'static {
    /// The future of [`check`](Store::check).
    type Future: Future<Output = Result<Decisions, StoreError>> + Send + 'static;

    /// Decides `checks` all-or-nothing.
    fn check(&self, checks: &[Check]) -> Self::Future;

    /// Decides `checks` as [`check`](Store::check) does, when the store can
    /// answer without waiting (an in-process store); `None` otherwise, and
    /// then the caller awaits [`check`](Store::check). The layer tries this
    /// first, so a store that answers at once costs no future per request.
    fn check_now(&self, checks: &[Check]) -> Option<Result<Decisions, StoreError>> {
        let _ = checks;
        None
    }

    /// Whether the store is in use: `false` while it is known to be down
    /// (a remote store's circuit breaker is open) and checks go to the
    /// failure policy. The one source of a store's health: readiness
    /// checks and dashboards read this rather than tracking it again.
    fn is_available(&self) -> bool {
        true
    }
}

impl<S: Store + ?Sized> Store for Arc<S> {
    type Future = S::Future;

    fn check(&self, checks: &[Check]) -> Self::Future {
        (**self).check(checks)
    }

    fn check_now(&self, checks: &[Check]) -> Option<Result<Decisions, StoreError>> {
        (**self).check_now(checks)
    }

    fn is_available(&self) -> bool {
        (**self).is_available()
    }
}

/// The kind of a [`StoreError`], for metrics and failure handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The store did not answer in time.
    Timeout,
    /// The store could not be reached.
    Connection,
    /// The store answered with an error.
    Response,
    /// A key was not where the store's map of a Redis Cluster said
    /// (`MOVED`, `ASK`, a script touching a key another node owns): a slot
    /// is being moved. The store re-reads the map and tries once more
    /// before it reports this.
    Moved,
}

impl StoreErrorKind {
    /// A short, stable label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Connection => "connection",
            Self::Response => "response",
            Self::Moved => "moved",
        }
    }
}

/// A store failed to decide. Handed to the layer's
/// [`FailurePolicy`](super::FailurePolicy), never to the client.
#[derive(Debug)]
pub struct StoreError {
    kind: StoreErrorKind,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl StoreError {
    /// An error of `kind` caused by `source`.
    pub fn new(
        kind: StoreErrorKind,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            kind,
            source: source.into(),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// The same error again, for each request a failed call was deciding.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn again(&self) -> Self {
        Self::new(self.kind, self.source.to_string())
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rate-limit store {}: {}",
            self.kind.as_str(),
            self.source
        )
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}
