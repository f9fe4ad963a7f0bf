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
/// The `http_route` label is axum's [`MatchedPath`], so the layer goes
/// inside the router (`Router::layer`); or, with
/// [`with_routes`](Self::with_routes), the layer matches the route
/// templates itself and can wrap the whole app from outside.
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
    /// The layer, labelling by axum's [`MatchedPath`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Labels by the one of `templates` (axum's syntax, `/items/{id}`)
    /// that the request's path matches, picked as axum's router picks a
    /// route (its matcher, `matchit`), `unmatched` when none does, instead
    /// of by [`MatchedPath`]: the layer can then sit outside the router. `Router::layer` boxes every route once more and axum clones
    /// and boxes through that on every request (measured: about a
    /// thousand instructions per request); outside, the layer costs one
    /// lookup in a radix tree, and also times the layers around the router
    /// and counts the answers they give (a request deadline's 503).
    ///
    /// A template axum would refuse is an error.
    ///
    /// ```
    /// use axum::{Router, routing::get};
    /// use tollgate::metrics::HttpMetricsLayer;
    /// use tower::Layer;
    ///
    /// let router: Router = Router::new().route("/items/{id}", get(|| async { "item" }));
    /// let app = HttpMetricsLayer::new()
    ///     .with_routes(["/items/{id}"])
    ///     .expect("axum's syntax")
    ///     .layer(router);
    /// # let _ = app;
    /// ```
    pub fn with_routes<T: AsRef<str>>(
        mut self,
        templates: impl IntoIterator<Item = T>,
    ) -> Result<Self, RouteError> {
        let mut routes = Routes::default();
        for template in templates {
            let template = template.as_ref();
            if routes.templates.iter().any(|t| &**t == template) {
                continue;
            }
            let index = routes.templates.len();
            routes
                .matcher
                .insert(template, index)
                .map_err(|err| RouteError {
                    template: template.to_owned(),
                    reason: err.to_string(),
                })?;
            routes.templates.push(template.into());
        }
        self.handles = Arc::new(Handles {
            routes: Some(routes),
            ..Handles::default()
        });
        Ok(self)
    }
}

/// A route template [`HttpMetricsLayer::with_routes`] cannot match by.
#[derive(Debug, thiserror::Error)]
#[error("route template {template:?}: {reason}")]
pub struct RouteError {
    template: String,
    reason: String,
}

/// Route templates, matched by path.
#[derive(Default)]
struct Routes {
    matcher: matchit::Router<usize>,
    templates: Vec<Box<str>>,
}

impl Routes {
    /// The index of the template `path` matches.
    fn find(&self, path: &str) -> Option<usize> {
        self.matcher.at(path).ok().map(|found| *found.value)
    }
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.templates).finish()
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

/// Duration histograms by route, then by method index and status;
/// foldhash, as the route is hashed on every response.
type Durations = HashMap<Box<str>, Vec<(usize, u16, Histogram)>, foldhash::fast::RandomState>;

/// Metric handles, made on first use. The label sets are bounded (route
/// templates × methods × status codes), so the maps stay small.
#[derive(Debug, Default)]
struct Handles {
    active: [OnceLock<Gauge>; METHODS.len()],
    durations: RwLock<Durations>,
    /// Set by [`HttpMetricsLayer::with_routes`].
    routes: Option<Routes>,
}

impl Handles {
    fn active(&self, method: usize) -> &Gauge {
        self.active[method].get_or_init(|| {
            metrics::gauge!(HTTP_SERVER_ACTIVE_REQUESTS, "http_request_method" => METHODS[method])
        })
    }

    /// Records `seconds` in the duration histogram of `method`, `route`
    /// and `status`, registering it on first use.
    fn record_duration(&self, method: usize, route: &str, status: u16, seconds: f64) {
        let found = |routes: &Durations| {
            routes.get(route).and_then(|by_status| {
                by_status
                    .iter()
                    .find(|(m, s, _)| (*m, *s) == (method, status))
                    .map(|(_, _, histogram)| histogram.record(seconds))
            })
        };
        let read = self
            .durations
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if found(&read).is_some() {
            return;
        }
        drop(read);
        let mut write = self
            .durations
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if found(&write).is_some() {
            return;
        }
        let histogram = metrics::histogram!(
            HTTP_SERVER_REQUEST_DURATION,
            "http_request_method" => METHODS[method],
            "http_route" => route.to_owned(),
            "http_response_status_code" => status.to_string(),
        );
        histogram.record(seconds);
        write
            .entry(route.into())
            .or_default()
            .push((method, status, histogram));
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
        let route = match &self.handles.routes {
            Some(routes) => Label::Listed(routes.find(req.uri().path())),
            None => Label::Matched(req.extensions().get::<MatchedPath>().cloned()),
        };
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
    route: Label,
    started: Instant,
    handles: Arc<Handles>,
}

/// Where the `http_route` label comes from.
enum Label {
    /// axum's, from the request (or, failing that, the response).
    Matched(Option<MatchedPath>),
    /// The index of the listed template the path matched.
    Listed(Option<usize>),
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
            let route = match &record.route {
                Label::Matched(route) => route.as_ref().or(late_route).map(MatchedPath::as_str),
                Label::Listed(index) => index
                    .zip(record.handles.routes.as_ref())
                    .map(|(index, routes)| &*routes.templates[index]),
            }
            .unwrap_or("unmatched");
            let seconds = record.started.elapsed().as_secs_f64();
            record
                .handles
                .record_duration(record.method, route, status, seconds);
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
    use tower_layer::Layer;

    use super::*;

    /// Drives `app` to completion with `recorder` set.
    fn drive<S>(
        recorder: &metrics_exporter_prometheus::PrometheusRecorder,
        app: S,
        req: Request<Body>,
    ) where
        S: Service<Request<Body>, Response = Response<Body>>,
        S::Error: std::fmt::Debug,
    {
        metrics::with_local_recorder(recorder, || {
            let waker = std::task::Waker::noop();
            let mut cx = Context::from_waker(waker);
            let mut fut = std::pin::pin!(app.oneshot(req));
            loop {
                if let Poll::Ready(res) = fut.as_mut().poll(&mut cx) {
                    res.expect("a response");
                    break;
                }
            }
        });
    }

    #[test]
    fn listed_routes_label_from_outside_the_router() {
        let recorder = super::super::prometheus_builder().build_recorder();
        let handle = recorder.handle();
        let router = Router::new()
            .route("/items/{id}", get(|| async { "ok" }))
            .route("/health", get(|| async { "ok" }));
        let app = HttpMetricsLayer::new()
            .with_routes(["/items/{id}", "/health", "/items/{id}"])
            .unwrap()
            .layer(router);
        for req in [
            Request::get("/items/1"),
            Request::get("/items/2"),
            Request::get("/health"),
            Request::get("/nowhere/123"),
            Request::post("/items/3"),
        ] {
            drive(&recorder, app.clone(), req.body(Body::empty()).unwrap());
        }
        let text = handle.render();
        for expected in [
            r#"{http_request_method="GET",http_route="/items/{id}",http_response_status_code="200"} 2"#,
            r#"{http_request_method="GET",http_route="/health",http_response_status_code="200"} 1"#,
            r#"{http_request_method="GET",http_route="unmatched",http_response_status_code="404"} 1"#,
            // The path matched, the method did not: labelled as in the router.
            r#"{http_request_method="POST",http_route="/items/{id}",http_response_status_code="405"} 1"#,
        ] {
            assert!(text.contains(expected), "missing {expected} in\n{text}");
        }
        assert!(
            !text.contains("/items/1") && !text.contains("nowhere"),
            "{text}"
        );
        assert!(
            HttpMetricsLayer::new()
                .with_routes(["/a/{x}", "/a/{y}"])
                .is_err(),
            "conflicting templates"
        );
    }

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
