//! [`HttpMetricsLayer`]: request duration and in-flight requests.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::extract::MatchedPath;
use http::{Method, Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use super::{HTTP_SERVER_ACTIVE_REQUESTS, HTTP_SERVER_REQUEST_DURATION};

/// Applies [`HttpMetrics`] to a service.
///
/// See the [module docs](crate::metrics) for an example.
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpMetricsLayer;

impl HttpMetricsLayer {
    /// The layer.
    pub fn new() -> Self {
        Self
    }
}

impl<S> Layer<S> for HttpMetricsLayer {
    type Service = HttpMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpMetrics { inner }
    }
}

/// Middleware recording `http_server_request_duration_seconds` and
/// `http_server_active_requests`.
///
/// See the [module docs](crate::metrics) for an example.
#[derive(Debug, Clone)]
pub struct HttpMetrics<S> {
    inner: S,
}

impl<S> HttpMetrics<S> {
    define_inner_service_accessors!();
}

/// The method as a label: one of the standard methods, else `_OTHER`, so a
/// client cannot mint series with made-up methods.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for HttpMetrics<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let method = method_label(req.method());
        let route = req
            .extensions()
            .get::<MatchedPath>()
            .map(|path| path.as_str().to_owned());
        let active = metrics::gauge!(HTTP_SERVER_ACTIVE_REQUESTS, "http_request_method" => method);
        active.increment(1.0);
        ResponseFuture {
            inner: self.inner.call(req),
            record: Some(Record {
                method,
                route,
                started: Instant::now(),
                active,
            }),
        }
    }
}

/// What to record when the response is ready; the active gauge goes down
/// when it is dropped, also when the client went away first.
struct Record {
    method: &'static str,
    route: Option<String>,
    started: Instant,
    active: metrics::Gauge,
}

impl Drop for Record {
    fn drop(&mut self) {
        self.active.decrement(1.0);
    }
}

pin_project! {
    /// Response future of [`HttpMetrics`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        record: Option<Record>,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Some(record) = this.record.take() {
            let status = match &result {
                Ok(res) => res.status().as_str().to_owned(),
                Err(_) => "500".to_owned(),
            };
            let route = record
                .route
                .clone()
                .or_else(|| {
                    result
                        .as_ref()
                        .ok()
                        .and_then(|res| res.extensions().get::<MatchedPath>())
                        .map(|p| p.as_str().to_owned())
                })
                .unwrap_or_else(|| "unmatched".to_owned());
            metrics::histogram!(
                HTTP_SERVER_REQUEST_DURATION,
                "http_request_method" => record.method,
                "http_route" => route,
                "http_response_status_code" => status,
            )
            .record(record.started.elapsed().as_secs_f64());
        }
        Poll::Ready(result)
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn labels_are_bounded_and_templated() {
        let recorder = super::super::prometheus_builder().build_recorder();
        let handle = recorder.handle();
        let app = Router::new()
            .route("/items/{id}", get(|| async { "ok" }))
            .layer(HttpMetricsLayer::new());
        let requests = [
            Request::get("/items/1"),
            Request::get("/items/2"),
            Request::get("/nowhere/123"),
            Request::builder().method("BREW").uri("/items/3"),
        ];
        for req in requests {
            let req = req.body(Body::empty()).unwrap();
            let app = app.clone();
            let res = metrics::with_local_recorder(&recorder, || {
                // The recorder is only set while polling: poll to completion here.
                let waker = std::task::Waker::noop();
                let mut cx = Context::from_waker(waker);
                let mut fut = std::pin::pin!(app.oneshot(req));
                loop {
                    if let Poll::Ready(res) = fut.as_mut().poll(&mut cx) {
                        break res;
                    }
                }
            });
            assert!(res.is_ok());
        }
        let text = handle.render();
        assert!(text.contains(
            r#"http_server_request_duration_seconds_count{http_request_method="GET",http_route="/items/{id}",http_response_status_code="200"} 2"#
        ), "{text}");
        assert!(
            text.contains(r#"http_route="unmatched",http_response_status_code="404""#),
            "{text}"
        );
        assert!(text.contains(r#"http_request_method="_OTHER""#), "{text}");
        assert!(
            !text.contains("/items/1") && !text.contains("nowhere"),
            "{text}"
        );
        assert!(
            text.contains(r#"http_server_request_duration_seconds_bucket{"#),
            "histogram, not summary: {text}"
        );
        assert!(text.contains(r#"le="0.0005""#), "{text}");
        assert!(
            text.contains(r#"http_server_active_requests{http_request_method="GET"} 0"#),
            "{text}"
        );
    }
}
