//! Tenant context over Postgres row-level security (feature `postgres`).
//!
//! Every request that touches tenant data runs in a transaction that first
//! tells Postgres which tenant it serves:
//!
//! ```sql
//! BEGIN READ ONLY; SET LOCAL app.tenant_id = '<uuid>'
//! ```
//!
//! and the tables' row-level security policies do the isolation, so a
//! handler that forgets a `WHERE tenant_id = …` still sees only its tenant:
//!
//! ```sql
//! ALTER TABLE items ENABLE ROW LEVEL SECURITY;
//! ALTER TABLE items FORCE ROW LEVEL SECURITY;
//! CREATE POLICY tenant_isolation ON items
//!     USING (tenant_id = nullif(current_setting('app.tenant_id', true), '')::uuid)
//!     WITH CHECK (tenant_id = nullif(current_setting('app.tenant_id', true), '')::uuid);
//! ```
//!
//! - `nullif(…, '')`: on a connection that once had the setting,
//!   `current_setting(k, true)` returns `''`, not NULL. Compared as NULL,
//!   no setting means no rows. Never write a policy that fails open
//!   (`IS NULL OR …`, a `COALESCE` to some tenant).
//! - `FORCE`: without it the table's owner bypasses the policies. The
//!   server must also not be a superuser nor have `BYPASSRLS`; [`audit`]
//!   checks all of this at start-up.
//! - `is_local = true` ties the setting to the transaction: it cannot leak
//!   into another request through the pool. See [`begin`] for how the
//!   transaction is made safe against a client going away mid-`BEGIN`.
//! - Plans: the planner cannot see the setting's value, so it expects a
//!   policy to keep about one row, and a prepared statement's custom plans
//!   look cheap. A statement whose generic plan carries more (an
//!   optional filter written `$2 IS NULL OR …`) then never gets one:
//!   Postgres plans it again on every execution. Write such a query as
//!   two statements; `pg_prepared_statements` shows `generic_plans`
//!   growing once it is right.
//!
//! The pieces:
//! - [`TenantResolver`] finds the tenant: [`FromClaims`] (the verified
//!   token; the default choice), [`FromHeader`], [`FromSubdomain`]. Missing:
//!   401; invalid: 400; both as problem details.
//! - [`TenantLayer`] resolves the tenant and lends the handler a [`Tx`];
//!   it commits when the response status is below 400 and rolls back
//!   otherwise.
//! - [`TenantPool`] shares the pool fairly: a cap per tenant, and a queue
//!   in which no tenant's backlog starves another's.
//!
//! # Handlers: body first, then the connection
//!
//! A pooled connection is the scarcest thing a replica has. A handler that
//! took one and then waited for the client to send its body would let one
//! slow client (or a hostile one holding half-sent bodies) take the pool
//! from every tenant. So the transaction begins only when the handler
//! calls [`Tx::conn`], and the natural order of a handler is: extract and
//! validate the body (`Json<T>` as the last argument, then your checks),
//! then `tx.conn().await?` for the queries. Pair it with a body deadline
//! ([`BodyTimeoutLayer`](crate::timeout::BodyTimeoutLayer)), so the
//! client's time is bounded too.
//! - [`begin`] is the same transaction for code outside axum.
//! - [`TenantError`] maps database errors to problems: a row-level
//!   security violation (SQLSTATE `42501`) is 403.
//!
//! # Example
//!
//! ```
//! use axum::{Router, routing::get};
//! use tollgate::tenant::{
//!     FromClaims, TenantClaims, TenantError, TenantId, TenantLayer, TenantRejection, Tx,
//! };
//! use tower::ServiceExt;
//!
//! /// What your authentication layer puts in request extensions.
//! #[derive(Clone)]
//! struct Claims { tenant: String }
//!
//! impl TenantClaims for Claims {
//!     fn tenant(&self) -> Result<TenantId, TenantRejection> { self.tenant.parse() }
//! }
//!
//! async fn count(mut tx: Tx) -> Result<String, TenantError> {
//!     // No WHERE clause: row-level security shows this tenant's rows only.
//!     let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM items")
//!         .fetch_one(tx.conn().await?)
//!         .await?;
//!     Ok(n.to_string())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let pool = sqlx::PgPool::connect_lazy("postgres://app@127.0.0.1/app").unwrap();
//! let app = Router::new()
//!     .route("/items/count", get(count))
//!     // Under your authentication layer, which inserts `Claims`.
//!     .layer(TenantLayer::new(pool, FromClaims::<Claims>::new()));
//!
//! let get = || http::Request::get("/items/count").body(axum::body::Body::empty()).unwrap();
//! // No claims, no tenant: 401 before the database is touched.
//! let res = app.clone().oneshot(get()).await.unwrap();
//! assert_eq!(res.status(), 401);
//! assert_eq!(res.headers()["content-type"], "application/problem+json");
//!
//! // A tenant that is not a UUID: 400.
//! let mut req = get();
//! req.extensions_mut().insert(Claims { tenant: "acme".into() });
//! assert_eq!(app.oneshot(req).await.unwrap().status(), 400);
//! # }
//! ```

mod audit;
mod extract;
mod layer;
mod pool;
mod resolver;
mod transaction;

pub use audit::{AuditError, audit, audit_allowing};
pub use extract::Tx;
pub use layer::{ResponseFuture, Tenant, TenantLayer};
pub use pool::{PoolPermit, TenantPool};
pub use resolver::{
    FromClaims, FromHeader, FromSubdomain, TenantClaims, TenantId, TenantRejection, TenantResolver,
};
pub use transaction::{Access, TENANT_SETTING, TenantError, begin};
