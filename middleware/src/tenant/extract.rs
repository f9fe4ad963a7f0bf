//! [`Tx`]: the handler's view of the request's tenant transaction.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use axum::extract::FromRequestParts;
use http::request::Parts;
use sqlx::{PgConnection, Postgres, Transaction};

use super::TenantId;
use super::layer::{Slot, TenantContext};
use super::transaction::TenantError;

/// The request's tenant transaction, as an axum extractor.
///
/// Use it as a connection: `sqlx::query(…).fetch_all(&mut *tx)`. It is
/// begun on first extraction and lent to the handler; when the handler
/// drops it, it goes back to the [`TenantLayer`](super::TenantLayer),
/// which commits or rolls back once the response status is known. Do not
/// commit it yourself: the layer decides from the response.
///
/// Rejects with 500 when no `TenantLayer` is above the handler, and with
/// the database error's problem when the transaction cannot begin (503 when
/// the pool has no free connection in time).
#[derive(Debug)]
pub struct Tx {
    tx: Option<Transaction<'static, Postgres>>,
    slot: Arc<Slot>,
    tenant: TenantId,
}

impl Tx {
    /// The tenant this transaction serves.
    pub fn tenant(&self) -> TenantId {
        self.tenant
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
        let tx = context.slot.lend().await?;
        Ok(Self {
            tx: Some(tx),
            slot: context.slot,
            tenant: context.tenant,
        })
    }
}

impl Deref for Tx {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.tx.as_ref().expect("present until drop")
    }
}

impl DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.tx.as_mut().expect("present until drop")
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            self.slot.give_back(tx);
        }
    }
}
