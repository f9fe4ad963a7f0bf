//! Bare axum: the same routes and runtime as `tollgate-server`, no layers.
//! The load harness measures every configuration against it.
//!
//! - `GET /api/v1/ping`: the public route, no layers at all;
//! - `GET /api/v1/items`: the tenant route's query in a plain transaction
//!   (no token, no limits, no tenant setting: the tenant is named in the
//!   query, as the owner role that row-level security does not filter), on
//!   a pool sized like the server's. Set `DATABASE_URL` (the owner's URL)
//!   and `TENANT_ID`.
//!
//! Run with `LISTEN_ADDR=127.0.0.1:8090 cargo run --release -p tollgate-server --example baseline`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Json, Router, routing::get};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Clone)]
struct Plain {
    pool: PgPool,
    tenant: Uuid,
}

async fn items(State(plain): State<Option<Plain>>) -> Result<Json<Value>, StatusCode> {
    let plain = plain.ok_or(StatusCode::NOT_FOUND)?;
    let fail = |_| StatusCode::INTERNAL_SERVER_ERROR;
    let mut tx = plain
        .pool
        .begin_with("BEGIN READ ONLY")
        .await
        .map_err(fail)?;
    let rows: Vec<(Uuid, String, String)> = sqlx::query_as(
        "SELECT id, name, body FROM items
          WHERE tenant_id = $1 AND deleted_at IS NULL
          ORDER BY created_at, id LIMIT 21",
    )
    .bind(plain.tenant)
    .fetch_all(&mut *tx)
    .await
    .map_err(fail)?;
    tx.commit().await.map_err(fail)?;
    let items: Vec<Value> = rows
        .into_iter()
        .map(|(id, name, body)| json!({ "id": id, "name": name, "body": body }))
        .collect();
    Ok(Json(json!({ "items": items, "next": null })))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::var("LISTEN_ADDR").unwrap_or_else(|_| "127.0.0.1:8090".to_owned());
    let plain = match (std::env::var("DATABASE_URL"), std::env::var("TENANT_ID")) {
        (Ok(url), Ok(tenant)) => Some(Plain {
            pool: sqlx::postgres::PgPoolOptions::new()
                .max_connections(20)
                .connect(&url)
                .await?,
            tenant: tenant.parse()?,
        }),
        _ => None,
    };
    let app = Router::new()
        .route(
            "/api/v1/ping",
            get(|| async { Json(json!({ "pong": true, "client_ip": "127.0.0.1" })) }),
        )
        .route("/api/v1/items", get(items))
        .with_state(plain);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening addr={}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
