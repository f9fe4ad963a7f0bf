//! Trust levels: the configured table ([`TrustTable`]), each request's
//! current level ([`Trust`]), and how a level changes ([`change_level`]).
//!
//! The flow is one way. [`current_trust`] reads the subject's level as
//! stored (through an in-process cache with a TTL) and puts a [`Trust`] in
//! the request extensions; the token's claims are never rewritten, and
//! limits, shedding and handlers read the [`Trust`]. A change — from the
//! API or the CLI — goes through [`change_level`], which runs `pg_notify`
//! in the same transaction as the `UPDATE`, so the message is sent only if
//! the change commits. Each replica listens on one connection of its own
//! (not from the request pool) and drops the user's entry. A message
//! carries the sender's per-boot origin id, and a replica ignores its own:
//! it drops its entry itself once its transaction commits
//! ([`Tx::after_commit`](tollgate::tenant::Tx::after_commit)). When the
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
use tollgate::rate_limit::Quota;
use tollgate::tenant::{Access, TenantId, begin};
use uuid::Uuid;

use crate::auth::Claims;
use crate::error::AppError;

/// The configured levels (`TRUST_LEVELS`), lowest first, each with its
/// quota (`RATE_LIMIT_TRUST_<LEVEL>`; `None` is unlimited). Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustTable(Vec<(Arc<str>, Option<Quota>)>);

impl TrustTable {
    /// The table of `levels`, lowest first; `None` when there are none.
    pub fn new(levels: Vec<(String, Option<Quota>)>) -> Option<Self> {
        (!levels.is_empty()).then(|| {
            Self(
                levels
                    .into_iter()
                    .map(|(name, quota)| (name.into(), quota))
                    .collect(),
            )
        })
    }

    /// The level called `name`, if configured.
    pub fn find(&self, name: &str) -> Option<Trust> {
        self.0
            .iter()
            .position(|(level, _)| &**level == name)
            .map(|rank| self.at(rank))
    }

    /// The level called `name`, or an error listing the configured ones.
    pub fn parse(&self, name: &str) -> Result<Trust, String> {
        self.find(name).ok_or_else(|| {
            let known: Vec<&str> = self.names().collect();
            format!("one of {}", known.join(", "))
        })
    }

    /// The lowest level: what applies when the current one cannot be read.
    pub fn lowest(&self) -> Trust {
        self.at(0)
    }

    /// The highest level, the only one that may change levels.
    pub fn highest(&self) -> Trust {
        self.at(self.0.len() - 1)
    }

    /// The quota of `level` (`None`: unlimited).
    pub fn quota(&self, level: &Trust) -> Option<Quota> {
        self.0.get(level.rank).and_then(|(_, quota)| *quota)
    }

    /// The levels' names, lowest first.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(name, _)| &**name)
    }

    /// How many levels there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never: a table has at least one level.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn at(&self, rank: usize) -> Trust {
        Trust {
            rank,
            name: self.0[rank].0.clone(),
        }
    }
}

/// A request's current trust level, put in the request extensions by
/// [`current_trust`] (the token's level may be stale; this one is not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trust {
    /// 0 for the lowest level, counting up.
    pub rank: usize,
    /// The level's name.
    pub name: Arc<str>,
}

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
        let tenant = TenantId::new(claims.tenant);
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
        // Our own messages, and every listener's delivery probe (each
        // replica's reaches all the others): nothing to drop.
        if origin == self.origin.to_string() || user.starts_with(PROBE_PREFIX) {
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

/// Changes `user`'s level to `level` inside the caller's transaction,
/// and announces it to every replica when that transaction commits
/// (`pg_notify` is delivered on commit, dropped on rollback). The one way a
/// level changes, for the API and the CLI alike. `origin` is the sender's
/// id ([`TrustLevels::origin`]; the CLI, which caches nothing, uses a fresh
/// one). `false` when the user is not visible in the transaction's tenant.
pub async fn change_level(
    conn: &mut sqlx::PgConnection,
    origin: Uuid,
    user: Uuid,
    level: &Trust,
) -> Result<bool, sqlx::Error> {
    let updated = sqlx::query("UPDATE users SET trust_level = $2 WHERE id = $1")
        .bind(user)
        .bind(&*level.name)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if updated == 0 {
        return Ok(false);
    }
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(TRUST_CHANNEL)
        .bind(format!("{origin}:{user}"))
        .execute(conn)
        .await?;
    Ok(true)
}

/// What [`current_trust`] needs: the cache and the table.
#[derive(Debug, Clone)]
pub struct CurrentTrust {
    /// The cache.
    pub levels: TrustLevels,
    /// The configured levels.
    pub table: Arc<TrustTable>,
}

/// Puts the subject's current [`Trust`] in the request (so a downgrade
/// applies before the token expires); 401 when the user is gone. If the
/// database cannot say, the lowest level applies (fail closed): a level
/// read from the token could be one the user no longer has. A stored level
/// this build does not know (say, one removed from `TRUST_LEVELS`) also
/// counts as the lowest.
pub async fn current_trust(
    State(CurrentTrust { levels, table }): State<CurrentTrust>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(claims) = req.extensions().get::<Claims>() else {
        return next.run(req).await;
    };
    let trust = match levels.current(claims).await {
        Ok(Some(level)) => table.find(&level).unwrap_or_else(|| table.lowest()),
        Ok(None) => {
            return AppError::Unauthorized("the token's user no longer exists").into_response();
        }
        Err(err) => {
            metrics::counter!(LOOKUP_FAILURES).increment(1);
            tracing::warn!(%err, "trust level lookup failed; the lowest level applies");
            table.lowest()
        }
    };
    req.extensions_mut().insert(trust);
    next.run(req).await
}

/// What a listener's delivery probe carries after its origin.
const PROBE_PREFIX: &str = "probe-";

/// How long the listener waits for its own probe message before it
/// concludes that its connection cannot receive notifications.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Listens on [`TRUST_CHANNEL`] until aborted, on a connection of its own
/// named `application_name` (so operators can find it).
///
/// After each LISTEN it proves delivery: it sends a probe message through
/// the system pool and waits [`PROBE_TIMEOUT`] for it. A LISTEN made
/// through a transaction-mode pooler is registered on a server connection
/// the pooler hands to other clients as soon as the statement ends, so
/// nothing ever arrives; the listener then says so (naming the likely
/// cause), counts itself disconnected and tries again with back-off,
/// while the TTL bounds staleness.
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
        let mut probes = 0u64;
        loop {
            probes += 1;
            let probe = format!("{}:{PROBE_PREFIX}{probes}", trust.origin);
            match listen(&pool, &trust, &probe).await {
                Ok(Some(mut listener)) => {
                    metrics::gauge!(LISTENER_CONNECTED).set(1.0);
                    // Messages may have been missed while disconnected.
                    if !first {
                        trust.invalidate_all();
                    }
                    tracing::info!("trust listener connected (a probe message arrived)");
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
                Ok(None) => tracing::warn!(
                    ?backoff,
                    "trust listener: its probe message did not arrive within {PROBE_TIMEOUT:?}; \
                     is DATABASE_DIRECT_URL (else DATABASE_URL) a transaction-mode pooler? \
                     LISTEN needs a direct connection. Trust changes made on other replicas \
                     apply within TRUST_CACHE_TTL only"
                ),
                Err(err) => tracing::warn!(%err, ?backoff, "trust listener cannot connect"),
            }
            first = false;
            tokio::time::sleep(backoff).await;
            metrics::counter!(LISTENER_RECONNECTS).increment(1);
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    })
}

/// LISTENs, then sends `probe` through the system pool and waits for it:
/// `None` when it did not arrive in time (the listener is dropped).
async fn listen(
    pool: &PgPool,
    trust: &TrustLevels,
    probe: &str,
) -> Result<Option<PgListener>, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    // Reconnect on our schedule, with back-off, not at once.
    listener.eager_reconnect(false);
    listener.listen(TRUST_CHANNEL).await?;
    // In a transaction: the system pool may go through a pooler too.
    let mut tx = trust.pool.begin().await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(TRUST_CHANNEL)
        .bind(probe)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let arrived = tokio::time::timeout(PROBE_TIMEOUT, async {
        // Other replicas' messages may come first: handled as usual.
        while let Some(message) = listener.try_recv().await? {
            if message.payload() == probe {
                return Ok::<_, sqlx::Error>(true);
            }
            trust.on_message(message.payload());
        }
        Ok(false)
    })
    .await;
    match arrived {
        Ok(Ok(true)) => Ok(Some(listener)),
        Ok(Err(err)) => Err(err),
        Ok(Ok(false)) | Err(_) => Ok(None),
    }
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
            table: Arc::new(
                TrustTable::new(vec![("new".into(), None), ("staff".into(), None)]).unwrap(),
            ),
        };
        let app = Router::new()
            .route(
                "/",
                get(|Extension(trust): Extension<Trust>| async move { trust.name.to_string() }),
            )
            .route_layer(axum::middleware::from_fn_with_state(state, current_trust));
        let mut req = http::Request::get("/")
            .body(axum::body::Body::empty())
            .unwrap();
        req.extensions_mut().insert(Claims {
            sub: Uuid::new_v4(),
            tenant: Uuid::new_v4(),
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
