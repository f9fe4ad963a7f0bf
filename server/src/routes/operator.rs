//! The operator API: a tenant's plan and limit overrides, read and changed
//! live. Served only on `ADMIN_ADDR` (never on the public listener) and only
//! to `Authorization: Bearer <ADMIN_TOKEN>`, a credential no tenant user
//! holds: a tenant's `staff` token is refused like any other.

use std::net::SocketAddr;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::task::JoinHandle;
use tollgate::tenant::{Access, TenantId, begin};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::{Class, Route};
use crate::error::AppError;
use crate::plans::{self, LimitName, TenantPlan};
use crate::state::AppState;

/// `/admin/tenants/{id}/plan` and `/admin/tenants/{id}/limits/{limit}`.
pub fn routes() -> Vec<Route> {
    vec![
        Route::new(Class::Operator, routes!(show_plan, set_plan)),
        Route::new(Class::Operator, routes!(set_limit, clear_limit)),
    ]
}

/// `PUT /admin/tenants/{id}/plan`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPlan {
    /// One of `TENANT_PLANS`.
    #[schema(example = "pro", max_length = 32)]
    pub plan: String,
}

/// `PUT /admin/tenants/{id}/limits/{limit}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetLimit {
    /// A quota (`N/PERIOD[,burst=B]`) for `tenant`, `read` and `write`; a
    /// whole number above 0 or `unlimited` for `concurrency`.
    #[schema(example = "100/min,burst=20", max_length = 100)]
    pub quota: String,
}

/// A tenant's plan, overrides and the limits in force.
#[utoipa::path(get, path = "/admin/tenants/{id}/plan", tag = "operator",
    params(("id" = Uuid, Path, description = "The tenant")),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The tenant's plan", body = TenantPlan),
        (status = 400, description = "Not a tenant id", body = crate::openapi::Problem, content_type = "application/problem+json"),
        crate::openapi::OperatorErrors,
    ))]
pub async fn show_plan(
    State(state): State<AppState>,
    id: Result<Path<Uuid>, axum::extract::rejection::PathRejection>,
) -> Result<Json<TenantPlan>, AppError> {
    let Path(id) = id?;
    run(&state, id, Op::Show).await
}

/// Moves the tenant to another plan; every replica applies it within a
/// second (or `PLAN_CACHE_TTL` when its listener is down).
#[utoipa::path(put, path = "/admin/tenants/{id}/plan", tag = "operator",
    params(("id" = Uuid, Path, description = "The tenant")),
    request_body = SetPlan,
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The tenant's plan after the change", body = TenantPlan),
        crate::openapi::BodyErrors,
        crate::openapi::OperatorErrors,
    ))]
pub async fn set_plan(
    State(state): State<AppState>,
    id: Result<Path<Uuid>, axum::extract::rejection::PathRejection>,
    body: Result<Json<SetPlan>, JsonRejection>,
) -> Result<Json<TenantPlan>, AppError> {
    let Path(id) = id?;
    let Json(body) = body?;
    let plan = state
        .plans
        .table()
        .parse(body.plan.trim())
        .map_err(|err| AppError::Invalid(vec![format!("plan: {err}")]))?;
    run(&state, id, Op::SetPlan(plan)).await
}

/// Overrides one of the tenant's limits (it wins over the plan's).
#[utoipa::path(put, path = "/admin/tenants/{id}/limits/{limit}", tag = "operator",
    params(
        ("id" = Uuid, Path, description = "The tenant"),
        ("limit" = String, Path, description = "tenant, read, write or concurrency"),
    ),
    request_body = SetLimit,
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The tenant's plan after the change", body = TenantPlan),
        crate::openapi::BodyErrors,
        crate::openapi::OperatorErrors,
    ))]
pub async fn set_limit(
    State(state): State<AppState>,
    path: Result<Path<(Uuid, String)>, axum::extract::rejection::PathRejection>,
    body: Result<Json<SetLimit>, JsonRejection>,
) -> Result<Json<TenantPlan>, AppError> {
    let Path((id, limit)) = path?;
    let Json(body) = body?;
    let limit = LimitName::parse(&limit).map_err(|err| AppError::Invalid(vec![err]))?;
    plans::parse_value(limit, &body.quota).map_err(|err| AppError::Invalid(vec![err]))?;
    run(&state, id, Op::SetLimit(limit, Some(body.quota))).await
}

/// Clears the tenant's override of a limit: the plan's applies again.
#[utoipa::path(delete, path = "/admin/tenants/{id}/limits/{limit}", tag = "operator",
    params(
        ("id" = Uuid, Path, description = "The tenant"),
        ("limit" = String, Path, description = "tenant, read, write or concurrency"),
    ),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The tenant's plan after the change", body = TenantPlan),
        (status = 400, description = "Not a tenant id", body = crate::openapi::Problem, content_type = "application/problem+json"),
        crate::openapi::OperatorErrors,
        (status = 422, description = "Not one of the four limits", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ))]
pub async fn clear_limit(
    State(state): State<AppState>,
    path: Result<Path<(Uuid, String)>, axum::extract::rejection::PathRejection>,
) -> Result<Json<TenantPlan>, AppError> {
    let Path((id, limit)) = path?;
    let limit = LimitName::parse(&limit).map_err(|err| AppError::Invalid(vec![err]))?;
    run(&state, id, Op::SetLimit(limit, None)).await
}

/// What an operator request does.
enum Op {
    Show,
    SetPlan(usize),
    SetLimit(LimitName, Option<String>),
}

/// Runs `op` in a transaction of tenant `id` on the system pool, in a task
/// of its own: a client that goes away cannot stop it between COMMIT and
/// dropping this replica's entry (its own NOTIFY is ignored). 404 when the
/// tenant does not exist; nothing is changed unless all of it is.
async fn run(state: &AppState, id: Uuid, op: Op) -> Result<Json<TenantPlan>, AppError> {
    let pool = state.system_pool.clone();
    let cache = state.plans.cache().clone();
    let table = state.plans.table().clone();
    let shown = tokio::spawn(async move {
        let origin = cache.origin();
        let mut tx = begin(&pool, TenantId::new(id), Access::ReadWrite).await?;
        let shown = match op {
            Op::Show => plans::show(&mut tx, &table, id).await?,
            Op::SetPlan(plan) => plans::set_plan(&mut tx, &table, origin, id, plan).await?,
            Op::SetLimit(limit, value) => {
                plans::set_limit(&mut tx, &table, origin, id, limit, value.as_deref()).await?
            }
        };
        tx.commit().await?;
        cache.invalidate(&id);
        Ok::<_, sqlx::Error>(shown)
    })
    .await
    .map_err(|_| AppError::Busy("the change did not complete; retry"))??;
    shown.map(Json).ok_or(AppError::NotFound)
}

/// Refuses every request without `Authorization: Bearer <ADMIN_TOKEN>`.
async fn require_admin(
    State(token): State<std::sync::Arc<str>>,
    req: Request,
    next: Next,
) -> Response {
    let given = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
        return AppError::Unauthorized("the operator API needs ADMIN_TOKEN").into_response();
    }
    next.run(req).await
}

/// Equal, in a time that does not depend on where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The operator API as a router (tests drive it with `oneshot`); `None`
/// without `ADMIN_TOKEN`.
pub fn app(state: &AppState) -> Option<Router> {
    let token: std::sync::Arc<str> = state.config.admin_token.as_deref()?.into();
    let router: Router = routes()
        .into_iter()
        .fold(OpenApiRouter::new(), |router, route| {
            router.routes(route.handler)
        })
        .fallback(super::not_found)
        .layer(axum::middleware::from_fn_with_state(token, require_admin))
        .with_state(state.clone())
        .into();
    Some(router)
}

/// Serves the operator API on `addr` until aborted.
pub async fn spawn(state: &AppState, addr: SocketAddr) -> std::io::Result<JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = app(state).ok_or_else(|| std::io::Error::other("ADMIN_ADDR needs ADMIN_TOKEN"))?;
    tracing::info!(operator_api_on = %listener.local_addr()?, "operator API listening");
    Ok(tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(%err, "operator API listener failed");
        }
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(super::constant_time_eq(b"abc", b"abc"));
        assert!(!super::constant_time_eq(b"abc", b"abd"));
        assert!(!super::constant_time_eq(b"abc", b"abcd"));
        assert!(!super::constant_time_eq(b"", b"a"));
    }
}
