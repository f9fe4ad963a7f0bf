//! [`ResponseFuture`]: checking the store, then calling the inner service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use smallvec::SmallVec;
use tower_service::Service;

use super::headers;
use super::policy::FailurePolicy;
use super::service::Shared;
use super::store::{Check, Decisions, Store, StoreError};
use crate::body::ResponseBody;
use crate::problem::Problem;

pin_project! {
    /// Response future of [`RateLimit`](super::RateLimit).
    pub struct ResponseFuture<S, St, ReqBody>
    where
        S: Service<Request<ReqBody>>,
        St: Store,
    {
        #[pin]
        state: State<S, St, ReqBody>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, St, ReqBody>
    where
        S: Service<Request<ReqBody>>,
        St: Store,
    {
        /// Waiting for the store's decision.
        Checking {
            #[pin]
            check: St::Future,
            // Boxed: only a store that waits needs it, and inline it would
            // make every response future larger to move.
            pending: Option<Box<Pending<S, St, ReqBody>>>,
        },
        /// Allowed (or failed open): waiting for the inner service.
        Calling {
            #[pin]
            future: S::Future,
            fields: Option<(HeaderValue, HeaderValue)>,
        },
        /// Answered without the inner service.
        Rejected {
            response: Option<Response<Bytes>>,
        },
    }
}

/// What the request needs once the store has decided.
struct Pending<S, St, ReqBody> {
    req: Request<ReqBody>,
    inner: S,
    checks: SmallVec<[Check; 4]>,
    /// The policy of each check.
    index: SmallVec<[usize; 4]>,
    /// The request's value of the layer's metric label.
    label: usize,
    shared: Arc<Shared<St>>,
    /// When the store was first found waiting, for its latency histogram;
    /// `None` while it has answered at once (an in-process store: no clock
    /// read per request).
    #[cfg(feature = "metrics")]
    started: Option<tokio::time::Instant>,
}

impl<S, St, ReqBody> ResponseFuture<S, St, ReqBody>
where
    S: Service<Request<ReqBody>>,
    St: Store,
{
    pub(crate) fn checking(
        check: St::Future,
        req: Request<ReqBody>,
        inner: S,
        checks: SmallVec<[Check; 4]>,
        index: SmallVec<[usize; 4]>,
        label: usize,
        shared: Arc<Shared<St>>,
    ) -> Self {
        let pending = Pending {
            req,
            inner,
            checks,
            index,
            label,
            shared,
            #[cfg(feature = "metrics")]
            started: None,
        };
        Self {
            state: State::Checking {
                check,
                pending: Some(Box::new(pending)),
            },
        }
    }

    pub(crate) fn calling(future: S::Future, fields: Option<(HeaderValue, HeaderValue)>) -> Self {
        Self {
            state: State::Calling { future, fields },
        }
    }

    pub(crate) fn rejected(problem: Problem) -> Self {
        Self::answered(problem.into_http_response())
    }

    pub(crate) fn answered(response: Response<Bytes>) -> Self {
        Self {
            state: State::Rejected {
                response: Some(response),
            },
        }
    }
}

impl<S, St, ReqBody, ResBody> Future for ResponseFuture<S, St, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    St: Store,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Checking { check, pending } => {
                    let result = match check.poll(cx) {
                        Poll::Ready(result) => result,
                        Poll::Pending => {
                            #[cfg(feature = "metrics")]
                            if let Some(pending) = pending.as_mut() {
                                pending
                                    .started
                                    .get_or_insert_with(tokio::time::Instant::now);
                            }
                            return Poll::Pending;
                        }
                    };
                    let Pending {
                        req,
                        mut inner,
                        checks,
                        index,
                        label,
                        shared,
                        #[cfg(feature = "metrics")]
                        started,
                    } = *pending.take().expect("polled after completion");
                    #[cfg(feature = "metrics")]
                    shared
                        .metrics()
                        .store_duration
                        .record(started.map_or(0.0, |at| at.elapsed().as_secs_f64()));
                    let fields = match verdict(&shared, &index, &checks, label, result) {
                        Verdict::Allow(fields) => fields,
                        Verdict::Reject(res) => {
                            return Poll::Ready(Ok(res.map(ResponseBody::full)));
                        }
                    };
                    let future = inner.call(req);
                    state.set(State::Calling { future, fields });
                }
                StateProj::Calling { future, fields } => {
                    let mut res = ready!(future.poll(cx))?;
                    if let Some(fields) = fields.take() {
                        headers::append(res.headers_mut(), fields);
                    }
                    return Poll::Ready(Ok(res.map(ResponseBody::inner)));
                }
                StateProj::Rejected { response } => {
                    let res = response.take().expect("polled after completion");
                    return Poll::Ready(Ok(res.map(ResponseBody::full)));
                }
            }
        }
    }
}

/// What to do with a request once the store has answered.
pub(crate) enum Verdict {
    /// Call the inner service, then add these header fields.
    Allow(Option<(HeaderValue, HeaderValue)>),
    /// Answer with this response.
    Reject(Response<Bytes>),
}

pub(crate) fn verdict<St>(
    shared: &Shared<St>,
    index: &[usize],
    checks: &[Check],
    label: usize,
    result: Result<Decisions, StoreError>,
) -> Verdict {
    match result {
        Ok(decisions) => decided(shared, index, checks, label, &decisions),
        Err(error) => {
            // Per request at debug only: the store logs its own
            // transitions (down, back) once each.
            tracing::debug!(%error, "rate-limit store failed; applying the failure policy");
            #[cfg(feature = "metrics")]
            metrics::counter!(crate::metrics::RATELIMIT_STORE_ERRORS, "kind" => error.kind().as_str())
                .increment(1);
            fail_over(shared, index, checks, label, &error)
        }
    }
}

fn decided<St>(
    shared: &Shared<St>,
    index: &[usize],
    checks: &[Check],
    label: usize,
    decisions: &Decisions,
) -> Verdict {
    record(shared, index, checks, label, decisions);
    let (policies, single) = (&shared.policies, shared.single_policy_field.as_ref());
    if decisions.allowed {
        Verdict::Allow(headers::fields(policies, single, index, checks, decisions))
    } else {
        Verdict::Reject(headers::rejection(
            policies,
            single,
            index,
            checks,
            decisions,
            shared.on_reject.as_deref(),
        ))
    }
}

/// The store failed: each policy's failure policy decides. One closed
/// policy rejects the request; local policies are decided by the local
/// store; open ones let it through.
fn fail_over<St>(
    shared: &Shared<St>,
    index: &[usize],
    checks: &[Check],
    label: usize,
    error: &StoreError,
) -> Verdict {
    let mut local_index: SmallVec<[usize; 4]> = SmallVec::new();
    let mut local_checks: SmallVec<[Check; 4]> = SmallVec::new();
    for (&i, check) in index.iter().zip(checks) {
        match shared.failure_of(i) {
            FailurePolicy::Closed if check.enforce => {
                tracing::debug!(%error, policy = %check.policy, "failing closed");
                let res = Problem::new(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable")
                    .with_detail("the rate limiter cannot decide right now; retry shortly")
                    .into_http_response();
                return Verdict::Reject(res);
            }
            FailurePolicy::Local => {
                let mut check = check.clone();
                check.quota = check.quota.divided_by(shared.fallback.replicas);
                local_checks.push(check);
                local_index.push(i);
            }
            _ => {}
        }
    }
    if local_checks.is_empty() {
        return Verdict::Allow(None);
    }
    match shared.fallback.decide(&local_checks) {
        Some(decisions) => decided(shared, &local_index, &local_checks, label, &decisions),
        None => Verdict::Allow(None),
    }
}

/// Logs shadow rejections (and, with the `metrics` feature, counts every
/// decision, and the charged ones that left at most 10 % of the burst).
fn record<St>(
    shared: &Shared<St>,
    index: &[usize],
    checks: &[Check],
    label: usize,
    decisions: &Decisions,
) {
    for ((&i, check), decision) in index.iter().zip(checks).zip(&decisions.each) {
        let outcome = match (decision.allowed, check.enforce) {
            // Allowed by this policy, but another rejected the request:
            // nothing was charged.
            (true, _) if !decisions.allowed => 4,
            (true, _) => 0,
            (false, true) => 1,
            (false, false) => {
                let policy = &shared.policies[i];
                tracing::debug!(policy = %policy.name, key = %check.key, "shadow rejection");
                2
            }
        };
        #[cfg(feature = "metrics")]
        {
            let counters = &shared.metrics().decisions[i][label];
            counters[outcome].increment(1);
            let near = decisions.allowed
                && decision.allowed
                && decision.remaining * 10 <= u64::from(check.quota.burst());
            if near {
                counters[3].increment(1);
            }
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (outcome, label);
    }
}

impl<S, St, ReqBody> std::fmt::Debug for ResponseFuture<S, St, ReqBody>
where
    S: Service<Request<ReqBody>>,
    St: Store,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
