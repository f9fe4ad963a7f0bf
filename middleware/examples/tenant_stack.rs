//! The authenticated half of a Tollgate stack, runnable against the local
//! Postgres of `scripts/services.sh`:
//!
//! client IP → authentication (here a demo: claims from `x-demo-tenant`;
//! use a verified token in real code) → `TenantLayer` → per-tenant limit →
//! handlers that query through row-level security.
//!
//! ```sh
//! cargo run -p tollgate --all-features --example tenant_stack
//! curl -s -XPOST localhost:3001/notes -H 'x-demo-tenant: 0b9e3d4c-7c0e-4a55-9d8e-3f0a1b2c3d4e' -d hello
//! curl -s localhost:3001/notes -H 'x-demo-tenant: 0b9e3d4c-7c0e-4a55-9d8e-3f0a1b2c3d4e'   # ["hello"]
//! curl -s localhost:3001/notes -H 'x-demo-tenant: 6f1d2c3b-4a59-4e8d-9c7b-1a2b3c4d5e6f'   # []
//! ```

use std::net::SocketAddr;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use http::StatusCode;
use sqlx::Connection;
use tollgate::client_ip::{SetClientIpLayer, TrustedProxies};
use tollgate::rate_limit::{Key, KeyRejection, MemoryStore, Policy, Quota, RateLimitLayer};
use tollgate::tenant::{
    FromClaims, TenantClaims, TenantError, TenantId, TenantLayer, TenantRejection, Tx,
};

const OWNER: &str = "postgres://tollgate_owner:tollgate_owner@127.0.0.1:5432";
const APP: &str = "postgres://tollgate_app:tollgate_app@127.0.0.1:5432";

#[derive(Clone)]
struct Claims {
    tenant: String,
}

impl TenantClaims for Claims {
    fn tenant(&self) -> Result<TenantId, TenantRejection> {
        self.tenant.parse()
    }
}

/// Demo authentication: trusts a header. Never do this in production.
async fn demo_auth(mut req: Request, next: Next) -> Response {
    if let Some(tenant) = req
        .headers()
        .get("x-demo-tenant")
        .and_then(|v| v.to_str().ok())
    {
        let claims = Claims {
            tenant: tenant.to_owned(),
        };
        req.extensions_mut().insert(claims);
    }
    next.run(req).await
}

async fn list(mut tx: Tx) -> Result<Json<Vec<String>>, TenantError> {
    // No WHERE clause: row-level security shows this tenant's rows only.
    let bodies = sqlx::query_scalar("SELECT body FROM notes ORDER BY id")
        .fetch_all(tx.conn().await?)
        .await?;
    Ok(Json(bodies))
}

async fn add(mut tx: Tx, body: String) -> Result<StatusCode, TenantError> {
    sqlx::query("INSERT INTO notes (body) VALUES ($1)")
        .bind(body)
        .execute(tx.conn().await?)
        .await?;
    Ok(StatusCode::CREATED) // below 400: the layer commits
}

/// A scratch database with one tenant-scoped table, made by the owner role.
async fn scratch_database() -> Result<(), sqlx::Error> {
    let mut admin = sqlx::PgConnection::connect(&format!("{OWNER}/postgres")).await?;
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'tollgate_example')",
    )
    .fetch_one(&mut admin)
    .await?;
    if exists {
        return Ok(());
    }
    sqlx::raw_sql("CREATE DATABASE tollgate_example")
        .execute(&mut admin)
        .await?;
    let mut owner = sqlx::PgConnection::connect(&format!("{OWNER}/tollgate_example")).await?;
    sqlx::raw_sql(
        "CREATE TABLE notes (
             id bigserial PRIMARY KEY,
             tenant_id uuid NOT NULL DEFAULT nullif(current_setting('app.tenant_id', true), '')::uuid,
             body text NOT NULL CHECK (length(body) <= 1000));
         ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
         ALTER TABLE notes FORCE ROW LEVEL SECURITY;
         CREATE POLICY tenant_isolation ON notes
             USING (tenant_id = nullif(current_setting('app.tenant_id', true), '')::uuid)
             WITH CHECK (tenant_id = nullif(current_setting('app.tenant_id', true), '')::uuid);
         GRANT SELECT, INSERT ON notes TO tollgate_app;
         GRANT USAGE ON SEQUENCE notes_id_seq TO tollgate_app;",
    )
    .execute(&mut owner)
    .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    scratch_database().await?;
    let pool = sqlx::PgPool::connect(&format!("{APP}/tollgate_example")).await?;
    tollgate::tenant::audit(&pool).await?;

    let per_tenant = Policy::new(
        "tenant",
        |req: &http::request::Parts| {
            req.extensions
                .get::<Claims>()
                .map(|c| Some(Key::from(c.tenant.as_str())))
                .ok_or_else(|| KeyRejection::unauthorized("sign in first"))
        },
        Quota::per_minute(60),
    );
    let app = Router::new()
        .route("/notes", get(list).post(add))
        .route_layer(RateLimitLayer::new(MemoryStore::new()).with_policy(per_tenant))
        .route_layer(TenantLayer::new(pool, FromClaims::<Claims>::new()))
        .route_layer(axum::middleware::from_fn(demo_auth))
        .layer(SetClientIpLayer::new(TrustedProxies::none()));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3001").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}
