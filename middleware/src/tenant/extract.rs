//! [`Tx`]: the handler's view of the request's tenant transaction.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use http::request::Parts;
use sqlx::PgConnection;

use super::TenantId;
use super::layer::{Held, Slot, TenantContext};
use super::transaction::TenantError;

/// The request's tenant transaction, as an axum extractor.
///
/// Extracting it costs nothing: the transaction begins when the handler
/// first calls [`conn`](Self::conn). Read and validate the request body
/// *before* that call, so no pooled connection waits on a slow client:
///
/// ```
/// use axum::Json;
/// use tollgate::tenant::{TenantError, Tx};
///
/// #[derive(serde::Deserialize)]
/// struct NewItem { name: String }
///
/// async fn create(mut tx: Tx, Json(item): Json<NewItem>) -> Result<String, TenantError> {
///     // The body is whole and parsed here; only now take a connection.
///     let (id,): (i64,) = sqlx::query_as("INSERT INTO items (name) VALUES ($1) RETURNING id")
///         .bind(item.name)
///         .fetch_one(tx.conn().await?)
///         .await?;
///     Ok(id.to_string())
/// }
/// # let _: axum::routing::MethodRouter<()> = axum::routing::post(create);
/// ```
///
/// When the handler returns, the transaction goes back to the
/// [`TenantLayer`](super::TenantLayer), which commits or rolls back once
/// the response status is known. Do not commit it yourself: the layer
/// decides from the response.
///
/// Rejects with 500 when no `TenantLayer` is above the handler; `conn`
/// fails with the database error's problem when the transaction cannot
/// begin (503 when no connection was free in time, or the tenant already
/// holds its share of the pool).
#[derive(Debug)]
pub struct Tx {
    held: Option<Held>,
    slot: Arc<Slot>,
    tenant: TenantId,
}

impl Tx {
    /// The tenant this transaction serves.
    pub fn tenant(&self) -> TenantId {
        self.tenant
    }

    /// The transaction's connection, begun on the first call: waits (fairly,
    /// bounded) for the tenant's share of the pool, then runs `BEGIN` and
    /// sets the tenant.
    pub async fn conn(&mut self) -> Result<&mut PgConnection, TenantError> {
        let held = match &mut self.held {
            Some(held) => held,
            empty => empty.insert(self.slot.lend().await?),
        };
        Ok(&mut held.tx)
    }

    /// Runs `hook` once the request's transaction has committed (at once
    /// after the response when the handler never began one), and never
    /// when it rolls back: for work that must follow only a change that
    /// stuck, such as dropping a cache entry the change made stale. A
    /// hook run before the commit could let a concurrent reader cache the
    /// old value again. Hooks run on the request's task, before the
    /// response goes out: keep them short, and spawn anything that waits.
    ///
    /// ```
    /// use tollgate::tenant::{TenantError, Tx};
    ///
    /// async fn rename(mut tx: Tx) -> Result<(), TenantError> {
    ///     sqlx::query("UPDATE settings SET name = 'new'")
    ///         .execute(tx.conn().await?)
    ///         .await?;
    ///     tx.after_commit(|| tracing::info!("renamed"));
    ///     Ok(())
    /// }
    /// # let _: axum::routing::MethodRouter<()> = axum::routing::put(rename);
    /// ```
    pub fn after_commit(&mut self, hook: impl FnOnce() + Send + 'static) {
        self.slot.after_commit(Box::new(hook));
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Tx {
    type Rejection = TenantError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let context = parts
            .extensions
            .get::<TenantContext>()
            .ok_or(TenantError::MissingLayer)?
            .clone();
        Ok(Self {
            held: None,
            slot: context.slot,
            tenant: context.tenant,
        })
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            self.slot.give_back(held);
        }
    }
}
