//! The plain transaction the tenant route is measured against: the same
//! list query and response, without token, limits or tenant setting (the
//! tenant is a query parameter, run as the owner role that row-level
//! security does not filter), for the load harness (`examples/baseline.rs`)
//! and the instruction count (`examples/instructions.rs`).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use sqlx::PgPool;
use tollgate_server::routes::items::{Item, ItemPage};
use uuid::Uuid;

/// The owner's pool and the tenant whose items are listed.
#[derive(Clone)]
pub(crate) struct Plain {
    pub(crate) pool: PgPool,
    pub(crate) tenant: Uuid,
    /// Answer before the `COMMIT` has come back, as the tenant route does
    /// for a read-only transaction (the harness's row that compares them).
    pub(crate) commit_after_response: bool,
}

/// `GET /api/v1/items` in a plain transaction.
pub(crate) async fn items(
    State(plain): State<Option<Plain>>,
) -> Result<Json<ItemPage>, StatusCode> {
    let plain = plain.ok_or(StatusCode::NOT_FOUND)?;
    let fail = |_| StatusCode::INTERNAL_SERVER_ERROR;
    let mut tx = plain
        .pool
        .begin_with("BEGIN READ ONLY")
        .await
        .map_err(fail)?;
    // The server's query for a first page of 20 (`items::LIST_FIRST_PAGE`),
    // with the tenant as a parameter instead of row-level security.
    let mut items: Vec<Item> = sqlx::query_as(
        "SELECT id, name, body, created_at, updated_at FROM items
          WHERE tenant_id = $2 AND deleted_at IS NULL
          ORDER BY created_at, id
          LIMIT $1",
    )
    .bind(21_i64)
    .bind(plain.tenant)
    .fetch_all(&mut *tx)
    .await
    .map_err(fail)?;
    if plain.commit_after_response {
        tokio::spawn(async move { tx.commit().await });
    } else {
        tx.commit().await.map_err(fail)?;
    }
    let next = if items.len() > 20 {
        items.truncate(20);
        items.last().map(|i| i.id)
    } else {
        None
    };
    Ok(Json(ItemPage { items, next }))
}
