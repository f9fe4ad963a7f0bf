//! [`StepLayer`]: one step of the authenticated stack (the token, the
//! tenant's plan, the current trust level) before the rest of it.
//!
//! A step looks at the request, adds to its extensions, and either lets
//! it continue or answers it, now or (on a cache miss) later.
//! `axum::middleware::from_fn` does the same at three allocations a step
//! on every request (its future, the rest of the stack boxed into `Next`,
//! and that box's future) plus a clone of its state. This layer calls the
//! inner service at once when the step decided at once, and keeps a
//! step that must wait inline in its response future; only then does it
//! clone the inner service, which behind axum's routes is an allocation
//! for every route box inside it.

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

/// What a step decided about a request: `Ok(request)` continues to the
/// inner service, `Err(response)` answers without it.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "returned and matched at once, never stored: boxing the request would cost what the layer saves"
)]
pub enum Next<Fut> {
    /// Decided now (say, from a cache).
    Now(Result<Request, Response>),
    /// Decided when `Fut` is ready (say, after a lookup in Postgres).
    Later(Fut),
}

/// The [`Next`] of a step that always decides at once:
/// `Decided::Now(result)`.
pub type Decided = Next<std::future::Ready<Result<Request, Response>>>;

/// Runs `step` on each request and continues or answers as it decides.
///
/// ```
/// use axum::{Router, extract::Request, response::IntoResponse, routing::get};
/// use http::StatusCode;
/// use tollgate_server::step::{Decided, StepLayer};
///
/// // Only requests that name a region get through; the handler reads it.
/// #[derive(Clone)]
/// struct Region(String);
///
/// let app: Router = Router::new()
///     .route("/", get(|axum::Extension(Region(r)): axum::Extension<Region>| async move { r }))
///     .route_layer(StepLayer::new(|mut req: Request| {
///         let region = req.headers().get("x-region").and_then(|v| v.to_str().ok());
///         let Some(region) = region.map(str::to_owned) else {
///             return Decided::Now(Err(StatusCode::BAD_REQUEST.into_response()));
///         };
///         req.extensions_mut().insert(Region(region));
///         // A step that must wait returns `Next::Later(future)`.
///         Decided::Now(Ok(req))
///     }));
/// # let _ = app;
/// ```
#[derive(Debug, Clone)]
pub struct StepLayer<F> {
    step: F,
}

impl<F> StepLayer<F> {
    /// A layer running `step`, a `Fn(Request) -> Next<impl Future<Output =
    /// Result<Request, Response>>>`.
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
    F: Fn(Request) -> Next<Fut>,
    Fut: Future<Output = Result<Request, Response>>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = StepFuture<S, Fut>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let state = match (self.step)(req) {
            Next::Now(Ok(req)) => State::Inner {
                future: self.inner.call(req),
            },
            Next::Now(Err(res)) => State::Answered {
                response: Some(res),
            },
            Next::Later(step) => {
                // Called later: take the service that was driven to
                // readiness, leave a clone.
                let clone = self.inner.clone();
                State::Step {
                    step,
                    inner: Some(std::mem::replace(&mut self.inner, clone)),
                }
            }
        };
        StepFuture { state }
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
        /// The step is waiting.
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
        /// The step answered.
        Answered {
            response: Option<Response>,
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
                StateProj::Answered { response } => {
                    let res = response.take().expect("polled after completion");
                    return Poll::Ready(Ok(res));
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

    /// A step adds an extension the handler reads, or answers alone, at
    /// once or after waiting.
    #[tokio::test]
    async fn a_step_continues_or_answers_now_or_later() {
        type Later = Pin<Box<dyn Future<Output = Result<Request, Response>> + Send>>;
        let step = StepLayer::new(|mut req: Request| -> Next<Later> {
            let later = req.headers().contains_key("x-later");
            if req.headers().contains_key("x-stop") {
                if later {
                    return Next::Later(Box::pin(async {
                        tokio::task::yield_now().await;
                        Err(StatusCode::GONE.into_response())
                    }));
                }
                return Next::Now(Err(StatusCode::IM_A_TEAPOT.into_response()));
            }
            if later {
                return Next::Later(Box::pin(async move {
                    tokio::task::yield_now().await;
                    req.extensions_mut().insert(8_u32);
                    Ok(req)
                }));
            }
            req.extensions_mut().insert(7_u32);
            Next::Now(Ok(req))
        });
        let app = Router::new()
            .route(
                "/",
                get(|axum::Extension(n): axum::Extension<u32>| async move { n.to_string() }),
            )
            .route_layer(step);
        for (headers, status, body) in [
            (&[][..], StatusCode::OK, "7"),
            (&["x-later"][..], StatusCode::OK, "8"),
            (&["x-stop"][..], StatusCode::IM_A_TEAPOT, ""),
            (&["x-stop", "x-later"][..], StatusCode::GONE, ""),
        ] {
            let mut req = Request::get("/");
            for name in headers {
                req = req.header(*name, "1");
            }
            let res = app
                .clone()
                .oneshot(req.body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(res.status(), status, "{headers:?}");
            let got = axum::body::to_bytes(res.into_body(), 64).await.unwrap();
            assert_eq!(&got[..], body.as_bytes(), "{headers:?}");
        }
    }
}
