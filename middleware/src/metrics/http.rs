//! [`HttpMetricsLayer`]: request duration and in-flight requests.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::task::{Context, Poll, ready};

use axum::extract::MatchedPath;
use http::{Method, Request, Response};
use metrics::{Gauge, Histogram};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use super::{HTTP_SERVER_ACTIVE_REQUESTS, HTTP_SERVER_REQUEST_DURATION};

/// Applies [`HttpMetrics`] to a service.
///
/// The metric handles are looked up once per method, route and status and
/// then reused, so the hot path neither allocates labels nor searches the
/// recorder's registry. They come from the recorder in place at first use:
/// install the recorder before serving.
///
/// See the [module docs](crate::metrics) for an example.
#[derive(Debug, Clone, Default)]
pub struct HttpMetricsLayer {
    handles: Arc<Handles>,
}

impl HttpMetricsLayer {
    /// The layer.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for HttpMetricsLayer {
    type Service = HttpMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpMetrics {
            inner,
            handles: self.handles.clone(),
        }
    }
}

/// Middleware recording `http_server_request_duration_seconds` and
/// `http_server_active_requests`.
///
/// See the [module docs](crate::metrics) for an example.
#[derive(Debug, Clone)]
pub struct HttpMetrics<S> {
    inner: S,
    handles: Arc<Handles>,
}

impl<S> HttpMetrics<S> {
    define_inner_service_accessors!();
}

/// The standard methods; anything else is `_OTHER`, so a client cannot mint
/// series with made-up methods.
const METHODS: [&str; 10] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "_OTHER",
];

/// The index of the method's label in [`METHODS`].
fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::POST => 1,
        Method::PUT => 2,
        Method::DELETE => 3,
        Method::PATCH => 4,
        Method::HEAD => 5,
        Method::OPTIONS => 6,
        Method::CONNECT => 7,
        Method::TRACE => 8,
        _ => 9,
    }
}

/// Duration histograms by route, then by method index and status.
type Durations = HashMap<Box<str>, Vec<(usize, u16, Histogram)>>;

/// Metric handles, made on first use. The label sets are bounded (route
/// templates × methods × status codes), so the maps stay small.
#[derive(Debug, Default)]
struct Handles {
    active: [OnceLock<Gauge>; METHODS.len()],
    durations: RwLock<Durations>,
}

impl Handles {
    fn active(&self, method: usize) -> &Gauge {
        self.active[method].get_or_init(|| {
            metrics::gauge!(HTTP_SERVER_ACTIVE_REQUESTS, "http_request_method" => METHODS[method])
        })
    }

    fn duration(&self, method: usize, route: &str, status: u16) -> Histogram {
        let found = |routes: &Durations| {
            routes.get(route).and_then(|by_status| {
                by_status
                    .iter()
                    .find(|(m, s, _)| (*m, *s) == (method, status))
                    .map(|(_, _, histogram)| histogram.clone())
            })
        };
        let read = self
            .durations
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(histogram) = found(&read) {
            return histogram;
        }
        drop(read);
        let mut write = self
            .durations
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(histogram) = found(&write) {
            return histogram;
        }
        let histogram = metrics::histogram!(
            HTTP_SERVER_REQUEST_DURATION,
            "http_request_method" => METHODS[method],
            "http_route" => route.to_owned(),
            "http_response_status_code" => status.to_string(),
        );
        write
            .entry(route.into())
            .or_default()
            .push((method, status, histogram.clone()));
        histogram
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
        let method = method_index(req.method());
        let route = req.extensions().get::<MatchedPath>().cloned();
        self.handles.active(method).increment(1.0);
        ResponseFuture {
            inner: self.inner.call(req),
            record: Some(Record {
                method,
                route,
                started: Instant::now(),
                handles: self.handles.clone(),
            }),
        }
    }
}

/// What to record when the response is ready; the active gauge goes down
/// when it is dropped, also when the client went away first.
struct Record {
    method: usize,
    route: Option<MatchedPath>,
    started: Instant,
    handles: Arc<Handles>,
}

impl Drop for Record {
    fn drop(&mut self) {
        self.handles.active(self.method).decrement(1.0);
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
            let (status, late_route) = match &result {
                Ok(res) => (res.status().as_u16(), res.extensions().get::<MatchedPath>()),
                Err(_) => (500, None),
            };
            let route = record
                .route
                .as_ref()
                .or(late_route)
                .map_or("unmatched", MatchedPath::as_str);
            record
                .handles
                .duration(record.method, route, status)
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
