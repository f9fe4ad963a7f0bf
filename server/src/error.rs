//! [`AppError`]: every error a handler returns, rendered as problem+json.
//! Internal details go to the logs, not to clients.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use tollgate::problem::Problem;
use tollgate::tenant::TenantError;

/// An error a handler answers with.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// No such resource.
    #[error("not found")]
    NotFound,
    /// No valid credentials: 401.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// Authenticated, but not allowed: 403.
    #[error("{0}")]
    Forbidden(&'static str),
    /// Wrong e-mail or password (indistinguishable on purpose): 401.
    #[error("invalid e-mail or password")]
    InvalidCredentials,
    /// A body, query or path that could not be read: its own 4xx.
    #[error("{detail}")]
    Rejected {
        /// 400, 413, 415 or 422.
        status: StatusCode,
        /// What was wrong.
        detail: String,
    },
    /// Well-formed input that breaks a rule: 422 with every broken rule.
    #[error("invalid input: {0:?}")]
    Invalid(Vec<String>),
    /// A bounded resource (password hashing) has no room: 503 with
    /// `Retry-After`.
    #[error("{0}")]
    Busy(&'static str),
    /// From the tenant transaction or a query in it.
    #[error(transparent)]
    Tenant(#[from] TenantError),
}

impl From<sqlx::Error> for AppError {
    fn from(err: sqlx::Error) -> Self {
        Self::Tenant(TenantError::Database(err))
    }
}

macro_rules! from_rejection {
    ($($rejection:ty),*) => {$(
        impl From<$rejection> for AppError {
            fn from(rejection: $rejection) -> Self {
                Self::Rejected { status: rejection.status(), detail: rejection.body_text() }
            }
        }
    )*};
}
from_rejection!(JsonRejection, QueryRejection, PathRejection);

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let problem = match self {
            Self::NotFound => Problem::new(StatusCode::NOT_FOUND, "Not Found")
                .with_detail("no resource at this path"),
            Self::Unauthorized(detail) => {
                Problem::new(StatusCode::UNAUTHORIZED, "Unauthorized").with_detail(detail)
            }
            Self::Forbidden(detail) => {
                Problem::new(StatusCode::FORBIDDEN, "Forbidden").with_detail(detail)
            }
            Self::InvalidCredentials => Problem::new(StatusCode::UNAUTHORIZED, "Unauthorized")
                .with_detail("invalid e-mail or password"),
            Self::Rejected { status, detail } => {
                Problem::new(status, status.canonical_reason().unwrap_or("Bad Request"))
                    .with_detail(detail)
            }
            Self::Invalid(errors) => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid input")
                    .with_detail(errors.join("; "))
                    .with_extension("errors", errors)
            }
            Self::Busy(detail) => {
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, "Busy").with_detail(detail)
            }
            Self::Tenant(err) => return err.into_response(),
        };
        let status = problem.status();
        let mut res = problem.into_http_response().map(axum::body::Body::from);
        if status == StatusCode::UNAUTHORIZED {
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        res
    }
}
