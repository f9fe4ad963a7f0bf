//! [`StepLayer`]: one step of the authenticated stack (the token, the
//! tenant's plan, the current trust level) before the rest of it.
//!
//! A step looks at the request, adds to its extensions, and either lets
//! it continue or answers it. `axum::middleware::from_fn` does the same
//! at three allocations a step on every request (its future, the rest of
//! the stack boxed into `Next`, and that box's future) plus a clone of
//! its state; this layer keeps the step's future inline in its response
//! future instead. (That only pays while the futures are small: when
//! `tollgate::tenant::begin`'s future held sqlx's connect path, 13 KB,
//! moving the bigger futures cost more than the boxes.)

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::BoxError;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::response::Response;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// Runs `step` on each request: `Ok(request)` continues to the inner
/// service, `Err(response)` answers without it.
///
/// ```
/// use axum::{Router, extract::Request, response::IntoResponse, routing::get};
/// use http::StatusCode;
/// use tollgate_server::step::StepLayer;
///
/// // Only requests that name a region get through; the handler reads it.
/// #[derive(Clone)]
/// struct Region(String);
///
/// let app: Router = Router::new()
///     .route("/", get(|axum::Extension(Region(r)): axum::Extension<Region>| async move { r }))
///     .route_layer(StepLayer::new(|mut req: Request| async move {
///         let region = req.headers().get("x-region").and_then(|v| v.to_str().ok());
///         let Some(region) = region.map(str::to_owned) else {
///             return Err(StatusCode::BAD_REQUEST.into_response());
///         };
///         req.extensions_mut().insert(Region(region));
///         Ok(req)
///     }));
/// # let _ = app;
/// ```
#[derive(Debug, Clone)]
pub struct StepLayer<F> {
    step: F,
}

impl<F> StepLayer<F> {
    /// A layer running `step`, a `Fn(Request) -> impl Future<Output =
    /// Result<Request, Response>>`.
    pub fn new(step: F) -> Self {
        Self { step }
    }
}

impl<S, F: Clone> Layer<S> for StepLayer<F> {
    type Service = Step<S, F>;

    fn layer(&self, inner: S) -> Self::Service {
        Step {
            inner,
            step: self.step.clone(),
        }
    }
}

/// The service of [`StepLayer`].
#[derive(Debug, Clone)]
pub struct Step<S, F> {
    inner: S,
    step: F,
}

impl<S, F, Fut, B> Service<Request> for Step<S, F>
where
    S: Service<Request, Response = http::Response<B>, Error = Infallible> + Clone,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    F: Fn(Request) -> Fut,
    Fut: Future<Output = Result<Request, Response>>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = StepFuture<S, Fut>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // Take the service that was driven to readiness, leave a clone.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        StepFuture {
            state: State::Step {
                step: (self.step)(req),
                inner: Some(inner),
            },
        }
    }
}

pin_project! {
    /// Response future of [`Step`].
    pub struct StepFuture<S, Fut>
    where
        S: Service<Request>,
    {
        #[pin]
        state: State<S, Fut>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Fut>
    where
        S: Service<Request>,
    {
        /// The step is running.
        Step {
            #[pin]
            step: Fut,
            inner: Option<S>,
        },
        /// The step let the request through.
        Inner {
            #[pin]
            future: S::Future,
        },
    }
}

impl<S, Fut, B> Future for StepFuture<S, Fut>
where
    S: Service<Request, Response = http::Response<B>, Error = Infallible>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    Fut: Future<Output = Result<Request, Response>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Step { step, inner } => match ready!(step.poll(cx)) {
                    Ok(req) => {
                        let mut inner = inner.take().expect("polled after completion");
                        let future = inner.call(req);
                        state.set(State::Inner { future });
                    }
                    Err(res) => return Poll::Ready(Ok(res)),
                },
                // axum's body type (a body that is one already is not
                // boxed again).
                StateProj::Inner { future } => {
                    let res = ready!(future.poll(cx))?;
                    return Poll::Ready(Ok(res.map(Body::new)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::response::IntoResponse;
    use axum::routing::get;
    use http::StatusCode;
    use tower::ServiceExt;

    use super::*;

    /// A step adds an extension the handler reads, or answers alone.
    #[tokio::test]
    async fn a_step_continues_or_answers() {
        let step = StepLayer::new(|mut req: Request| async move {
            if req.headers().contains_key("x-stop") {
                return Err(StatusCode::IM_A_TEAPOT.into_response());
            }
            req.extensions_mut().insert(7_u32);
            Ok(req)
        });
        let app = Router::new()
            .route(
                "/",
                get(|axum::Extension(n): axum::Extension<u32>| async move { n.to_string() }),
            )
            .route_layer(step);
        let res = app
            .clone()
            .oneshot(Request::get("/").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let body = axum::body::to_bytes(res.into_body(), 64).await.unwrap();
        assert_eq!(&body[..], b"7");
        let stopped = Request::get("/")
            .header("x-stop", "1")
            .body(Body::empty())
            .unwrap();
        let res = app.oneshot(stopped).await.unwrap();
        assert_eq!(res.status(), StatusCode::IM_A_TEAPOT);
    }
}
