//! RFC 9457 problem details (`application/problem+json`), the body of every
//! response a Tollgate layer produces on its own (429, 400, 401, 503).
//!
//! ```
//! use tollgate::problem::Problem;
//!
//! let problem = Problem::new(http::StatusCode::BAD_REQUEST, "Invalid tenant")
//!     .with_detail("the tenant id is not a UUID");
//! let res = problem.into_http_response();
//! assert_eq!(res.status(), 400);
//! assert_eq!(res.headers()["content-type"], "application/problem+json");
//! ```
//!
//! It is an axum response too, so your own middleware and handlers can
//! answer with one:
//!
//! ```
//! use axum::{extract::Request, middleware::Next, response::{IntoResponse, Response}};
//! use tollgate::problem::Problem;
//!
//! async fn require_api_key(req: Request, next: Next) -> Response {
//!     if req.headers().contains_key("x-api-key") {
//!         next.run(req).await
//!     } else {
//!         Problem::new(http::StatusCode::UNAUTHORIZED, "Unauthorized")
//!             .with_detail("send an x-api-key header")
//!             .into_response()
//!     }
//! }
//! # let _ = axum::middleware::from_fn::<_, (Request,)>(require_api_key);
//! ```

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;

/// The media type of problem details.
pub const CONTENT_TYPE: &str = "application/problem+json";

/// A problem details object (RFC 9457).
///
/// Fields a client may act on are typed; anything else goes in
/// [`with_extension`](Problem::with_extension).
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    type_uri: &'static str,
    title: &'static str,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    #[serde(flatten)]
    extensions: serde_json::Map<String, serde_json::Value>,
}

impl Problem {
    /// A problem of type `about:blank`: the status code says it all.
    pub fn new(status: StatusCode, title: &'static str) -> Self {
        Self {
            type_uri: "about:blank",
            title,
            status: status.as_u16(),
            detail: None,
            extensions: serde_json::Map::new(),
        }
    }

    /// Sets the problem type URI.
    #[must_use]
    pub fn with_type(mut self, type_uri: &'static str) -> Self {
        self.type_uri = type_uri;
        self
    }

    /// Sets a human-readable explanation of this occurrence.
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Adds an extension member.
    #[must_use]
    pub fn with_extension(mut self, name: &str, value: impl Into<serde_json::Value>) -> Self {
        self.extensions.insert(name.to_owned(), value.into());
        self
    }

    /// The HTTP status code.
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The serialized JSON body.
    pub fn to_bytes(&self) -> Bytes {
        // Serializing strings, numbers and JSON values cannot fail.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Renders the problem as a response with a body of [`Bytes`] (for
    /// tower services with their own body type; in axum, use
    /// [`IntoResponse`](axum::response::IntoResponse)).
    pub fn into_http_response(self) -> Response<Bytes> {
        let mut res = Response::new(self.to_bytes());
        *res.status_mut() = self.status();
        res.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        res
    }
}

impl axum::response::IntoResponse for Problem {
    fn into_response(self) -> axum::response::Response {
        self.into_http_response().map(axum::body::Body::from)
    }
}
