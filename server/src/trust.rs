//! Current trust levels: read from Postgres through an in-process cache
//! with a TTL, and invalidated across replicas with `LISTEN/NOTIFY`.
//!
//! A change (`user set-trust`, or `PUT /api/v1/users/{id}/trust`) runs
//! `pg_notify` in the same transaction as the `UPDATE`, so the message is
//! sent only if the change commits. Each replica listens on one connection
//! of its own (not from the request pool) and drops the user's entry. A
//! message carries the sender's per-boot origin id, and a replica ignores
//! its own (it already dropped the entry after its commit). When the
//! listener is down, it reconnects with back-off (1 s, 2 s, 4 s … 30 s)
//! and the TTL alone bounds staleness; it never takes the server down.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use moka::sync::Cache;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::task::JoinHandle;
use tollgate::tenant::{Access, TenantId, begin};
use uuid::Uuid;

use crate::auth::Claims;
use crate::error::AppError;

/// The channel trust changes are announced on.
pub const TRUST_CHANNEL: &str = "tollgate_trust";

/// `tollgate_trust_cache_hits_total`.
pub const CACHE_HITS: &str = "tollgate_trust_cache_hits_total";
/// `tollgate_trust_cache_misses_total`.
pub const CACHE_MISSES: &str = "tollgate_trust_cache_misses_total";
/// `tollgate_trust_invalidations_total`: messages from other replicas
/// that dropped an entry.
pub const INVALIDATIONS: &str = "tollgate_trust_invalidations_total";
/// `tollgate_trust_listener_connected`: 1 while the listener is connected.
pub const LISTENER_CONNECTED: &str = "tollgate_trust_listener_connected";
/// `tollgate_trust_listener_reconnects_total`.
pub const LISTENER_RECONNECTS: &str = "tollgate_trust_listener_reconnects_total";

/// Subjects' current trust levels, cached.
#[derive(Clone)]
pub struct TrustLevels {
    cache: Cache<Uuid, String>,
    pool: PgPool,
    origin: Uuid,
}

impl std::fmt::Debug for TrustLevels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustLevels")
            .field("origin", &self.origin)
            .field("entries", &self.cache.entry_count())
            .finish()
    }
}

impl TrustLevels {
    /// A cache of at most 100 000 subjects, each entry living `ttl`.
    pub fn new(pool: PgPool, ttl: Duration) -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build(),
            pool,
            origin: Uuid::new_v4(),
        }
    }

    /// This process's origin id, in every message it sends.
    pub fn origin(&self) -> Uuid {
        self.origin
    }

    /// The subject's current level; `None` when the user no longer exists.
    pub async fn current(&self, claims: &Claims) -> Result<Option<String>, sqlx::Error> {
        if let Some(level) = self.cache.get(&claims.sub) {
            metrics::counter!(CACHE_HITS).increment(1);
            return Ok(Some(level));
        }
        metrics::counter!(CACHE_MISSES).increment(1);
        let Ok(tenant) = claims.tenant.parse::<TenantId>() else {
            return Ok(None);
        };
        let mut tx = begin(&self.pool, tenant, Access::ReadOnly).await?;
        let level: Option<String> =
            sqlx::query_scalar("SELECT trust_level FROM users WHERE id = $1")
                .bind(claims.sub)
                .fetch_optional(&mut *tx)
                .await?;
        tx.commit().await?;
        if let Some(level) = &level {
            self.cache.insert(claims.sub, level.clone());
        }
        Ok(level)
    }

    /// Drops the subject's entry.
    pub fn invalidate(&self, user: Uuid) {
        self.cache.invalidate(&user);
    }

    /// Handles one message from the channel: `<origin>:<user>`.
    fn on_message(&self, payload: &str) {
        let Some((origin, user)) = payload.split_once(':') else {
            tracing::warn!(payload, "malformed trust notification");
            return;
        };
        if origin == self.origin.to_string() {
            return;
        }
        match user.parse::<Uuid>() {
            Ok(user) => {
                self.invalidate(user);
                metrics::counter!(INVALIDATIONS).increment(1);
            }
            Err(_) => tracing::warn!(payload, "malformed trust notification"),
        }
    }
}

/// Announces a change of `user`'s level, inside the transaction that made
/// it (delivered on commit, dropped on rollback).
pub async fn notify(
    conn: &mut sqlx::PgConnection,
    origin: Uuid,
    user: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(TRUST_CHANNEL)
        .bind(format!("{origin}:{user}"))
        .execute(conn)
        .await
        .map(drop)
}

/// Marks a response whose handler changed a user's level: once the
/// transaction has committed (the response is still a success after the
/// tenant layer), [`current_trust`] drops the local entry.
#[derive(Debug, Clone, Copy)]
pub struct TrustChanged(pub Uuid);

/// Replaces the token's trust level with the current one (so a downgrade
/// applies before the token expires); 401 when the user is gone. If the
/// database cannot say, the token's level stands.
pub async fn current_trust(
    State(trust): State<TrustLevels>,
    mut req: Request,
    next: Next,
) -> Response {
    // A tenant that is not an id is the tenant layer's 400 to answer.
    let claims = req.extensions().get::<Claims>().cloned();
    if let Some(claims) = claims.filter(|c| c.tenant.parse::<TenantId>().is_ok()) {
        match trust.current(&claims).await {
            Ok(Some(level)) => {
                if let Some(c) = req.extensions_mut().get_mut::<Claims>() {
                    c.trust = level;
                }
            }
            Ok(None) => {
                return AppError::Unauthorized("the token's user no longer exists").into_response();
            }
            Err(err) => tracing::warn!(%err, "trust level lookup failed; using the token's"),
        }
    }
    let res = next.run(req).await;
    if let Some(TrustChanged(user)) = res.extensions().get::<TrustChanged>() {
        if res.status().is_success() {
            trust.invalidate(*user);
        }
    }
    res
}

/// Listens on [`TRUST_CHANNEL`] until aborted, on a connection of its own
/// named `application_name` (so operators can find it).
pub fn spawn_listener(
    trust: TrustLevels,
    options: PgConnectOptions,
    application_name: String,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        // A pool of one, only for the listener: never a request's connection.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options.application_name(&application_name));
        let mut backoff = Duration::from_secs(1);
        let mut first = true;
        loop {
            match listen(&pool).await {
                Ok(mut listener) => {
                    metrics::gauge!(LISTENER_CONNECTED).set(1.0);
                    // Messages may have been missed while disconnected.
                    if !first {
                        trust.cache.invalidate_all();
                    }
                    tracing::info!("trust listener connected");
                    backoff = Duration::from_secs(1);
                    loop {
                        match listener.try_recv().await {
                            Ok(Some(message)) => trust.on_message(message.payload()),
                            Ok(None) => {
                                tracing::warn!("trust listener lost its connection");
                                break;
                            }
                            Err(err) => {
                                tracing::warn!(%err, "trust listener failed");
                                break;
                            }
                        }
                    }
                    metrics::gauge!(LISTENER_CONNECTED).set(0.0);
                }
                Err(err) => tracing::warn!(%err, ?backoff, "trust listener cannot connect"),
            }
            first = false;
            tokio::time::sleep(backoff).await;
            metrics::counter!(LISTENER_RECONNECTS).increment(1);
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    })
}

async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    // Reconnect on our schedule, with back-off, not at once.
    listener.eager_reconnect(false);
    listener.listen(TRUST_CHANNEL).await?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn own_messages_are_ignored_and_others_invalidate() {
        let pool = PgPool::connect_lazy("postgres://nobody@127.0.0.1/none").unwrap();
        let trust = TrustLevels::new(pool, Duration::from_secs(60));
        let user = Uuid::new_v4();
        trust.cache.insert(user, "basic".into());
        trust.on_message(&format!("{}:{user}", trust.origin()));
        assert!(
            trust.cache.get(&user).is_some(),
            "own message dropped the entry"
        );
        trust.on_message("garbage");
        trust.on_message(&format!("{}:not-a-uuid", Uuid::new_v4()));
        assert!(trust.cache.get(&user).is_some());
        trust.on_message(&format!("{}:{user}", Uuid::new_v4()));
        assert!(trust.cache.get(&user).is_none());
    }
}
