//! The response side of a decision: the `RateLimit-Policy` and `RateLimit`
//! fields of draft-ietf-httpapi-ratelimit-headers-11, `Retry-After`, and
//! the `quota-exceeded` problem.
//!
//! The draft's parameter names are written in [`syntax`] and nowhere else,
//! so following a later draft (an open proposal renames `r`/`t` to `a`/`w`)
//! changes that module and the tests that spell the fields out.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header::RETRY_AFTER};

use super::policy::{Policy, PolicyName};
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

/// How items of the two fields are written (draft -11, section 3 and 4).
pub(crate) mod syntax {
    /// Appends `n` in decimal, without `fmt` (this runs on every response).
    fn number(line: &mut String, n: u64) {
        line.push_str(itoa::Buffer::new().format(n));
    }

    /// `RateLimit-Policy` item of a quota: `"name";q=<quota>;w=<window s>`.
    pub(crate) fn policy_item(line: &mut String, sf_name: &str, quota: u64, window: u64) {
        line.push_str(sf_name);
        line.push_str(";q=");
        number(line, quota);
        line.push_str(";w=");
        number(line, window);
    }

    /// `RateLimit-Policy` item of a quota counted in requests in flight,
    /// which has no window: `"name";q=<max>;qu="concurrent-requests"`.
    pub(crate) fn concurrency_policy_item(line: &mut String, sf_name: &str, max: u64) {
        line.push_str(sf_name);
        line.push_str(";q=");
        number(line, max);
        line.push_str(r#";qu="concurrent-requests""#);
    }

    /// `RateLimit` item: `"name";r=<available>;t=<effective window s>`,
    /// or without `t` when the service cannot say one.
    pub(crate) fn limit_item(
        line: &mut String,
        sf_name: &str,
        available: u64,
        window: Option<u64>,
    ) {
        line.push_str(sf_name);
        line.push_str(";r=");
        number(line, available);
        if let Some(t) = window {
            line.push_str(";t=");
            number(line, t);
        }
    }

    /// [`limit_item`] alone on its line, allocated at its exact length:
    /// `Bytes` takes such a `String` as it is, where spare capacity costs
    /// it a second allocation. The line of most responses.
    pub(crate) fn limit_line(sf_name: &str, available: u64, window: u64) -> String {
        let (mut r, mut t) = (itoa::Buffer::new(), itoa::Buffer::new());
        let (r, t) = (r.format(available), t.format(window));
        let mut line = String::with_capacity(sf_name.len() + 6 + r.len() + t.len());
        for part in [sf_name, ";r=", r, ";t=", t] {
            line.push_str(part);
        }
        line
    }

    /// A name as a structured-field string (`"a\"b"`).
    pub(crate) fn sf_string(name: &str) -> String {
        format!("\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// One `RateLimit-Policy` item of a GCRA quota: `q` is the burst, `w` the
/// seconds an exhausted client needs to earn it all back.
fn write_policy_item(line: &mut String, sf_name: &str, quota: Quota) {
    syntax::policy_item(
        line,
        sf_name,
        quota.burst().into(),
        ceil_secs(quota.window()).max(1),
    );
}

/// The `t` of one policy's `RateLimit` item: the effective window of the
/// `r` units it reports (draft -11). With GCRA there is no fixed window;
/// the one that applies is
/// - when the request was allowed: until the bucket is whole again — `r`
///   units can be spent now, and `t` seconds from now the full quota is
///   available again;
/// - when the policy denied it: until the request would be allowed (`r` is
///   0 until then), at least 1 s; `Retry-After` is the largest of these, so
///   it is never earlier than the end of a violated policy's window.
fn effective_window(decision: &super::store::Decision) -> u64 {
    if decision.allowed {
        ceil_secs(decision.reset_after)
    } else {
        ceil_secs(decision.retry_after).max(1)
    }
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
    if let (Some(field), [i], [check], [decision]) = (single, index, checks, &decisions.each[..]) {
        let line = check.enforce.then(|| {
            let window = effective_window(decision);
            syntax::limit_line(&policies[*i].sf_name, decision.remaining, window)
        })?;
        return Some((field.clone(), HeaderValue::try_from(line).ok()?));
    }
    // One allocation each: an item is a name and two short numbers (the
    // policy line is made only when it is not the layer's fixed one).
    let mut policy_line = String::with_capacity(if single.is_none() {
        40 * index.len()
    } else {
        0
    });
    let mut limit_line = String::with_capacity(32 * index.len());
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
        limit_line.push_str(sep);
        syntax::limit_item(
            &mut limit_line,
            name,
            decision.remaining,
            Some(effective_window(decision)),
        );
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

/// A request the limiter refused, as a [rejection
/// hook](super::RateLimitLayer::with_rejection) sees it.
#[derive(Debug)]
pub struct Rejection {
    retry_after: u64,
    violated: Vec<PolicyName>,
    problem: Problem,
}

impl Rejection {
    /// Whole seconds until the request would be allowed (`Retry-After`).
    pub fn retry_after(&self) -> u64 {
        self.retry_after
    }

    /// The policies that denied it.
    pub fn violated_policies(&self) -> &[PolicyName] {
        &self.violated
    }

    /// The `quota-exceeded` problem the layer answers with by default.
    pub fn problem(&self) -> &Problem {
        &self.problem
    }
}

/// A rejection hook.
pub(crate) type RejectFn = dyn Fn(&Rejection) -> http::Response<bytes::Bytes> + Send + Sync;

/// A [`RejectFn`] that can be printed.
pub(crate) struct RejectHook(pub(crate) Box<RejectFn>);

impl std::fmt::Debug for RejectHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RejectHook")
    }
}

/// The 429 for a denied batch: the hook's response when there is one, the
/// `quota-exceeded` problem otherwise; `Retry-After` and the two fields are
/// set on either.
pub(crate) fn rejection(
    policies: &[Policy],
    single: Option<&HeaderValue>,
    index: &[usize],
    checks: &[Check],
    decisions: &Decisions,
    hook: Option<&RejectHook>,
) -> http::Response<bytes::Bytes> {
    let mut violated = Vec::new();
    let mut retry_after = 1;
    for ((&i, check), decision) in index.iter().zip(checks).zip(&decisions.each) {
        if check.enforce && !decision.allowed {
            violated.push(policies[i].name());
            retry_after = retry_after.max(effective_window(decision));
        }
    }
    let problem = Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "Request cannot be satisfied as assigned quota has been exceeded",
    )
    .with_type(QUOTA_EXCEEDED)
    .with_detail(format!("retry in {retry_after} s"))
    .with_extension(
        "violated-policies",
        violated
            .iter()
            .map(|p| serde_json::Value::from(p.as_str()))
            .collect::<Vec<_>>(),
    );
    let mut res = match hook {
        Some(hook) => (hook.0)(&Rejection {
            retry_after,
            violated,
            problem,
        }),
        None => problem.into_http_response(),
    };
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

    #[test]
    fn a_lone_limit_line_is_its_item_at_its_exact_length() {
        for (available, window) in [(0, 0), (9, 10), (10, 9), (99_999, 1), (u64::MAX, u64::MAX)] {
            let mut item = String::new();
            syntax::limit_item(&mut item, "\"ip\"", available, Some(window));
            let line = syntax::limit_line("\"ip\"", available, window);
            assert_eq!(line, item);
            // Exact: `Bytes` takes it without a second allocation.
            assert_eq!(line.capacity(), line.len(), "{line}");
        }
    }
}
