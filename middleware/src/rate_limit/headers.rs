//! The response side of a decision: the `RateLimit-Policy` and `RateLimit`
//! fields of draft-ietf-httpapi-ratelimit-headers-10, `Retry-After`, and
//! the `quota-exceeded` problem.

use std::fmt::Write as _;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header::RETRY_AFTER};

use super::policy::Policy;
use super::quota::Quota;
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

/// One `RateLimit-Policy` item: `"name";q=<burst>;w=<window s>`.
fn write_policy_item(line: &mut String, sf_name: &str, quota: Quota) {
    let _ = write!(
        line,
        "{sf_name};q={};w={}",
        quota.burst(),
        ceil_secs(quota.window()).max(1)
    );
}

/// The `RateLimit-Policy` value of a layer whose only policy has a fixed
/// quota: the same for every response, so it is made once.
pub(crate) fn single_policy_field(policies: &[Policy]) -> Option<HeaderValue> {
    let [policy] = policies else { return None };
    let mut line = String::new();
    write_policy_item(&mut line, &policy.sf_name, policy.fixed_quota()?);
    HeaderValue::try_from(line).ok()
}

/// The two header lines for one layer's enforced policies, or `None` when
/// every policy was skipped or in shadow mode. `single` is
/// [`single_policy_field`] of `policies`.
pub(crate) fn fields(
    policies: &[Policy],
    single: Option<&HeaderValue>,
    index: &[usize],
    checks: &[Check],
    decisions: &Decisions,
) -> Option<(HeaderValue, HeaderValue)> {
    // A quota divided for the local fallback is not the fixed one.
    let single = single.filter(|_| match (index, checks) {
        ([i], [check]) => policies[*i].fixed_quota() == Some(check.quota),
        _ => false,
    });
    let mut policy_line = String::new();
    let mut limit_line = String::new();
    for ((&i, check), decision) in index.iter().zip(checks).zip(&decisions.each) {
        if !check.enforce {
            continue;
        }
        let name = &policies[i].sf_name;
        let sep = if limit_line.is_empty() { "" } else { ", " };
        if single.is_none() {
            policy_line.push_str(sep);
            write_policy_item(&mut policy_line, name, check.quota);
        }
        // For a violated policy, `t` is the wait until the request would be
        // allowed, so `Retry-After` is never earlier than a `t` we report.
        let t = if decision.allowed {
            ceil_secs(decision.reset_after)
        } else {
            ceil_secs(decision.retry_after).max(1)
        };
        let _ = write!(limit_line, "{sep}{name};r={};t={t}", decision.remaining);
    }
    if limit_line.is_empty() {
        return None;
    }
    // Names are printable ASCII (checked by `Policy::new`), the rest digits.
    let policy_field = match single {
        Some(field) => field.clone(),
        None => HeaderValue::try_from(policy_line).ok()?,
    };
    Some((policy_field, HeaderValue::try_from(limit_line).ok()?))
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
    single: Option<&HeaderValue>,
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
    if let Some(fields) = fields(policies, single, index, checks, decisions) {
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
