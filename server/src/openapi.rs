//! The OpenAPI 3 document's shared parts: the problem schema, the error
//! sets routes refer to, and the document's frame ([`ApiDoc`]). The paths
//! come from the handlers' annotations, collected from the route
//! declarations when the app is built; `routes::openapi` serves it.

use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

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
    /// Body over 128 KiB.
    #[response(status = 413, content_type = "application/problem+json")]
    TooLarge(Problem),
    /// Not `application/json`.
    #[response(status = 415, content_type = "application/problem+json")]
    UnsupportedMediaType(Problem),
    /// A missing or invalid field; every broken rule in `errors`.
    #[response(status = 422, content_type = "application/problem+json")]
    Invalid(Problem),
}

/// Errors every operator route may answer, besides its own.
#[derive(Debug, utoipa::IntoResponses)]
pub enum OperatorErrors {
    /// No credential, or another than `ADMIN_TOKEN`.
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(Problem),
    /// No such tenant.
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(Problem),
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
        // The operator API's: ADMIN_TOKEN, which no tenant user holds.
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// What the document says besides its paths: title, tags, the bearer
/// scheme. The paths and their schemas come from the route declarations
/// (`routes::all`), when the app is built.
#[derive(OpenApi)]
#[openapi(
    info(title = "Tollgate reference server", description = "A small multi-tenant API behind Tollgate's layers: per-IP, per-tenant, trust-level and route-class rate limits, and Postgres row-level security."),
    components(schemas(Problem)),
    modifiers(&BearerAuth),
    tags((name = "auth"), (name = "items", description = "Tenant-scoped; each request runs in a transaction of the token's tenant"), (name = "users", description = "Tenant-scoped; staff only"), (name = "public"), (name = "operations", description = "Probes and metrics; never rate limited (except this document)"), (name = "operator", description = "Tenants' plans and limit overrides, changed live across the fleet. Served only on ADMIN_ADDR (never on the public listener), to the ADMIN_TOKEN bearer credential"))
)]
#[derive(Debug)]
pub struct ApiDoc;
