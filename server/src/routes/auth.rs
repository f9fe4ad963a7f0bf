//! `POST /auth/login`: e-mail and password for a token.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use tollgate::tenant::TenantId;
use utoipa_axum::routes;

use super::{Class, Route};
use crate::error::AppError;
use crate::state::AppState;

/// `/auth/login`.
pub fn routes() -> Vec<Route> {
    vec![Route::new(Class::Login, routes!(login))]
}

/// The key logins take connections of the tenant pool under (the nil
/// UUID, which no tenant has).
pub const LOGIN_POOL_KEY: TenantId = TenantId::new(Uuid::nil());

/// Credentials.
#[derive(Debug, Deserialize, ToSchema)]
pub struct LoginRequest {
    /// The user's e-mail address (case-insensitive), 1 to 254 characters,
    /// no NUL.
    #[schema(
        example = "ada@example.com",
        min_length = 1,
        max_length = 254,
        pattern = r"^[^\x00]*$"
    )]
    pub email: String,
    /// The user's password, 1 to 1024 characters.
    #[schema(
        example = "correct horse battery staple",
        min_length = 1,
        max_length = 1024
    )]
    pub password: String,
}

/// A bearer token.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    /// A JWT (HS256) carrying subject, tenant and trust level.
    pub access_token: String,
    /// Always `Bearer`.
    #[schema(example = "Bearer")]
    pub token_type: String,
    /// Seconds until it expires.
    pub expires_in: u64,
}

/// Logs in. Wrong password and unknown e-mail get the same answer, in the
/// same time.
#[utoipa::path(
    post, path = "/auth/login", tag = "auth",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "Logged in", body = TokenResponse),
        crate::openapi::BodyErrors,
        (status = 401, description = "Wrong e-mail or password", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many login attempts from this address", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Too many logins in progress (with Retry-After)", body = crate::openapi::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn login(
    State(state): State<AppState>,
    payload: Result<Json<LoginRequest>, JsonRejection>,
) -> Result<Json<TokenResponse>, AppError> {
    let Json(req) = payload?;
    let mut errors = Vec::new();
    // Characters, as the document's maxLength counts them.
    if req.email.is_empty() || req.email.chars().count() > 254 {
        errors.push("email: 1 to 254 characters".to_owned());
    }
    // Postgres text cannot hold NUL: a 422, not a database error.
    if req.email.contains('\0') {
        errors.push("email: must not contain NUL (U+0000)".to_owned());
    }
    // Hashing cost grows with the input; bound it.
    if req.password.is_empty() || req.password.chars().count() > 1024 {
        errors.push("password: 1 to 1024 characters".to_owned());
    }
    if !errors.is_empty() {
        return Err(AppError::Invalid(errors));
    }
    // A place at the hashing gate first: beyond its queue, refuse before
    // touching the database.
    let place = state
        .hashing
        .admit()
        .ok_or(AppError::Busy("too many logins in progress; retry shortly"))?;
    let user: Option<(Uuid, Uuid, String, String)> = {
        // Logins share the tenant pool as one more "tenant", capped like
        // any other, so a login flood cannot take every connection.
        let _permit = state.tenant_pool.acquire(LOGIN_POOL_KEY).await?;
        // In a read-only transaction, as every query behind a pooler
        // (`db::app_options`), and in a task of its own: a login cancelled
        // while BEGIN is on the wire still ends its transaction before the
        // connection is reused.
        let (pool, email) = (state.pool.clone(), req.email.clone());
        tokio::spawn(async move {
            let mut tx = pool.begin_with("BEGIN READ ONLY").await?;
            let user = sqlx::query_as(
                "SELECT user_id, tenant_id, password_hash, trust_level FROM auth_lookup($1)",
            )
            .bind(&email)
            .fetch_optional(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(user)
        })
        .await
        .map_err(|join| sqlx::Error::Protocol(format!("login lookup task: {join}")))??
    };
    let hash = user.as_ref().map(|(_, _, hash, _)| hash.clone());
    // Argon2 runs on a bounded set of blocking threads.
    let ok = state
        .hashing
        .verify(place, hash, req.password)
        .await
        .map_err(|_| AppError::Busy("too many logins in progress; retry shortly"))?;
    match user {
        Some((sub, tenant, _, trust)) if ok => Ok(Json(TokenResponse {
            access_token: state.tokens.issue(sub, tenant, &trust),
            token_type: "Bearer".to_owned(),
            expires_in: state.tokens.ttl().as_secs(),
        })),
        _ => Err(AppError::InvalidCredentials),
    }
}
