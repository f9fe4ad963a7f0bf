//! [`SharedCache`]: a per-key attribute read from Postgres, cached on each
//! replica, and invalidated on every replica when it changes. Trust levels
//! (per user) and plans (per tenant) are both one.
//!
//! - **Reads** go through the cache (a TTL bounds staleness whatever else
//!   fails). A miss runs the caller's lookup on the system pool, at most a
//!   few at once ([`SharedCache::new`]'s semaphore, shared by every cache so
//!   readiness checks always find a connection) and bounded in time. Misses
//!   for one key arriving together share one lookup (single flight).
//! - **Changes** call [`announce`] in the same transaction as the `UPDATE`:
//!   `pg_notify` is delivered on commit and dropped on rollback. The
//!   message is `<origin>:<key>`; a replica ignores its own (it drops its
//!   entry itself once its transaction commits, with
//!   [`Tx::after_commit`](tollgate::tenant::Tx::after_commit)).
//! - **The generation rule**: every invalidation bumps a generation, and a
//!   lookup's answer is cached only if the generation it started under is
//!   still current, so a lookup that started before a change never caches
//!   the old answer after it.
//! - **One listener per replica** ([`spawn_listener`]) LISTENs on every
//!   cache's channel over one connection of its own (not from a pool a
//!   request uses), proves delivery with a probe message after each
//!   LISTEN, and reconnects with back-off (1 s, 2 s … 30 s); after a gap it
//!   drops every entry, as messages may have been missed.

use std::collections::HashMap;
use std::fmt::Display;
use std::hash::Hash;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moka::sync::Cache;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// `tollgate_cache_hits_total{cache}`.
pub const CACHE_HITS: &str = "tollgate_cache_hits_total";
/// `tollgate_cache_misses_total{cache}`.
pub const CACHE_MISSES: &str = "tollgate_cache_misses_total";
/// `tollgate_cache_invalidations_total{cache}`: entries dropped on another
/// replica's message.
pub const INVALIDATIONS: &str = "tollgate_cache_invalidations_total";
/// `tollgate_cache_lookup_failures_total{cache}`: lookups Postgres could not
/// answer (the caller's fail-safe value applied).
pub const LOOKUP_FAILURES: &str = "tollgate_cache_lookup_failures_total";
/// `tollgate_cache_listener_connected`: 1 while the listener is connected
/// and has proved delivery.
pub const LISTENER_CONNECTED: &str = "tollgate_cache_listener_connected";
/// `tollgate_cache_listener_reconnects_total`.
pub const LISTENER_RECONNECTS: &str = "tollgate_cache_listener_reconnects_total";

/// Entries a cache keeps at most.
pub const MAX_ENTRIES: u64 = 100_000;

/// One lookup's answer, shared by every miss that joined it.
type Flight<V> = tokio::sync::OnceCell<Result<Option<V>, String>>;

/// Lookups under way, by key and the generation they started in.
type Flights<K, V> = Mutex<HashMap<(K, u64), Arc<Flight<V>>>>;

/// A per-key attribute, cached, invalidated fleet-wide. Cheap to clone.
pub struct SharedCache<K, V> {
    inner: Arc<Inner<K, V>>,
}

impl<K, V> Clone for SharedCache<K, V> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<K, V> {
    /// `trust`, `plan`: the metrics' `cache` label and the logs' name.
    name: &'static str,
    /// The NOTIFY channel of its changes.
    channel: &'static str,
    /// foldhash, as the token cache: every request looks a key up.
    cache: Cache<K, V, foldhash::fast::RandomState>,
    origin: Uuid,
    /// Bumped by every invalidation; read and compared under `writes`, so
    /// "check the generation, then insert" is atomic.
    generation: AtomicU64,
    writes: Mutex<()>,
    /// Lookups at once, shared with the other caches.
    lookups: Arc<Semaphore>,
    /// How long a lookup may wait and run before it counts as failed.
    timeout: Duration,
    inflight: Flights<K, V>,
    /// Lookups that reached Postgres.
    queries: AtomicU64,
    /// The hit counter, registered on first use: a hit is on every
    /// request's path, where registering (hashing the name and label and
    /// searching the recorder's registry) cost more than the lookup.
    hits: std::sync::OnceLock<metrics::Counter>,
}

impl<K, V> std::fmt::Debug for SharedCache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCache")
            .field("name", &self.inner.name)
            .field("origin", &self.inner.origin)
            .finish_non_exhaustive()
    }
}

/// What the listener needs of a cache, whatever its key and value types.
pub trait Invalidate: Send + Sync + 'static {
    /// The channel its changes are announced on.
    fn channel(&self) -> &'static str;
    /// This process's origin id, in every message it sends.
    fn origin(&self) -> Uuid;
    /// Handles one message from its channel.
    fn on_message(&self, payload: &str);
    /// Drops every entry (messages may have been missed).
    fn invalidate_all(&self);
}

impl<K, V> SharedCache<K, V>
where
    K: Hash + Eq + Clone + Display + FromStr + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// A cache called `name` (its metrics' `cache` label) whose changes are
    /// announced on `channel`, each entry living `ttl`; lookups take a
    /// permit of `lookups` and at most `timeout`.
    pub fn new(
        name: &'static str,
        channel: &'static str,
        ttl: Duration,
        lookups: Arc<Semaphore>,
        timeout: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                name,
                channel,
                cache: Cache::builder()
                    .max_capacity(MAX_ENTRIES)
                    .time_to_live(ttl)
                    .build_with_hasher(foldhash::fast::RandomState::default()),
                origin: Uuid::new_v4(),
                generation: AtomicU64::new(0),
                writes: Mutex::new(()),
                lookups,
                timeout,
                inflight: Mutex::default(),
                queries: AtomicU64::new(0),
                hits: std::sync::OnceLock::new(),
            }),
        }
    }

    /// The cached value of `key`, if there is one, counted as a hit (the
    /// fast path of [`get_with`](Self::get_with), for callers that decide
    /// without waiting when they can).
    pub fn hit(&self, key: &K) -> Option<V> {
        let inner = &*self.inner;
        let value = inner.cache.get(key)?;
        let hits = inner
            .hits
            .get_or_init(|| metrics::counter!(CACHE_HITS, "cache" => inner.name));
        hits.increment(1);
        Some(value)
    }

    /// The cached value of `key`, else `load`'s answer (cached unless an
    /// invalidation came after the lookup started). `Ok(None)`: no such
    /// key (not cached). An error counts in
    /// [`LOOKUP_FAILURES`]; the caller decides what applies then.
    pub async fn get_with<F, Fut>(&self, key: &K, load: F) -> Result<Option<V>, String>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, sqlx::Error>>,
    {
        if let Some(value) = self.hit(key) {
            return Ok(Some(value));
        }
        let inner = &*self.inner;
        metrics::counter!(CACHE_MISSES, "cache" => inner.name).increment(1);
        let generation = inner.generation.load(Ordering::Acquire);
        // Keyed by generation too: a miss after an invalidation never joins
        // a lookup that started before it.
        let flight_key = (key.clone(), generation);
        let flight = lock(&inner.inflight)
            .entry(flight_key.clone())
            .or_default()
            .clone();
        // The lookup is boxed: made only on a miss, and inline its sqlx
        // future (the pool's connect path, about 13 KB) would make every
        // hit's future that large to create and move.
        let result = flight
            .get_or_init(|| {
                Box::pin(async {
                    inner.queries.fetch_add(1, Ordering::Relaxed);
                    let bounded = async {
                        let _permit = inner
                            .lookups
                            .acquire()
                            .await
                            .map_err(|_| sqlx::Error::PoolClosed)?;
                        load().await
                    };
                    tokio::time::timeout(inner.timeout, bounded)
                        .await
                        .unwrap_or(Err(sqlx::Error::PoolTimedOut))
                        .map_err(|e| e.to_string())
                })
            })
            .await
            .clone();
        {
            let mut inflight = lock(&inner.inflight);
            if inflight
                .get(&flight_key)
                .is_some_and(|f| Arc::ptr_eq(f, &flight))
            {
                inflight.remove(&flight_key);
            }
        }
        match &result {
            Ok(Some(value)) => self.store_if_current(generation, key.clone(), value.clone()),
            Ok(None) => {}
            Err(_) => metrics::counter!(LOOKUP_FAILURES, "cache" => inner.name).increment(1),
        }
        result
    }

    /// Caches `value` unless an invalidation came after `generation` was
    /// read (the answer may predate it).
    fn store_if_current(&self, generation: u64, key: K, value: V) {
        let _writes = lock(&self.inner.writes);
        if self.inner.generation.load(Ordering::Acquire) == generation {
            self.inner.cache.insert(key, value);
        }
    }

    /// Drops `key`'s entry; lookups already under way will not write their
    /// answer back.
    pub fn invalidate(&self, key: &K) {
        let _writes = lock(&self.inner.writes);
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        self.inner.cache.invalidate(key);
    }

    /// This process's origin id, in every message it sends.
    pub fn origin(&self) -> Uuid {
        self.inner.origin
    }

    /// Lookups that reached Postgres (misses that joined one count once).
    pub fn queries(&self) -> u64 {
        self.inner.queries.load(Ordering::Relaxed)
    }

    /// The cached value of `key`, if any (for tests).
    pub fn cached(&self, key: &K) -> Option<V> {
        self.inner.cache.get(key)
    }

    /// The generation now (for tests of the generation rule).
    #[doc(hidden)]
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// [`store_if_current`](Self::store_if_current), for tests.
    #[doc(hidden)]
    pub fn store_if_current_for_test(&self, generation: u64, key: K, value: V) {
        self.store_if_current(generation, key, value);
    }

    /// Announces, in the caller's transaction, that `key` changed: every
    /// replica drops its entry when the transaction commits.
    pub async fn announce(&self, conn: &mut sqlx::PgConnection, key: &K) -> sqlx::Result<()> {
        announce(conn, self.inner.channel, self.inner.origin, key).await
    }
}

impl<K, V> Invalidate for SharedCache<K, V>
where
    K: Hash + Eq + Clone + Display + FromStr + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn channel(&self) -> &'static str {
        self.inner.channel
    }

    fn origin(&self) -> Uuid {
        self.inner.origin
    }

    fn on_message(&self, payload: &str) {
        let Some((origin, key)) = payload.split_once(':') else {
            tracing::warn!(cache = self.inner.name, payload, "malformed notification");
            return;
        };
        // Our own messages, and every listener's delivery probe (each
        // replica's reaches all the others): nothing to drop.
        if origin == self.inner.origin.to_string() || key.starts_with(PROBE_PREFIX) {
            return;
        }
        match key.parse::<K>() {
            Ok(key) => {
                self.invalidate(&key);
                metrics::counter!(INVALIDATIONS, "cache" => self.inner.name).increment(1);
            }
            Err(_) => tracing::warn!(cache = self.inner.name, payload, "malformed notification"),
        }
    }

    fn invalidate_all(&self) {
        let _writes = lock(&self.inner.writes);
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        self.inner.cache.invalidate_all();
    }
}

/// Sends `<origin>:<key>` on `channel` in the caller's transaction
/// (delivered on commit, dropped on rollback). The CLI, which caches
/// nothing, passes a fresh origin.
pub async fn announce(
    conn: &mut sqlx::PgConnection,
    channel: &str,
    origin: Uuid,
    key: &impl Display,
) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel)
        .bind(format!("{origin}:{key}"))
        .execute(conn)
        .await?;
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a listener's delivery probe carries after its origin.
const PROBE_PREFIX: &str = "probe-";

/// How long the listener waits for its own probe message before it
/// concludes that its connection cannot receive notifications.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Listens on every cache's channel until aborted, on one connection of its
/// own named `application_name` (so operators can find it); `pool` (the
/// system pool) sends the probes.
///
/// After each LISTEN it proves delivery: it sends a probe message through
/// `pool` and waits [`PROBE_TIMEOUT`] for it. A LISTEN made through a
/// transaction-mode pooler is registered on a server connection the pooler
/// hands to other clients as soon as the statement ends, so nothing ever
/// arrives; the listener then says so (naming the likely cause), counts
/// itself disconnected and tries again with back-off, while the TTL bounds
/// staleness.
pub fn spawn_listener(
    caches: Vec<Arc<dyn Invalidate>>,
    pool: PgPool,
    options: PgConnectOptions,
    application_name: String,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        // A pool of one, only for the listener: never a request's connection.
        let own = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options.application_name(&application_name));
        let Some(first_cache) = caches.first().cloned() else {
            return;
        };
        let dispatch = |channel: &str, payload: &str| {
            for cache in caches.iter().filter(|c| c.channel() == channel) {
                cache.on_message(payload);
            }
        };
        let mut backoff = Duration::from_secs(1);
        let mut first = true;
        let mut probes = 0u64;
        loop {
            probes += 1;
            let probe = format!("{}:{PROBE_PREFIX}{probes}", first_cache.origin());
            let channels: Vec<&str> = caches.iter().map(|c| c.channel()).collect();
            let probe_channel = first_cache.channel();
            match listen(&own, &pool, &channels, probe_channel, &probe, &dispatch).await {
                Ok(Some(mut listener)) => {
                    metrics::gauge!(LISTENER_CONNECTED).set(1.0);
                    // Messages may have been missed while disconnected.
                    if !first {
                        caches.iter().for_each(|c| c.invalidate_all());
                    }
                    tracing::info!(?channels, "listener connected (a probe message arrived)");
                    backoff = Duration::from_secs(1);
                    loop {
                        match listener.try_recv().await {
                            Ok(Some(message)) => dispatch(message.channel(), message.payload()),
                            Ok(None) => {
                                tracing::warn!("listener lost its connection");
                                break;
                            }
                            Err(err) => {
                                tracing::warn!(%err, "listener failed");
                                break;
                            }
                        }
                    }
                    metrics::gauge!(LISTENER_CONNECTED).set(0.0);
                }
                Ok(None) => tracing::warn!(
                    ?backoff,
                    "listener: its probe message did not arrive within {PROBE_TIMEOUT:?}; \
                     is DATABASE_DIRECT_URL (else DATABASE_URL) a transaction-mode pooler? \
                     LISTEN needs a direct connection. Trust and plan changes made on other \
                     replicas apply within TRUST_CACHE_TTL / PLAN_CACHE_TTL only"
                ),
                Err(err) => tracing::warn!(%err, ?backoff, "listener cannot connect"),
            }
            first = false;
            tokio::time::sleep(backoff).await;
            metrics::counter!(LISTENER_RECONNECTS).increment(1);
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    })
}

/// LISTENs on `channels`, then sends `probe` on `probe_channel` through
/// `pool` and waits for it: `None` when it did not arrive in time.
async fn listen(
    own: &PgPool,
    pool: &PgPool,
    channels: &[&str],
    probe_channel: &str,
    probe: &str,
    dispatch: &impl Fn(&str, &str),
) -> Result<Option<PgListener>, sqlx::Error> {
    let mut listener = PgListener::connect_with(own).await?;
    // Reconnect on our schedule, with back-off, not at once.
    listener.eager_reconnect(false);
    listener.listen_all(channels.iter().copied()).await?;
    // In a transaction: the system pool may go through a pooler too.
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(probe_channel)
        .bind(probe)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let arrived = tokio::time::timeout(PROBE_TIMEOUT, async {
        // Other replicas' messages may come first: handled as usual.
        while let Some(message) = listener.try_recv().await? {
            if message.channel() == probe_channel && message.payload() == probe {
                return Ok::<_, sqlx::Error>(true);
            }
            dispatch(message.channel(), message.payload());
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

    fn cache() -> SharedCache<Uuid, String> {
        SharedCache::new(
            "test",
            "test_channel",
            Duration::from_secs(60),
            Arc::new(Semaphore::new(2)),
            Duration::from_secs(1),
        )
    }

    #[tokio::test]
    async fn a_lookup_that_predates_an_invalidation_is_not_cached() {
        let cache = cache();
        let key = Uuid::new_v4();
        let started = cache.generation();
        // The lookup read "staff"; meanwhile the user was demoted.
        cache.invalidate(&key);
        cache.store_if_current(started, key, "staff".into());
        assert!(cache.cached(&key).is_none(), "stale value written back");
        // A lookup that started after it is cached.
        cache.store_if_current(cache.generation(), key, "new".into());
        assert_eq!(cache.cached(&key).as_deref(), Some("new"));
    }

    #[tokio::test]
    async fn own_messages_and_probes_are_ignored_and_others_invalidate() {
        let cache = cache();
        let key = Uuid::new_v4();
        cache.inner.cache.insert(key, "basic".into());
        cache.on_message(&format!("{}:{key}", cache.origin()));
        assert!(
            cache.cached(&key).is_some(),
            "own message dropped the entry"
        );
        cache.on_message("garbage");
        cache.on_message(&format!("{}:not-a-uuid", Uuid::new_v4()));
        cache.on_message(&format!("{}:{PROBE_PREFIX}1", Uuid::new_v4()));
        assert!(cache.cached(&key).is_some());
        cache.on_message(&format!("{}:{key}", Uuid::new_v4()));
        assert!(cache.cached(&key).is_none());
    }

    #[tokio::test]
    async fn simultaneous_misses_share_one_lookup_and_failures_are_not_cached() {
        let cache = cache();
        let key = Uuid::new_v4();
        let loads = Arc::new(AtomicU64::new(0));
        let lookups = (0..10).map(|_| {
            let loads = loads.clone();
            let cache = cache.clone();
            async move {
                cache
                    .get_with(&key, || async move {
                        loads.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok(Some("pro".to_owned()))
                    })
                    .await
            }
        });
        let handles: Vec<_> = lookups.map(tokio::spawn).collect();
        for handle in handles {
            assert_eq!(handle.await.unwrap().unwrap().as_deref(), Some("pro"));
        }
        assert_eq!(loads.load(Ordering::Relaxed), 1, "ten misses, one lookup");
        let other = Uuid::new_v4();
        let failed = cache
            .get_with(&other, || async { Err(sqlx::Error::PoolTimedOut) })
            .await;
        assert!(failed.is_err());
        assert!(cache.cached(&other).is_none());
    }
}
