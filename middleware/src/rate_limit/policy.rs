//! Named policies and what to do when the store fails.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use http::request::Parts;

use super::key::{Key, KeyExtractor};
use super::quota::Quota;

/// A policy's name, interned: copying it and comparing it cost nothing, and
/// equal names are the same `PolicyName`, so policies of the same name share
/// buckets in a store.
///
/// Names are configuration (a handful per process), so interned names live
/// for the rest of the process.
///
/// ```
/// use tollgate::rate_limit::PolicyName;
///
/// assert_eq!(PolicyName::new("ip"), PolicyName::new("ip"));
/// assert_eq!(PolicyName::new("ip").as_str(), "ip");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PolicyName(&'static Interned);

#[derive(PartialEq, Eq, Hash)]
struct Interned {
    /// Unique per name in this process: hashing a name is hashing a number.
    id: u32,
    name: Box<str>,
}

impl PolicyName {
    /// The interned `name`.
    pub fn new(name: &str) -> Self {
        static NAMES: std::sync::Mutex<Vec<&'static Interned>> = std::sync::Mutex::new(Vec::new());
        let mut names = NAMES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(found) = names.iter().find(|i| &*i.name == name) {
            return Self(found);
        }
        let id = u32::try_from(names.len()).expect("fewer than 2^32 policy names");
        let interned: &'static Interned = Box::leak(Box::new(Interned {
            id,
            name: name.into(),
        }));
        names.push(interned);
        Self(interned)
    }

    /// The name.
    pub fn as_str(&self) -> &'static str {
        &self.0.name
    }

    /// A number unique to this name within the process.
    pub fn id(&self) -> u32 {
        self.0.id
    }
}

impl From<&str> for PolicyName {
    fn from(name: &str) -> Self {
        Self::new(name)
    }
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

type QuotaFn = dyn Fn(&Parts) -> Quota + Send + Sync;
type CostFn = dyn Fn(&Parts) -> u32 + Send + Sync;

/// One named limit: what to count (a [`KeyExtractor`]), how much is allowed
/// (a [`Quota`], fixed or chosen per request) and what a request costs.
///
/// The name appears in the `RateLimit-Policy` and `RateLimit` header items
/// and in the problem body's `violated-policies`; it also namespaces the
/// policy's keys in the store, so two policies with the same name share
/// buckets.
///
/// ```
/// use tollgate::rate_limit::{ByClientIp, Policy, Quota};
///
/// let login = Policy::new("login", ByClientIp::new(), "5/min".parse().unwrap())
///     .with_route_class("auth");
/// assert_eq!(login.name().as_str(), "login");
/// ```
#[derive(Clone)]
pub struct Policy {
    pub(crate) name: PolicyName,
    /// `name` as a structured-field string (quoted, escaped), computed once.
    pub(crate) sf_name: Arc<str>,
    pub(crate) route_class: Option<Arc<str>>,
    pub(crate) extractor: Arc<dyn KeyExtractor>,
    quota: Quota,
    quota_fn: Option<Arc<QuotaFn>>,
    cost_fn: Option<Arc<CostFn>>,
    pub(crate) shadow: bool,
    pub(crate) failure: Option<FailurePolicy>,
}

impl Policy {
    /// A policy counting `extractor`'s keys against `quota`.
    ///
    /// # Panics
    ///
    /// If `name` is empty or has characters outside printable ASCII (it goes
    /// into HTTP header fields).
    pub fn new(name: &str, extractor: impl KeyExtractor, quota: Quota) -> Self {
        assert!(
            !name.is_empty() && name.bytes().all(|b| (0x20..0x7f).contains(&b)),
            "a policy name is non-empty printable ASCII, got {name:?}"
        );
        let sf_name = super::headers::syntax::sf_string(name);
        Self {
            name: PolicyName::new(name),
            sf_name: sf_name.into(),
            route_class: None,
            extractor: Arc::new(extractor),
            quota,
            quota_fn: None,
            cost_fn: None,
            shadow: false,
            failure: None,
        }
    }

    /// A policy whose quota is chosen per request by `quota_of` (a tenant's
    /// plan, a trust level), with no fixed quota to give: the same as
    /// [`new`](Self::new) followed by [`with_quota_fn`](Self::with_quota_fn).
    /// Every quota then counts in a bucket of its own (see below).
    ///
    /// ```
    /// use tollgate::rate_limit::{Global, Policy, Quota};
    ///
    /// let plan = Policy::per_request("tenant", Global, |req: &http::request::Parts| {
    ///     if req.headers.contains_key("x-pro") { Quota::per_minute(500) } else { Quota::per_minute(50) }
    /// });
    /// # let _ = plan;
    /// ```
    pub fn per_request(
        name: &str,
        extractor: impl KeyExtractor,
        quota_of: impl Fn(&Parts) -> Quota + Send + Sync + 'static,
    ) -> Self {
        // Never applied: every request's quota comes from `quota_of`.
        let unused = Quota::new(u32::MAX, std::time::Duration::from_nanos(1));
        Self::new(name, extractor, unused).with_quota_fn(quota_of)
    }

    /// Chooses the quota per request (a trust level, a route class, a plan).
    /// The quota given to [`new`](Self::new) is then only a fallback for
    /// documentation.
    ///
    /// # When a key's quota changes
    ///
    /// A key has one bucket per quota: requests under another quota (a plan
    /// upgrade, an override, a trust level) are counted in a fresh bucket,
    /// and the old one drains and is dropped like any idle key. The same in
    /// every store, leases included, because it is the bucket's identity,
    /// not arithmetic on its state:
    /// - **an upgrade is usable at once**: a key that exhausted a burst of 5
    ///   and moves to a burst of 50 can make 50 requests right away;
    /// - **a downgrade never lets the key exceed the new quota from the
    ///   change on**: the new bucket admits its burst plus its rate, and
    ///   nothing of the old one is spent under it; moving back resumes the
    ///   old bucket as it stands (its charges only ever restrict);
    /// - **a lease** (Redis store) is granted for one bucket, so one granted
    ///   under the old quota serves no request under the new one and ends
    ///   within its duration.
    ///
    /// The price is at the change itself: what was spent under the old
    /// quota is not charged to the new one, so across the change a key may
    /// get up to one burst of each.
    #[must_use]
    pub fn with_quota_fn(mut self, f: impl Fn(&Parts) -> Quota + Send + Sync + 'static) -> Self {
        self.quota_fn = Some(Arc::new(f));
        self
    }

    /// Charges requests `f(req)` units instead of 1 (an expensive export may
    /// cost 10). A cost of 0 is never rejected.
    #[must_use]
    pub fn with_cost_fn(mut self, f: impl Fn(&Parts) -> u32 + Send + Sync + 'static) -> Self {
        self.cost_fn = Some(Arc::new(f));
        self
    }

    /// Labels the policy's decisions with a route class.
    #[must_use]
    pub fn with_route_class(mut self, class: impl Into<Arc<str>>) -> Self {
        self.route_class = Some(class.into());
        self
    }

    /// Shadow mode: decide and count, never reject. Use it to tune a new
    /// limit on live traffic. Shadow policies add no response headers.
    #[must_use]
    pub fn shadow(mut self, shadow: bool) -> Self {
        self.shadow = shadow;
        self
    }

    /// Overrides the layer's [`FailurePolicy`] for this policy: a login
    /// route may fail closed while reads fail open.
    #[must_use]
    pub fn with_failure_policy(mut self, failure: FailurePolicy) -> Self {
        self.failure = Some(failure);
        self
    }

    /// The policy's name.
    pub fn name(&self) -> PolicyName {
        self.name
    }

    /// Whether the policy is in shadow mode.
    pub fn is_shadow(&self) -> bool {
        self.shadow
    }

    /// The quota when it is the same for every request.
    pub(crate) fn fixed_quota(&self) -> Option<Quota> {
        self.quota_fn.is_none().then_some(self.quota)
    }

    /// The bucket `key` is counted in under `quota`: its own under the
    /// policy's quota, another under any other (see
    /// [`with_quota_fn`](Self::with_quota_fn)).
    pub(crate) fn bucket(&self, key: Key, quota: Quota) -> Key {
        if quota == self.quota {
            key
        } else {
            key.under_quota(quota)
        }
    }

    pub(crate) fn quota_for(&self, req: &Parts) -> Quota {
        self.quota_fn.as_ref().map_or(self.quota, |f| f(req))
    }

    pub(crate) fn cost_for(&self, req: &Parts) -> u32 {
        self.cost_fn.as_ref().map_or(1, |f| f(req))
    }
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("name", &self.name)
            .field("route_class", &self.route_class)
            .field("quota", &self.quota)
            .field("per_request_quota", &self.quota_fn.is_some())
            .field("per_request_cost", &self.cost_fn.is_some())
            .field("shadow", &self.shadow)
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

/// What the limiter does when its store fails or times out. Whatever the
/// choice, the request path never answers 500 because of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Let the request through, unlimited (availability first).
    #[default]
    Open,
    /// Answer `503 Service Unavailable` with a problem body (protection
    /// first, e.g. for a login route).
    Closed,
    /// Decide with a local in-memory store instead (insurance): limits
    /// still hold per replica, optionally with quotas divided by the
    /// expected replica count (see
    /// [`RateLimitLayer::with_fallback_replicas`](super::RateLimitLayer::with_fallback_replicas)).
    /// Without the `memory` feature this acts as `Open`.
    Local,
}

impl FromStr for FailurePolicy {
    type Err = ParseFailurePolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "open" => Ok(Self::Open),
            "closed" => Ok(Self::Closed),
            "local" => Ok(Self::Local),
            _ => Err(ParseFailurePolicyError(s.to_owned())),
        }
    }
}

/// A failure policy string was not `open` or `closed`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid failure policy `{0}` (expected open, closed or local)")]
pub struct ParseFailurePolicyError(String);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limit::Global;

    #[test]
    fn names_are_quoted_for_structured_fields() {
        let p = Policy::new(r#"a"b\c"#, Global, Quota::per_second(1));
        assert_eq!(&*p.sf_name, r#""a\"b\\c""#);
    }

    #[test]
    #[should_panic(expected = "printable ASCII")]
    fn refuses_control_characters() {
        let _ = Policy::new("a\nb", Global, Quota::per_second(1));
    }
}
