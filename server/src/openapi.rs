//! The OpenAPI 3 document of the reference server, generated from the
//! handlers' annotations and served at `GET /openapi.json`.

use axum::{Json, Router, routing::get};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::AppState;
use crate::routes::{api, auth, items, users};

/// RFC 9457 problem details, the body of every error.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub struct Problem {
    /// A URI naming the problem type; `about:blank` when the status says it
    /// all.
    #[serde(rename = "type")]
    #[schema(example = "https://tollgate.dev/problems/quota-exceeded")]
    pub type_uri: String,
    /// A short summary.
    #[schema(example = "Too Many Requests")]
    pub title: String,
    /// The HTTP status.
    #[schema(example = 429)]
    pub status: u16,
    /// What went wrong this time.
    pub detail: Option<String>,
    /// 422: every broken rule.
    pub errors: Option<Vec<String>>,
    /// 429: the policies that denied the request.
    #[schema(example = json!(["tenant"]))]
    pub violated_policies: Option<Vec<String>>,
}

/// Errors every tenant route may answer, besides its own.
#[derive(Debug, utoipa::IntoResponses)]
pub enum TenantRouteErrors {
    /// No valid bearer token, or the token names no tenant.
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(Problem),
    /// A row-level security violation.
    #[response(status = 403, content_type = "application/problem+json")]
    Forbidden(Problem),
    /// A limit denied the request (`tenant`, `trust`, `read` or `write`).
    #[response(status = 429, content_type = "application/problem+json")]
    TooManyRequests(Problem),
    /// No database connection was free in time; retry after `Retry-After`.
    #[response(status = 503, content_type = "application/problem+json")]
    Busy(Problem),
}

/// Errors of a route that reads a JSON body.
#[derive(Debug, utoipa::IntoResponses)]
pub enum BodyErrors {
    /// Malformed JSON, or a path or query that does not parse.
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(Problem),
    /// Body over 64 KiB.
    #[response(status = 413, content_type = "application/problem+json")]
    TooLarge(Problem),
    /// Not `application/json`.
    #[response(status = 415, content_type = "application/problem+json")]
    UnsupportedMediaType(Problem),
    /// A missing or invalid field; every broken rule in `errors`.
    #[response(status = 422, content_type = "application/problem+json")]
    Invalid(Problem),
}

/// The operational routes come from `tollgate::health` and the metrics
/// exporter, not from handlers here; these stubs only carry their
/// documentation.
mod operational {
    /// Liveness: 200 while the process runs; touches no dependency.
    #[utoipa::path(get, path = "/health", tag = "operations",
        responses((status = 200, description = "Alive", content_type = "application/health+json")))]
    #[allow(dead_code)]
    fn health() {}

    /// Readiness: 200 when every critical background check passes and the
    /// replica is not draining, else 503; the body names each check.
    #[utoipa::path(get, path = "/ready", tag = "operations",
        responses(
            (status = 200, description = "Ready", content_type = "application/health+json"),
            (status = 503, description = "Not ready (a check fails, or draining)", content_type = "application/health+json"),
        ))]
    #[allow(dead_code)]
    fn ready() {}

    /// Prometheus metrics (text format), unless `METRICS_ADDR` moves them.
    #[utoipa::path(get, path = "/metrics", tag = "operations",
        responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain; version=0.0.4")))]
    #[allow(dead_code)]
    fn metrics() {}

    /// This document.
    #[utoipa::path(get, path = "/openapi.json", tag = "operations",
        responses(
            (status = 200, description = "OpenAPI 3 document", content_type = "application/json"),
            (status = 429, body = super::Problem, content_type = "application/problem+json"),
        ))]
    #[allow(dead_code)]
    fn openapi() {}
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(title = "Tollgate reference server", description = "A small multi-tenant API behind Tollgate's layers: per-IP, per-tenant, trust-level and route-class rate limits, and Postgres row-level security."),
    paths(auth::login, items::list, items::create, items::fetch, items::update, items::remove, users::set_trust, api::ping, operational::health, operational::ready, operational::metrics, operational::openapi),
    components(schemas(Problem, api::Pong, auth::LoginRequest, auth::TokenResponse, items::Item, items::ItemInput, items::ItemPage, users::TrustLevel)),
    modifiers(&BearerAuth),
    tags((name = "auth"), (name = "items", description = "Tenant-scoped; each request runs in a transaction of the token's tenant"), (name = "users", description = "Tenant-scoped; staff only"), (name = "public"), (name = "operations", description = "Probes and metrics; never rate limited (except this document)"))
)]
#[derive(Debug)]
pub struct ApiDoc;

/// `GET /openapi.json`.
pub fn router() -> Router<AppState> {
    let doc = ApiDoc::openapi();
    Router::new().route(
        "/openapi.json",
        get(move || async move { Json(doc.clone()) }),
    )
}
