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
//!
//! Lookups run on the system pool (never a tenant request's connection),
//! at most a few at once so readiness checks always find a connection.
//! They fail closed: when Postgres cannot say, the request gets the lowest
//! level, never the one written in its token. A lookup that started before
//! an invalidation does not write its (old) answer back after it: every
//! invalidation bumps a generation, and an answer is cached only if the
//! generation it started under is still current.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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

/// `tollgate_trust_lookup_failures_total`: lookups Postgres could not
/// answer (the request got the lowest level).
pub const LOOKUP_FAILURES: &str = "tollgate_trust_lookup_failures_total";

/// Subjects' current trust levels, cached.
#[derive(Clone)]
pub struct TrustLevels {
    cache: Cache<Uuid, String>,
    pool: PgPool,
    origin: Uuid,
    /// Bumped by every invalidation; guarded with the cache writes by
    /// `writes`, so "check the generation, then insert" is atomic.
    generation: Arc<AtomicU64>,
    writes: Arc<Mutex<()>>,
    /// Lookups at once, fewer than the system pool's connections.
    lookups: Arc<tokio::sync::Semaphore>,
    /// How long a lookup may wait and run before it counts as failed.
    timeout: Duration,
    /// Lookups under way, by subject and generation.
    inflight: Arc<Mutex<Flights>>,
    /// Lookups that reached Postgres.
    queries: Arc<AtomicU64>,
}

/// One lookup's answer, shared by every miss that joined it.
type Flight = tokio::sync::OnceCell<Result<Option<String>, String>>;

/// Lookups under way, by subject and the generation they started in.
type Flights = HashMap<(Uuid, u64), Arc<Flight>>;

impl std::fmt::Debug for TrustLevels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustLevels")
            .field("origin", &self.origin)
            .field("entries", &self.cache.entry_count())
            .finish()
    }
}

impl TrustLevels {
    /// A cache of at most 100 000 subjects, each entry living `ttl`,
    /// filled from `pool` (the system pool) by at most `max_lookups`
    /// queries at once, each bounded by `timeout`.
    pub fn new(pool: PgPool, ttl: Duration, max_lookups: usize, timeout: Duration) -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build(),
            pool,
            origin: Uuid::new_v4(),
            generation: Arc::new(AtomicU64::new(0)),
            writes: Arc::new(Mutex::new(())),
            lookups: Arc::new(tokio::sync::Semaphore::new(max_lookups.max(1))),
            timeout,
            inflight: Arc::default(),
            queries: Arc::default(),
        }
    }

    fn write_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Caches `level` unless an invalidation came after `generation` was
    /// read (the answer may predate it).
    fn store_if_current(&self, generation: u64, user: Uuid, level: String) {
        let _writes = self.write_lock();
        if self.generation.load(Ordering::Acquire) == generation {
            self.cache.insert(user, level);
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
        let generation = self.generation.load(Ordering::Acquire);
        // Single flight: misses for one subject arriving together share one
        // query. Keyed by generation too, so a miss after an invalidation
        // never joins a query that started before it.
        let flight = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            inflight
                .entry((claims.sub, generation))
                .or_default()
                .clone()
        };
        let result = flight
            .get_or_init(|| async {
                self.queries.fetch_add(1, Ordering::Relaxed);
                self.lookup(claims, tenant).await.map_err(|e| e.to_string())
            })
            .await
            .clone();
        {
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            if inflight
                .get(&(claims.sub, generation))
                .is_some_and(|f| Arc::ptr_eq(f, &flight))
            {
                inflight.remove(&(claims.sub, generation));
            }
        }
        let level = result.map_err(sqlx::Error::Protocol)?;
        if let Some(level) = &level {
            self.store_if_current(generation, claims.sub, level.clone());
        }
        Ok(level)
    }

    /// Lookups that reached Postgres (misses coalesced into one count once).
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// One query for the subject's level, bounded in concurrency and time.
    async fn lookup(
        &self,
        claims: &Claims,
        tenant: TenantId,
    ) -> Result<Option<String>, sqlx::Error> {
        let lookup = async {
            let _permit = self
                .lookups
                .acquire()
                .await
                .map_err(|_| sqlx::Error::PoolClosed)?;
            let mut tx = begin(&self.pool, tenant, Access::ReadOnly).await?;
            let level: Option<String> =
                sqlx::query_scalar("SELECT trust_level FROM users WHERE id = $1")
                    .bind(claims.sub)
                    .fetch_optional(&mut *tx)
                    .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(level)
        };
        tokio::time::timeout(self.timeout, lookup)
            .await
            .unwrap_or(Err(sqlx::Error::PoolTimedOut))
    }

    /// Drops the subject's entry; lookups already under way will not write
    /// their answer back.
    pub fn invalidate(&self, user: Uuid) {
        let _writes = self.write_lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate(&user);
    }

    /// Drops every entry (after the listener missed messages).
    fn invalidate_all(&self) {
        let _writes = self.write_lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate_all();
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

/// What [`current_trust`] needs: the cache and the lowest level, which
/// applies when the current level cannot be read.
#[derive(Debug, Clone)]
pub struct CurrentTrust {
    /// The cache.
    pub levels: TrustLevels,
    /// The lowest configured level (the first of `TRUST_LEVELS`).
    pub lowest: Arc<str>,
}

/// Replaces the token's trust level with the current one (so a downgrade
/// applies before the token expires); 401 when the user is gone. If the
/// database cannot say, the lowest level applies (fail closed): a level
/// read from the token could be one the user no longer has.
pub async fn current_trust(
    State(CurrentTrust {
        levels: trust,
        lowest,
    }): State<CurrentTrust>,
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
            Err(err) => {
                metrics::counter!(LOOKUP_FAILURES).increment(1);
                tracing::warn!(%err, "trust level lookup failed; the lowest level applies");
                if let Some(c) = req.extensions_mut().get_mut::<Claims>() {
                    c.trust = lowest.to_string();
                }
            }
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
                        trust.invalidate_all();
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

    fn unreachable() -> TrustLevels {
        // Port 1 on loopback: nothing listens, connecting fails at once.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(Duration::from_millis(500))
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .unwrap();
        TrustLevels::new(pool, Duration::from_secs(60), 2, Duration::from_secs(1))
    }

    #[tokio::test]
    async fn a_lookup_that_predates_an_invalidation_is_not_cached() {
        let trust = unreachable();
        let user = Uuid::new_v4();
        let started = trust.generation.load(Ordering::Acquire);
        // The lookup read "staff"; meanwhile the user was demoted.
        trust.invalidate(user);
        trust.store_if_current(started, user, "staff".into());
        assert!(trust.cache.get(&user).is_none(), "stale level written back");
        // A lookup that started after it is cached.
        let now = trust.generation.load(Ordering::Acquire);
        trust.store_if_current(now, user, "new".into());
        assert_eq!(trust.cache.get(&user).as_deref(), Some("new"));
    }

    #[tokio::test]
    async fn a_failed_lookup_gives_the_lowest_level_not_the_tokens() {
        use axum::{Extension, Router, routing::get};
        use tower::ServiceExt;
        let state = CurrentTrust {
            levels: unreachable(),
            lowest: "new".into(),
        };
        let app = Router::new()
            .route(
                "/",
                get(|Extension(claims): Extension<Claims>| async move { claims.trust }),
            )
            .route_layer(axum::middleware::from_fn_with_state(state, current_trust));
        let mut req = http::Request::get("/")
            .body(axum::body::Body::empty())
            .unwrap();
        req.extensions_mut().insert(Claims {
            sub: Uuid::new_v4(),
            tenant: Uuid::new_v4().to_string(),
            trust: "staff".into(),
            iat: 0,
            exp: u64::MAX,
            iss: "tollgate".into(),
            aud: "tollgate-api".into(),
        });
        let res = app.oneshot(req).await.unwrap();
        assert_eq!(res.status(), 200);
        let body = axum::body::to_bytes(res.into_body(), 1024).await.unwrap();
        assert_eq!(&body[..], b"new");
    }

    #[tokio::test]
    async fn own_messages_are_ignored_and_others_invalidate() {
        let trust = unreachable();
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
