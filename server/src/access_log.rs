//! [`AccessLogLayer`]: one line per request at INFO, after the response
//! head: method, URI, status, latency and request id.
//!
//! Cheaper than a `tower_http::trace` span per request: nothing is
//! formatted unless the line is enabled, the fields are captured as the
//! cheap clones they are (`Method`, `Uri`, `HeaderValue`), there is no span
//! to enter and leave at every poll, and the writer (`main.rs`) is
//! non-blocking, so a slow stdout never stalls a request.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{HeaderValue, Method, Request, Response, Uri};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};

/// The target access lines are logged under (`RUST_LOG=access=warn`
/// silences them alone).
pub const TARGET: &str = "access";

/// Logs a line per request; does nothing when built with `false`.
#[derive(Debug, Clone, Copy)]
pub struct AccessLogLayer {
    enabled: bool,
}

impl AccessLogLayer {
    /// A layer that logs when `enabled` (`LOG_ACCESS`).
    pub fn new(enabled: bool) -> Self {
        Self { enabled }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog {
            inner,
            enabled: self.enabled,
        }
    }
}

/// The service of [`AccessLogLayer`].
#[derive(Debug, Clone)]
pub struct AccessLog<S> {
    inner: S,
    enabled: bool,
}

/// What a line needs from the request.
#[derive(Debug)]
struct Line {
    method: Method,
    uri: Uri,
    request_id: Option<HeaderValue>,
    start: Instant,
}

impl<S, B, ResBody> Service<Request<B>> for AccessLog<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = AccessLogFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let line =
            (self.enabled && tracing::enabled!(target: TARGET, tracing::Level::INFO)).then(|| {
                Line {
                    method: req.method().clone(),
                    uri: req.uri().clone(),
                    request_id: req.headers().get("x-request-id").cloned(),
                    start: Instant::now(),
                }
            });
        AccessLogFuture {
            inner: self.inner.call(req),
            line,
        }
    }
}

pin_project! {
    /// The future of [`AccessLog`].
    #[derive(Debug)]
    pub struct AccessLogFuture<F> {
        #[pin]
        inner: F,
        line: Option<Line>,
    }
}

impl<F, ResBody, E> Future for AccessLogFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Some(line) = this.line.take() {
            let status = result.as_ref().map_or(500, |res| res.status().as_u16());
            let request_id = line
                .request_id
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info!(
                target: TARGET,
                method = %line.method,
                uri = %line.uri,
                status,
                latency_us = line.start.elapsed().as_micros() as u64,
                request_id,
                "request"
            );
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn passes_responses_through_whether_on_or_off() {
        for enabled in [true, false] {
            let svc =
                AccessLogLayer::new(enabled).layer(tower::service_fn(|_req: Request<()>| async {
                    Ok::<_, std::convert::Infallible>(
                        Response::builder().status(204).body(()).unwrap(),
                    )
                }));
            let res = svc.oneshot(Request::new(())).await.unwrap();
            assert_eq!(res.status(), 204);
        }
    }
}
