//! The server's routes, each declared once: its handler carries the method,
//! path and documentation (`#[utoipa::path]`), and its module's `routes()`
//! gives it a [`Class`]. The router, the limits ([`Limits`](crate::limits::Limits)
//! by class) and `/openapi.json` are all built from [`all`], so a route's
//! handler, limits and documentation are read in one place.

pub mod api;
pub mod auth;
pub mod items;
pub mod metrics;
pub mod openapi;
pub mod operator;
pub mod probes;
pub mod users;

use utoipa_axum::router::UtoipaMethodRouter;

use crate::error::AppError;
pub use crate::limits::Class;
use crate::state::AppState;

/// One route: its class and what `utoipa_axum::routes!` made of its
/// handler (method, path, documentation, handler).
pub struct Route {
    /// What limits it.
    pub class: Class,
    /// The handler with its method, path and documentation.
    pub handler: UtoipaMethodRouter<AppState>,
}

impl Route {
    /// `handler` (from `routes!`) in `class`.
    pub fn new(class: Class, handler: UtoipaMethodRouter<AppState>) -> Self {
        Self { class, handler }
    }
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let paths: Vec<&String> = self.handler.1.paths.keys().collect();
        f.debug_struct("Route")
            .field("class", &self.class)
            .field("paths", &paths)
            .finish()
    }
}

/// Every route of the server.
pub fn all() -> Vec<Route> {
    [
        probes::routes(),
        metrics::routes(),
        api::routes(),
        openapi::routes(),
        auth::routes(),
        items::routes(),
        users::routes(),
        operator::routes(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Answers unknown paths with a problem body.
pub async fn not_found() -> AppError {
    AppError::NotFound
}
