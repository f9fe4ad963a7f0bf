//! The server's routes.

pub mod api;
pub mod auth;
pub mod items;
pub mod metrics;
pub mod users;

use crate::error::AppError;

/// Answers unknown paths with a problem body.
pub async fn not_found() -> AppError {
    AppError::NotFound
}
