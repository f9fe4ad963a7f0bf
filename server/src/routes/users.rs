//! `PUT /api/v1/users/{id}/trust`: staff change a user's trust level.

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::{Extension, Json, Router, routing::put};
use serde::{Deserialize, Serialize};
use tollgate::rate_limit::RateLimitLayer;
use tollgate::tenant::Tx;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::AppState;
use crate::auth::Claims;
use crate::error::AppError;
use crate::store::AppStore;
use crate::trust::{TrustChanged, notify};

/// The route, under the write class's limits.
pub fn router(write: RateLimitLayer<AppStore>) -> Router<AppState> {
    Router::new().route(
        "/api/v1/users/{id}/trust",
        put(set_trust).route_layer(write),
    )
}

/// A trust level.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrustLevel {
    /// One of `TRUST_LEVELS`.
    #[schema(example = "basic")]
    pub trust_level: String,
}

/// Changes a user's trust level (same tenant only). The caller must hold
/// the highest level (the last of `TRUST_LEVELS`, `staff` by default). Every
/// replica applies it within a second (`LISTEN/NOTIFY`), or at the latest
/// after `TRUST_CACHE_TTL`.
#[utoipa::path(
    put, path = "/api/v1/users/{id}/trust", tag = "users",
    params(("id" = Uuid, Path, description = "The user's id")),
    request_body = TrustLevel,
    security(("bearer" = [])),
    responses(
        (status = 200, body = TrustLevel),
        (status = 404, description = "No such user in this tenant", body = crate::openapi::Problem, content_type = "application/problem+json"),
        crate::openapi::BodyErrors,
        crate::openapi::TenantRouteErrors,
    )
)]
pub async fn set_trust(
    State(state): State<AppState>,
    Extension(claims): Extension<Claims>,
    mut tx: Tx,
    id: Result<Path<Uuid>, PathRejection>,
    input: Result<Json<TrustLevel>, JsonRejection>,
) -> Result<impl IntoResponse, AppError> {
    let Path(id) = id?;
    let Json(input) = input?;
    let levels = &state.config.limits.trust;
    let highest = levels.last().map(|(l, _)| l.as_str());
    let forbidden = || AppError::Forbidden("only the highest trust level may change trust levels");
    // A quick refusal from the request's level (current, or the lowest
    // when it could not be read) …
    if highest != Some(claims.trust.as_str()) {
        return Err(forbidden());
    }
    if state
        .config
        .limits
        .trust_quota(&input.trust_level)
        .is_none()
    {
        let known: Vec<&str> = levels.iter().map(|(l, _)| l.as_str()).collect();
        return Err(AppError::Invalid(vec![format!(
            "trust_level: one of {}",
            known.join(", ")
        )]));
    }
    // … but the decision is made on the caller's level as stored, read in
    // this transaction and held (FOR SHARE) until it commits: a cached or
    // token level cannot grant a privilege the user has lost, nor can the
    // caller be demoted between this check and the change.
    let conn = tx.conn().await?;
    let caller_level: Option<String> =
        sqlx::query_scalar("SELECT trust_level FROM users WHERE id = $1 FOR SHARE")
            .bind(claims.sub)
            .fetch_optional(&mut *conn)
            .await?;
    if caller_level.as_deref() != highest {
        return Err(forbidden());
    }
    let updated = sqlx::query("UPDATE users SET trust_level = $2 WHERE id = $1")
        .bind(id)
        .bind(&input.trust_level)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if updated == 0 {
        return Err(AppError::NotFound);
    }
    // Same transaction: other replicas hear of it only if it commits.
    notify(conn, state.trust.origin(), id).await?;
    Ok((Extension(TrustChanged(id)), Json(input)))
}
