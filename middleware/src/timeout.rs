//! Time limits, so no client holds a request open for as long as it likes.
//!
//! - [`BodyTimeoutLayer`]: the whole request body must arrive within a
//!   deadline counted from when the request reached the layer. A client
//!   that trickles its body (a byte every few seconds) is cut off: the
//!   handler's body read fails and the client gets `408 Request Timeout`
//!   with `Connection: close`. Unlike tower-http's `RequestBodyTimeout`,
//!   which limits the wait for each frame, the deadline covers the body as
//!   a whole, so a slow trickle cannot reset it.
//! - [`RequestTimeoutLayer`]: a deadline on the whole request (the inner
//!   service's future, until the response head). When it passes, the inner
//!   future is dropped (for a tenant transaction: rolled back) and the
//!   client gets `503 Service Unavailable` with `Retry-After` and
//!   `Connection: close`.
//!
//! Both answer with RFC 9457 problem details. The time a client may take
//! to send its request *head* is the HTTP server's to bound (hyper's
//! `header_read_timeout`); the reference server sets it.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use axum::{Router, routing::get};
//! use tollgate::timeout::{BodyTimeoutLayer, RequestTimeoutLayer};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let router = Router::new().route(
//!     "/slow",
//!     get(|| async {
//!         tokio::time::sleep(Duration::from_secs(60)).await;
//!         "done"
//!     }),
//! );
//! let app = ServiceBuilder::new()
//!     .layer(RequestTimeoutLayer::new(Duration::from_secs(30)))
//!     .layer(BodyTimeoutLayer::new(Duration::from_secs(10)))
//!     // axum's router wants its own body type.
//!     .map_request(|req: http::Request<_>| req.map(axum::body::Body::new))
//!     .service(router);
//!
//! let req = http::Request::get("/slow").body(axum::body::Body::empty()).unwrap();
//! let res = app.oneshot(req).await.unwrap();
//! assert_eq!(res.status(), 503);
//! assert_eq!(res.headers()["connection"], "close");
//! assert_eq!(res.headers()["retry-after"], "1");
//! assert_eq!(res.headers()["content-type"], "application/problem+json");
//! # }
//! ```
//!
//! # Ordering
//!
//! Outermost of the request-wide layers that can answer (after request id
//! and trace, so timed-out requests are logged with their id): the request
//! deadline then covers everything below it, including waits for a pooled
//! connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_layer::Layer;
use tower_service::Service;

use crate::body::ResponseBody;
use crate::problem::Problem;

/// Errors a body may fail with, boxed as hyper and axum expect.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body did not arrive within the [`BodyTimeoutLayer`]'s
/// deadline.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
pub struct BodyTimedOut(());

fn close_connection<B>(res: &mut Response<B>) {
    res.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

fn problem_response<B>(problem: Problem) -> Response<ResponseBody<B>> {
    let mut res = problem.into_http_response().map(ResponseBody::full);
    close_connection(&mut res);
    res
}

// === impl RequestTimeoutLayer ===

/// Answers `503` (problem details, `Retry-After: 1`, `Connection: close`)
/// when the inner service has not produced a response head within the
/// timeout.
///
/// See the [module docs](self) for an example.
#[derive(Debug, Clone, Copy)]
pub struct RequestTimeoutLayer {
    timeout: Option<Duration>,
}

impl RequestTimeoutLayer {
    /// A deadline of `timeout` per request.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout: Some(timeout),
        }
    }

    /// A deadline of `timeout`, or none (when a proxy in front enforces
    /// one, or to measure the layer's cost).
    pub fn optional(timeout: Option<Duration>) -> Self {
        Self { timeout }
    }
}

impl<S> Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestTimeout {
            inner,
            timeout: self.timeout,
        }
    }
}

/// The service of [`RequestTimeoutLayer`].
#[derive(Debug, Clone)]
pub struct RequestTimeout<S> {
    inner: S,
    timeout: Option<Duration>,
}

impl<S> RequestTimeout<S> {
    define_inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RequestTimeout<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = RequestTimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        RequestTimeoutFuture {
            inner: self.inner.call(req),
            sleep: Deadline::after(self.timeout),
        }
    }
}

pin_project! {
    /// The response future of [`RequestTimeout`].
    #[derive(Debug)]
    pub struct RequestTimeoutFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Deadline,
    }
}

pin_project! {
    /// A deadline (or none), fixed when the request arrives but armed (a
    /// timer made and registered) only when something first waits for it:
    /// a request answered without waiting costs a clock read, no timer.
    #[project = DeadlineProj]
    #[derive(Debug)]
    enum Deadline {
        Unarmed { at: Option<Instant> },
        Armed { #[pin] sleep: Sleep },
    }
}

impl Deadline {
    fn after(timeout: Option<Duration>) -> Self {
        Self::Unarmed {
            at: timeout.map(|t| Instant::now() + t),
        }
    }

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let DeadlineProj::Unarmed { at } = self.as_mut().project() {
            let Some(at) = *at else {
                return Poll::Pending;
            };
            self.set(Self::Armed {
                sleep: tokio::time::sleep_until(at),
            });
        }
        match self.project() {
            DeadlineProj::Armed { sleep } => sleep.poll(cx),
            DeadlineProj::Unarmed { .. } => Poll::Pending,
        }
    }
}

impl<F, B, E> Future for RequestTimeoutFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result.map(|res| res.map(ResponseBody::inner)));
        }
        ready!(this.sleep.poll(cx));
        #[cfg(feature = "metrics")]
        metrics::counter!(crate::metrics::HTTP_TIMEOUTS, "stage" => "request").increment(1);
        let mut res = problem_response(
            Problem::new(StatusCode::SERVICE_UNAVAILABLE, "Request timed out")
                .with_detail("the server did not finish the request in time; retry shortly"),
        );
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        Poll::Ready(Ok(res))
    }
}

// === impl BodyTimeoutLayer ===

/// Gives the request body a deadline, counted from when the request
/// reaches the layer; a body still incomplete then fails to read, and the
/// response becomes `408` (problem details, `Connection: close`).
///
/// See the [module docs](self).
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeoutLayer {
    timeout: Option<Duration>,
}

impl BodyTimeoutLayer {
    /// The whole body must arrive within `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout: Some(timeout),
        }
    }

    /// A deadline of `timeout`, or none.
    pub fn optional(timeout: Option<Duration>) -> Self {
        Self { timeout }
    }
}

impl<S> Layer<S> for BodyTimeoutLayer {
    type Service = BodyTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BodyTimeout {
            inner,
            timeout: self.timeout,
        }
    }
}

/// The service of [`BodyTimeoutLayer`].
#[derive(Debug, Clone)]
pub struct BodyTimeout<S> {
    inner: S,
    timeout: Option<Duration>,
}

impl<S> BodyTimeout<S> {
    define_inner_service_accessors!();
}

impl<S, ReqBody: Body, ResBody> Service<Request<ReqBody>> for BodyTimeout<S>
where
    S: Service<Request<TimeoutBody<ReqBody>>, Response = Response<ResBody>>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = BodyTimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // A request without a body (most GETs) has nothing to wait for:
        // no deadline, no flag, no allocation.
        let timeout = self.timeout.filter(|_| !req.body().is_end_stream());
        let expired = timeout.map(|_| Arc::new(AtomicBool::new(false)));
        let body_expired = expired.clone();
        let req = req.map(|inner| TimeoutBody {
            inner,
            // The timer is registered only if the body is ever waited on.
            sleep: Deadline::after(timeout),
            expired: body_expired,
        });
        BodyTimeoutFuture {
            inner: self.inner.call(req),
            expired,
        }
    }
}

pin_project! {
    /// The response future of [`BodyTimeout`].
    #[derive(Debug)]
    pub struct BodyTimeoutFuture<F> {
        #[pin]
        inner: F,
        expired: Option<Arc<AtomicBool>>,
    }
}

impl<F, B, E> Future for BodyTimeoutFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = ready!(this.inner.poll(cx))?;
        if !this
            .expired
            .as_ref()
            .is_some_and(|e| e.load(Ordering::Acquire))
        {
            return Poll::Ready(Ok(res.map(ResponseBody::inner)));
        }
        // Whatever the handler made of its failed read (often a 400), the
        // client was too slow: say so, and do not keep the connection.
        #[cfg(feature = "metrics")]
        metrics::counter!(crate::metrics::HTTP_TIMEOUTS, "stage" => "body").increment(1);
        Poll::Ready(Ok(problem_response(
            Problem::new(StatusCode::REQUEST_TIMEOUT, "Request body timed out")
                .with_detail("the request body did not arrive in time"),
        )))
    }
}

pin_project! {
    /// A request body with a deadline: after it, reading fails with
    /// [`BodyTimedOut`].
    #[derive(Debug)]
    pub struct TimeoutBody<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: Deadline,
        expired: Option<Arc<AtomicBool>>,
    }
}

impl<B> Body for TimeoutBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        ready!(this.sleep.poll(cx));
        if let Some(expired) = this.expired {
            expired.store(true, Ordering::Release);
        }
        Poll::Ready(Some(Err(Box::new(BodyTimedOut(())))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use axum::body::Body as AxumBody;
    use http_body_util::BodyExt;
    use tower::{ServiceBuilder, ServiceExt};

    use super::*;
    use bytes::Bytes;

    type Chunks = tokio::sync::mpsc::Sender<Result<Frame<Bytes>, Infallible>>;

    /// A body whose frames the test sends when it likes.
    struct ChannelBody(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>);

    impl Body for ChannelBody {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.0.poll_recv(cx)
        }
    }

    fn trickle() -> (AxumBody, Chunks) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        (AxumBody::new(ChannelBody(rx)), tx)
    }

    async fn echo(body: axum::body::Bytes) -> String {
        format!("{} bytes", body.len())
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_body_is_cut_off_with_408() {
        let app = ServiceBuilder::new()
            .layer(BodyTimeoutLayer::new(Duration::from_secs(10)))
            .map_request(|req: Request<_>| req.map(AxumBody::new))
            .service(axum::Router::new().route("/", axum::routing::post(echo)));
        let (body, tx) = trickle();
        tx.send(Ok(Frame::data(Bytes::from_static(b"{"))))
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let res = app
            .clone()
            .oneshot(Request::post("/").body(body).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 408);
        assert_eq!(res.headers()["connection"], "close");
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        drop(tx);

        // A body that arrives in time is read whole.
        let res = app
            .oneshot(Request::post("/").body(AxumBody::from("hello")).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let text = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&text[..], b"5 bytes");
    }

    #[tokio::test(start_paused = true)]
    async fn frames_do_not_reset_the_deadline() {
        let app = ServiceBuilder::new()
            .layer(BodyTimeoutLayer::new(Duration::from_secs(10)))
            .map_request(|req: Request<_>| req.map(AxumBody::new))
            .service(axum::Router::new().route("/", axum::routing::post(echo)));
        let (body, tx) = trickle();
        let sender = tokio::spawn(async move {
            // A byte every 3 s: each wait is short, the whole is not.
            for _ in 0..10 {
                if tx
                    .send(Ok(Frame::data(Bytes::from_static(b"x"))))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
        });
        let started = tokio::time::Instant::now();
        let res = app
            .oneshot(Request::post("/").body(body).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 408);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        sender.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_request_gets_503_and_a_fast_one_passes() {
        let router = axum::Router::new()
            .route(
                "/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    "slow"
                }),
            )
            .route("/fast", axum::routing::get(|| async { "fast" }));
        let app = ServiceBuilder::new()
            .layer(RequestTimeoutLayer::new(Duration::from_secs(2)))
            .service(router);
        let get = |path| Request::get(path).body(AxumBody::empty()).unwrap();
        let started = tokio::time::Instant::now();
        let res = app.clone().oneshot(get("/slow")).await.unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(res.headers()["retry-after"], "1");
        let res = app.oneshot(get("/fast")).await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.headers().get("connection").is_none());
    }
}
