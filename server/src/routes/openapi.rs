//! `GET /openapi.json`: the document built from the route declarations.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, header};
use utoipa_axum::routes;

use super::{Class, Route};
use crate::state::AppState;

/// `/openapi.json`, limited like the public API.
pub fn routes() -> Vec<Route> {
    vec![Route::new(Class::Public, routes!(document))]
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses(
        (status = 200, description = "OpenAPI 3 document", content_type = "application/json"),
        (status = 429, body = crate::openapi::Problem, content_type = "application/problem+json"),
    ))]
pub async fn document(State(state): State<AppState>) -> Response {
    let body = state.openapi.get().cloned().unwrap_or_default();
    let mut res = body.into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}
