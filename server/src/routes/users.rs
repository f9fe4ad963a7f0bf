//! `PUT /api/v1/users/{id}/trust`: staff change a user's trust level.

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use tollgate::tenant::Tx;
use utoipa::ToSchema;
use utoipa_axum::routes;
use uuid::Uuid;

use super::{Class, Route};
use crate::auth::Claims;
use crate::error::AppError;
use crate::state::AppState;
use crate::trust::{Trust, change_level};

/// The route, a write.
pub fn routes() -> Vec<Route> {
    vec![Route::new(Class::Write, routes!(set_trust))]
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
    Extension(current): Extension<Trust>,
    mut tx: Tx,
    id: Result<Path<Uuid>, PathRejection>,
    input: Result<Json<TrustLevel>, JsonRejection>,
) -> Result<Json<TrustLevel>, AppError> {
    let Path(id) = id?;
    let Json(input) = input?;
    let table = state.limits.trust();
    let highest = table.highest();
    let forbidden = || AppError::Forbidden("only the highest trust level may change trust levels");
    // A quick refusal from the request's current level (the lowest when
    // it could not be read) …
    if current != highest {
        return Err(forbidden());
    }
    let level = table
        .parse(&input.trust_level)
        .map_err(|known| AppError::Invalid(vec![format!("trust_level: {known}")]))?;
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
    if caller_level.as_deref() != Some(&*highest.name) {
        return Err(forbidden());
    }
    let cache = state.trust.clone();
    if !change_level(conn, cache.origin(), id, &level).await? {
        return Err(AppError::NotFound);
    }
    // Other replicas hear of it from the commit's NOTIFY; this one drops
    // its entry once the change has committed (earlier, a concurrent
    // lookup could cache the old level again).
    tx.after_commit(move || cache.invalidate(id));
    Ok(Json(input))
}
