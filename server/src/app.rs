//! [`app`]: the router, built from the route declarations, wrapped in the
//! request-wide layers.

use std::convert::Infallible;

use axum::Router;
use axum::body::Body;
use axum::extract::DefaultBodyLimit;
use axum::http::Request;
use axum::response::{IntoResponse, Response};
use tollgate::client_ip::SetClientIpLayer;
use tollgate::health::Readiness;
use tollgate::metrics::HttpMetricsLayer;
use tollgate::tenant::{FromClaims, TenantLayer};
use tollgate::timeout::{BodyTimeoutLayer, RequestTimeoutLayer};
use tower::{Service, ServiceBuilder};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use utoipa_axum::router::OpenApiRouter;

use crate::access_log::AccessLogLayer;
use crate::auth::{self, Claims};
use crate::openapi::ApiDoc;
use crate::plans;
use crate::routes::{self, Class, Route};
use crate::state::AppState;
use crate::step::{Decided, StepLayer};
use crate::trust::{self, CurrentTrust};

/// Largest request body the API reads (413 above): room for the largest
/// body the OpenAPI document allows, an item of 200 + 10 000 characters,
/// even when every character is JSON-escaped as a surrogate pair
/// (`\uD83D\uDE00`, 12 bytes): 122 400 bytes and the punctuation. A
/// smaller limit refused schema-valid requests (Schemathesis found it).
pub const BODY_LIMIT: usize = 128 * 1024;

/// The server as one service (tests drive it with `oneshot`).
///
/// Request-wide layers, outermost first: metrics → request id → access log →
/// request deadline → client IP → body deadline → body limit →
/// `Connection: close` while draining. They wrap the router as one service
/// instead of being added with `Router::layer`, which would box and clone
/// the whole stack for every route on every request (the metrics layer
/// matches the route templates itself for the same reason).
///
/// Each route gets its class's rate-limit layer ([`Limits::layer`](crate::limits::Limits::layer)).
/// Authenticated routes share, outermost first: authentication → the
/// tenant's plan → concurrency per tenant and user → current trust level → load shedding
/// by level → tenant transaction → the route's limits → handler. The
/// transaction begins only when the handler asks for it (after reading its
/// body), so neither a rejected request nor a slow client holds a database
/// connection.
pub fn app(
    state: AppState,
) -> impl Service<Request<Body>, Response = Response, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    let config = &state.config;
    let limits = &state.limits;
    let metrics_elsewhere = config.metrics_addr.is_some();
    let mut open = OpenApiRouter::with_openapi(<ApiDoc as utoipa::OpenApi>::openapi());
    let mut authenticated = OpenApiRouter::new();
    // Documented but served elsewhere (`/metrics` on `METRICS_ADDR`).
    let mut elsewhere = utoipa::openapi::path::Paths::new();
    // The authenticated stack, built once (its layers share their state
    // across routes: the in-flight counts, the caches) and given each
    // route with its class's limits innermost, as one `route_layer`: each
    // `route_layer` call boxes the route again, and axum clones every box
    // and boxes every future per request.
    let authenticated_layers = ServiceBuilder::new()
        // Steps rather than `from_fn`: see `step.rs`.
        .layer(StepLayer::new({
            let tokens = state.tokens.clone();
            move |req| Decided::Now(auth::require_auth(&tokens, req))
        }))
        // The tenant's plan sets its concurrency and quotas.
        .layer(StepLayer::new({
            let plans = state.plans.clone();
            move |req| plans::current_plan(&plans, req)
        }))
        .layer(limits.concurrency())
        // The level in the token may be stale: limits and shedding use
        // the current one.
        .layer(StepLayer::new({
            let current = CurrentTrust {
                levels: state.trust.clone(),
                table: limits.trust().clone(),
            };
            move |req| trust::current_trust(&current, req)
        }))
        .layer(limits.shed(state.tenant_pool.clone()))
        .layer(TenantLayer::new(
            state.tenant_pool.clone(),
            FromClaims::<Claims>::new(),
        ));
    let authenticated_stack = |class_limits| {
        authenticated_layers
            .clone()
            .layer(class_limits)
            .map_response(IntoResponse::into_response)
    };
    let mut layers = std::collections::HashMap::new();
    for Route {
        class,
        handler: (schemas, paths, method_router),
    } in routes::all()
    {
        // The operator API is only ever on ADMIN_ADDR.
        if class == Class::Operator || (class == Class::Admin && metrics_elsewhere) {
            elsewhere.paths.extend(paths.paths);
            continue;
        }
        // One layer per class, shared by its routes (policies built once).
        let layer = layers
            .entry(class)
            .or_insert_with(|| limits.layer(class))
            .clone();
        // `route_layer`: only requests that match are counted.
        let method_router = if class.is_authenticated() {
            // The class's limits come with the authentication: an
            // authenticated class without them would leave its routes
            // open, so that stops the server here (`Limits::layer` gives
            // every authenticated class its limits).
            let limits = layer.expect("an authenticated route class has rate limits");
            method_router.route_layer(authenticated_stack(limits))
        } else if let Some(layer) = layer {
            method_router.route_layer(layer)
        } else {
            method_router
        };
        let handler = (schemas, paths, method_router);
        if class.is_authenticated() {
            authenticated = authenticated.routes(handler);
        } else {
            open = open.routes(handler);
        }
    }
    let (router, mut doc) = open.merge(authenticated).split_for_parts();
    // Labels by the templates served here, matched outside the router.
    let metrics = HttpMetricsLayer::new()
        .with_routes(doc.paths.paths.keys())
        .expect("route templates axum accepted");
    doc.paths.paths.extend(elsewhere.paths);
    let _ = state
        .openapi
        .set(serde_json::to_vec(&doc).unwrap_or_default().into());

    let readiness = state.readiness.clone();
    let proxies = config.trusted_proxies.clone();
    let http = config.http;
    let access_log = config.access_log;
    let router: Router = router.fallback(routes::not_found).with_state(state);
    ServiceBuilder::new()
        // axum::serve wants axum's body type.
        .map_response(|res: http::Response<_>| res.map(Body::new))
        // Outside the router (it matches the templates itself), so every
        // answer is counted: 404s, 429s, a deadline's 503.
        .layer(metrics)
        .layer(SetRequestIdLayer::x_request_id(MakeUuid))
        .layer(AccessLogLayer::new(access_log))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(RequestTimeoutLayer::optional(http.request_timeout))
        .layer(SetClientIpLayer::new(proxies))
        .layer(BodyTimeoutLayer::optional(http.body_read_timeout))
        .map_request(|req: Request<_>| req.map(Body::new))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .map_response(move |res| close_when_draining(&readiness, problem_for_bare_405(res)))
        .service(router)
}

/// A random UUID per request, as tower-http's `MakeRequestUuid`, written
/// into an array instead of through `fmt` and a `String`, and owned by
/// its `Bytes`: the id is cloned into the request's extensions and the
/// response, and a clone of such `Bytes` is a reference count where one
/// of copied bytes allocates a shared header the first time.
#[derive(Debug, Clone, Copy)]
struct MakeUuid;

impl MakeRequestId for MakeUuid {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let mut text = [0; uuid::fmt::Hyphenated::LENGTH];
        uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
        let text = bytes::Bytes::from_owner(text);
        http::HeaderValue::from_maybe_shared(text)
            .ok()
            .map(RequestId::new)
    }
}

/// axum answers a path it knows with a method it has no route for by an
/// empty 405 (with `Allow`): give it the problem body every other error
/// has, keeping `Allow`. Here rather than as each route's method fallback:
/// routes sharing a path are merged, and axum refuses to merge two
/// method routers that both have a fallback.
fn problem_for_bare_405(res: Response) -> Response {
    use http::header::{ALLOW, CONTENT_TYPE};
    if res.status() != http::StatusCode::METHOD_NOT_ALLOWED
        || res.headers().contains_key(CONTENT_TYPE)
    {
        return res;
    }
    let allow = res.headers().get(ALLOW).cloned();
    let mut problem =
        tollgate::problem::Problem::new(http::StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
            .with_detail("this path does not take this method; see the Allow header")
            .into_response();
    if let Some(allow) = allow {
        problem.headers_mut().insert(ALLOW, allow);
    }
    problem
}

/// While draining, asks clients to close their connection after this
/// response, so keep-alive clients reconnect through the load balancer to
/// another replica.
fn close_when_draining(readiness: &Readiness, mut res: Response) -> Response {
    if readiness.is_draining() {
        res.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    res
}
