//! [`AppError`]: every error a handler returns, rendered as problem+json.
//! Internal details go to the logs, not to clients.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use tollgate::problem::Problem;

/// An error a handler answers with.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// No such resource.
    #[error("not found")]
    NotFound,
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let problem = match self {
            Self::NotFound => Problem::new(StatusCode::NOT_FOUND, "Not Found")
                .with_detail("no resource at this path"),
        };
        problem.into_response().map(axum::body::Body::from)
    }
}
