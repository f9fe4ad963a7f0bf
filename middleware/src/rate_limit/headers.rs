//! The response side of a decision: the `RateLimit-Policy` and `RateLimit`
//! fields of draft-ietf-httpapi-ratelimit-headers-10, `Retry-After`, and
//! the `quota-exceeded` problem.

use std::fmt::Write as _;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header::RETRY_AFTER};

use super::policy::Policy;
use super::store::{Check, Decisions};
use crate::problem::Problem;

/// The problem type of a rejection, from the IETF draft's registration.
pub const QUOTA_EXCEEDED: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";

/// `RateLimit-Policy`: the quotas.
pub(crate) static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`: what is left of them.
pub(crate) static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Whole seconds, rounded up.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The two header lines for one layer's enforced policies, or `None` when
/// every policy was skipped or in shadow mode.
pub(crate) fn fields(
    policies: &[Policy],
    index: &[usize],
    checks: &[Check],
    decisions: &Decisions,
) -> Option<(HeaderValue, HeaderValue)> {
    let mut policy_line = String::new();
    let mut limit_line = String::new();
    for ((&i, check), decision) in index.iter().zip(checks).zip(&decisions.each) {
        if !check.enforce {
            continue;
        }
        let name = &policies[i].sf_name;
        let sep = if policy_line.is_empty() { "" } else { ", " };
        let quota = check.quota;
        let _ = write!(
            policy_line,
            "{sep}{name};q={};w={}",
            quota.burst(),
            ceil_secs(quota.window()).max(1)
        );
        // For a violated policy, `t` is the wait until the request would be
        // allowed, so `Retry-After` is never earlier than a `t` we report.
        let t = if decision.allowed {
            ceil_secs(decision.reset_after)
        } else {
            ceil_secs(decision.retry_after).max(1)
        };
        let _ = write!(limit_line, "{sep}{name};r={};t={t}", decision.remaining);
    }
    if policy_line.is_empty() {
        return None;
    }
    // Names are printable ASCII (checked by `Policy::new`), the rest digits.
    Some((
        HeaderValue::try_from(policy_line).ok()?,
        HeaderValue::try_from(limit_line).ok()?,
    ))
}

/// Adds the fields to `headers`, as new lines so stacked layers each add
/// their own items.
pub(crate) fn append(headers: &mut HeaderMap, (policy, limit): (HeaderValue, HeaderValue)) {
    headers.append(RATELIMIT_POLICY.clone(), policy);
    headers.append(RATELIMIT.clone(), limit);
}

/// The 429 for a denied batch.
pub(crate) fn rejection(
    policies: &[Policy],
    index: &[usize],
    checks: &[Check],
    decisions: &Decisions,
) -> http::Response<bytes::Bytes> {
    let mut violated = Vec::new();
    let mut retry_after = 1;
    for ((&i, check), decision) in index.iter().zip(checks).zip(&decisions.each) {
        if check.enforce && !decision.allowed {
            violated.push(serde_json::Value::from(policies[i].name().as_str()));
            retry_after = retry_after.max(ceil_secs(decision.retry_after));
        }
    }
    let mut res = Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "Request cannot be satisfied as assigned quota has been exceeded",
    )
    .with_type(QUOTA_EXCEEDED)
    .with_detail(format!("retry in {retry_after} s"))
    .with_extension("violated-policies", violated)
    .into_response();
    let headers = res.headers_mut();
    headers.insert(RETRY_AFTER, HeaderValue::from(retry_after));
    if let Some(fields) = fields(policies, index, checks, decisions) {
        append(headers, fields);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_up() {
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(ceil_secs(Duration::from_nanos(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(2)), 2);
        assert_eq!(ceil_secs(Duration::from_millis(2001)), 3);
    }
}
