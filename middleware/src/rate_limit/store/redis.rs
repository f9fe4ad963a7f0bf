//! The Redis store: one quota for the whole fleet.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use dashmap::DashMap;
use pin_project_lite::pin_project;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};
use smallvec::SmallVec;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{Check, Decision, Decisions, Store, StoreError, StoreErrorKind};
use crate::rate_limit::clock::{Clock, MonotonicClock, nanos};
use crate::rate_limit::key::Key;

/// The GCRA script: the arithmetic of the in-memory store, in Lua.
const GCRA_LUA: &str = include_str!("redis_gcra.lua");

/// How long a check may wait for Redis by default: far above a healthy
/// loopback or same-zone round trip, far below what a user notices.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(50);

/// Settings of a [`RedisStore`], each with the reason for its default.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisConfig {
    /// Prefix and hash tag of every key (`{tollgate}:2:ip:ip:192.0.2.1`).
    /// All keys share the tag so one script call may decide several
    /// policies at once on Redis Cluster (one hash slot): exactness and
    /// all-or-nothing over spreading limits across shards.
    pub prefix: String,
    /// Per-check timeout, queueing included ([`DEFAULT_REDIS_TIMEOUT`]). A
    /// timeout is a store error, handled by the failure policy.
    pub timeout: Duration,
    /// Most requests decided by one script call. Concurrent checks are
    /// coalesced, so Redis runs one Lua call per batch, not per request.
    pub max_batch: usize,
    /// Script calls in flight at once. While they all wait, new checks
    /// queue and go out together in the next batch: no fixed batching
    /// delay at low load, large batches at high load.
    pub max_in_flight: usize,
    /// Consecutive failures (errors or timeouts) that open the circuit
    /// breaker: then checks fail at once instead of each waiting out the
    /// timeout, and a background probe closes it when Redis answers again.
    pub failure_threshold: u32,
    /// How often the probe pings a Redis the breaker cut off.
    pub probe_interval: Duration,
    /// Answer keys Redis denied locally until their wait has passed. Off
    /// only to compare stores decision by decision: a locally denied
    /// request cannot report its other policies' state.
    pub local_cache: bool,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            prefix: "tollgate".to_owned(),
            timeout: DEFAULT_REDIS_TIMEOUT,
            max_batch: 256,
            max_in_flight: 2,
            failure_threshold: 3,
            probe_interval: Duration::from_millis(500),
            local_cache: true,
        }
    }
}

/// Where Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedisTarget {
    /// One server (or a primary behind a proxy), e.g. `redis://127.0.0.1:6379`.
    Single(String),
    /// A Redis Cluster, from some of its nodes.
    Cluster(Vec<String>),
}

/// Counters of a [`RedisStore`], for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisStats {
    /// Script calls made to Redis.
    pub script_calls: u64,
    /// Requests (batches of checks) sent to Redis.
    pub requests_sent: u64,
    /// Requests denied from the local over-limit cache, without Redis.
    pub local_denials: u64,
    /// Checks failed at once because the circuit breaker was open.
    pub short_circuited: u64,
    /// Sweeps of a full over-limit cache for expired entries.
    pub cache_sweeps: u64,
}

/// Keys the over-limit cache holds at most; denials beyond it go
/// uncached (Redis still decides them) until a sweep frees room. A full
/// cache is swept at most once per quarter of this many further denials,
/// so a flood of distinct keys costs O(1) amortised per denial.
pub const OVER_LIMIT_CACHE_CAPACITY: usize = 65_536;

/// GCRA state in Redis, shared by every replica: a quota holds for the
/// whole fleet.
///
/// - **Same decisions as [`MemoryStore`](super::MemoryStore)**: the same
///   GCRA arithmetic runs in one atomic Lua script (EVALSHA, reloaded on
///   `NOSCRIPT`), on time from Redis (`TIME`) so replicas with skewed clocks
///   agree. Keys expire when their state stops mattering.
/// - **Batched**: concurrent checks from this replica are coalesced into one
///   script call ([`RedisConfig::max_batch`], [`RedisConfig::max_in_flight`]),
///   each request still decided all-or-nothing.
/// - **Local over-limit cache**: once Redis denies a key with a wait of T,
///   this replica denies that key itself until T has passed, so a flood from
///   one client costs Redis nothing.
/// - **Failing fast**: a per-check timeout, and a circuit breaker that stops
///   sending to a Redis that keeps failing and probes it in the background;
///   [`is_available`](Self::is_available) tells whether it is in use. Errors
///   go to the layer's [`FailurePolicy`](crate::rate_limit::FailurePolicy).
///
/// Construct it inside a Tokio runtime (it spawns its batcher). It connects
/// lazily: a Redis that is down at start-up is a store error on the first
/// checks, not a start-up failure.
///
/// ```no_run
/// use tollgate::rate_limit::{ByClientIp, FailurePolicy, Policy, Quota, RateLimitLayer, RedisStore};
///
/// # #[tokio::main] async fn main() {
/// let store = RedisStore::new("redis://127.0.0.1:6379").unwrap();
/// let layer = RateLimitLayer::new(store)
///     .with_failure_policy(FailurePolicy::Local)
///     .with_policy(Policy::new("ip", ByClientIp::new(), Quota::per_minute(100)));
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    shared: Arc<Shared>,
    jobs: mpsc::Sender<Job>,
}

struct Shared {
    conn: Conn,
    script: Script,
    config: RedisConfig,
    /// Test time: when set, sent to the script instead of Redis's `TIME`.
    script_clock: Option<Arc<dyn Clock>>,
    /// Local time for the over-limit cache.
    clock: Arc<dyn Clock>,
    /// Keys Redis denied, with what the bucket owes: the local time (ns)
    /// from which a request of cost c is allowed at the earliest is this
    /// plus c units' charge. Remembering that instead of the denied
    /// request's wait keeps cheaper requests decided correctly.
    over_limit: DashMap<(u32, Key), u64, foldhash::fast::RandomState>,
    breaker: Breaker,
    stats: Stats,
}

enum Conn {
    Single(ConnectionManager),
    // Boxed: the cluster client is large and this is built once.
    Cluster(Box<ClusterConn>),
}

struct ClusterConn {
    client: redis::cluster::ClusterClient,
    /// Connected on first use, so a cluster that is down at start-up is a
    /// store error, not a start-up failure.
    conn: tokio::sync::OnceCell<redis::cluster_async::ClusterConnection>,
}

impl ClusterConn {
    async fn get(&self) -> Result<redis::cluster_async::ClusterConnection, RedisError> {
        self.conn
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}

#[derive(Default)]
struct Stats {
    script_calls: AtomicU64,
    requests_sent: AtomicU64,
    local_denials: AtomicU64,
    short_circuited: AtomicU64,
    cache_sweeps: AtomicU64,
    /// Denials that found the cache full since its last sweep.
    full_since_sweep: AtomicU64,
}

/// One request's checks, waiting for a batch.
struct Job {
    keys: SmallVec<[String; 2]>,
    /// Per check: interval, capacity, cost, enforce.
    args: SmallVec<[[u64; 4]; 2]>,
    /// To remember denials in the over-limit cache.
    cache_keys: SmallVec<[(u32, Key); 2]>,
    reply: oneshot::Sender<Result<Decisions, StoreError>>,
}

// === impl RedisStore ===

impl RedisStore {
    /// A store on the Redis at `url`, with default settings.
    pub fn new(url: &str) -> Result<Self, StoreError> {
        Self::builder(RedisTarget::Single(url.to_owned())).build()
    }

    /// A builder for `target`.
    pub fn builder(target: RedisTarget) -> RedisStoreBuilder {
        RedisStoreBuilder {
            target,
            config: RedisConfig::default(),
            clock: None,
        }
    }

    /// Counters since start.
    pub fn stats(&self) -> RedisStats {
        let s = &self.shared.stats;
        RedisStats {
            script_calls: s.script_calls.load(Ordering::Relaxed),
            requests_sent: s.requests_sent.load(Ordering::Relaxed),
            local_denials: s.local_denials.load(Ordering::Relaxed),
            short_circuited: s.short_circuited.load(Ordering::Relaxed),
            cache_sweeps: s.cache_sweeps.load(Ordering::Relaxed),
        }
    }

    /// Sends `PING`, within the timeout; for readiness checks. The answer
    /// feeds the circuit breaker like a check's would, so a readiness
    /// check and the limiter see one state of Redis
    /// ([`is_available`](Store::is_available)).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let result = self.shared.ping(self.shared.config.timeout).await;
        match &result {
            Ok(()) => self.shared.breaker.success(),
            Err(_) => self.shared.breaker.failure(&self.shared),
        }
        result
    }

    /// `{prefix}:<policy length>:<policy>:<key>`. The policy's length makes
    /// the name unambiguous whatever the policy and key contain (`:`
    /// included): the policy ends where its length says, the key is the
    /// rest.
    fn key_name(&self, check: &Check) -> String {
        let policy = check.policy.as_str();
        format!(
            "{{{}}}:{}:{policy}:{}",
            self.shared.config.prefix,
            policy.len(),
            check.key
        )
    }

    /// The local denial of a request with a key in the over-limit cache.
    fn local_denial(&self, checks: &[Check]) -> Option<Decisions> {
        if self.shared.over_limit.is_empty() {
            return None;
        }
        let now = nanos(self.shared.clock.now());
        let mut denied = false;
        let each = checks
            .iter()
            .map(|check| {
                let slot = (check.policy.id(), check.key.clone());
                let charge = check.quota.gcra().charge(check.cost);
                let until = self
                    .shared
                    .over_limit
                    .get(&slot)
                    .map(|owed| owed.saturating_add(charge));
                match until {
                    Some(until) if until > now && check.enforce => {
                        denied = true;
                        let wait = Duration::from_nanos(until - now);
                        Decision {
                            allowed: false,
                            remaining: 0,
                            reset_after: wait,
                            retry_after: wait,
                        }
                    }
                    Some(_) => {
                        // Free for any cost from here on: forget it.
                        self.shared
                            .over_limit
                            .remove_if(&slot, |_, owed| *owed <= now);
                        unknown()
                    }
                    None => unknown(),
                }
            })
            .collect();
        denied.then_some(Decisions {
            allowed: false,
            each,
        })
    }
}

/// What a locally denied request reports for its other policies, which
/// Redis was not asked about: nothing left, nothing to wait for.
fn unknown() -> Decision {
    Decision {
        allowed: true,
        remaining: 0,
        reset_after: Duration::ZERO,
        retry_after: Duration::ZERO,
    }
}

impl Store for RedisStore {
    type Future = RedisFuture;

    /// `false` while the circuit breaker is open and checks fail over to
    /// the failure policy.
    fn is_available(&self) -> bool {
        !self.shared.breaker.open.load(Ordering::Acquire)
    }

    fn check(&self, checks: &[Check]) -> Self::Future {
        if let Some(denied) = self.local_denial(checks) {
            self.shared
                .stats
                .local_denials
                .fetch_add(1, Ordering::Relaxed);
            return RedisFuture::ready(Ok(denied));
        }
        if self.shared.breaker.open.load(Ordering::Acquire) {
            self.shared
                .stats
                .short_circuited
                .fetch_add(1, Ordering::Relaxed);
            return RedisFuture::ready(Err(StoreError::new(
                StoreErrorKind::Connection,
                "redis circuit breaker open",
            )));
        }
        let (reply, rx) = oneshot::channel();
        let job = Job {
            keys: checks.iter().map(|c| self.key_name(c)).collect(),
            args: checks
                .iter()
                .map(|c| {
                    let gcra = c.quota.gcra();
                    [
                        gcra.interval(),
                        gcra.capacity(),
                        u64::from(c.cost),
                        u64::from(c.enforce),
                    ]
                })
                .collect(),
            cache_keys: checks
                .iter()
                .map(|c| (c.policy.id(), c.key.clone()))
                .collect(),
            reply,
        };
        if self.jobs.try_send(job).is_err() {
            self.shared.breaker.failure(&self.shared);
            return RedisFuture::ready(Err(StoreError::new(
                StoreErrorKind::Timeout,
                "redis check queue full",
            )));
        }
        RedisFuture::waiting(rx, self.shared.config.timeout, self.shared.clone())
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("config", &self.shared.config)
            .field("available", &self.is_available())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Builds a [`RedisStore`].
pub struct RedisStoreBuilder {
    target: RedisTarget,
    config: RedisConfig,
    clock: Option<Arc<dyn Clock>>,
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("target", &self.target)
            .field("config", &self.config)
            .field("test_clock", &self.clock.is_some())
            .finish()
    }
}

impl RedisStoreBuilder {
    /// Replaces every setting.
    #[must_use]
    pub fn config(mut self, config: RedisConfig) -> Self {
        self.config = config;
        self
    }

    /// Sets the key prefix (and hash tag).
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.prefix = prefix.into();
        self
    }

    /// Sets the per-check timeout.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = timeout;
        self
    }

    /// Sets the most requests decided by one script call (1: one call per
    /// request, the naive way).
    #[must_use]
    pub fn max_batch(mut self, max_batch: usize) -> Self {
        self.config.max_batch = max_batch.max(1);
        self
    }

    /// Sets how many script calls may be in flight at once.
    #[must_use]
    pub fn max_in_flight(mut self, max_in_flight: usize) -> Self {
        self.config.max_in_flight = max_in_flight.max(1);
        self
    }

    /// Turns the local over-limit cache on or off.
    #[must_use]
    pub fn local_cache(mut self, on: bool) -> Self {
        self.config.local_cache = on;
        self
    }

    /// Decides on `clock`'s time instead of Redis's `TIME`, for tests that
    /// compare stores step by step. Never in production: replicas would
    /// disagree by their clock skew.
    #[must_use]
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// Builds the store and starts its batcher. Does not connect yet.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn build(self) -> Result<RedisStore, StoreError> {
        let conn = match self.target {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(url.as_str()).map_err(config_error)?;
                let manager_config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(1)))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(200));
                Conn::Single(
                    ConnectionManager::new_lazy_with_config(client, manager_config)
                        .map_err(config_error)?,
                )
            }
            RedisTarget::Cluster(nodes) => Conn::Cluster(Box::new(ClusterConn {
                client: redis::cluster::ClusterClient::builder(nodes)
                    .connection_timeout(Duration::from_secs(1))
                    .build()
                    .map_err(config_error)?,
                conn: tokio::sync::OnceCell::new(),
            })),
        };
        let clock: Arc<dyn Clock> = match &self.clock {
            Some(clock) => clock.clone(),
            None => Arc::new(MonotonicClock::new()),
        };
        let shared = Arc::new(Shared {
            conn,
            script: Script::new(GCRA_LUA),
            script_clock: self.clock,
            clock,
            over_limit: DashMap::with_hasher(foldhash::fast::RandomState::default()),
            breaker: Breaker::default(),
            stats: Stats::default(),
            config: self.config,
        });
        let (jobs, rx) = mpsc::channel(16 * 1024);
        tokio::spawn(batcher(shared.clone(), rx));
        fallback_gauge(0.0);
        Ok(RedisStore { shared, jobs })
    }
}

fn config_error(err: RedisError) -> StoreError {
    StoreError::new(StoreErrorKind::Connection, err)
}

fn kind_of(err: &RedisError) -> StoreErrorKind {
    if err.is_timeout() {
        StoreErrorKind::Timeout
    } else if err.is_io_error()
        || err.is_connection_refusal()
        || err.is_connection_dropped()
        || err.is_unrecoverable_error()
        || err.is_cluster_error()
    {
        StoreErrorKind::Connection
    } else {
        StoreErrorKind::Response
    }
}

// === batching ===

/// Takes queued jobs, as many as are waiting, into one script call; keeps
/// up to `max_in_flight` calls going. Ends when every store handle is gone.
async fn batcher(shared: Arc<Shared>, mut rx: mpsc::Receiver<Job>) {
    let in_flight = Arc::new(Semaphore::new(shared.config.max_in_flight.max(1)));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        // Whatever queued while we waited for a permit goes in this batch.
        let mut batch = Vec::with_capacity(16);
        batch.push(first);
        while batch.len() < shared.config.max_batch {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // A check that already timed out is not charged behind its back.
        batch.retain(|job| !job.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            shared.run_batch(batch).await;
            drop(permit);
        });
    }
}

impl Shared {
    async fn run_batch(self: &Arc<Self>, batch: Vec<Job>) {
        let mut invocation = self.script.prepare_invoke();
        match &self.script_clock {
            Some(clock) => {
                let now = clock.now();
                invocation.arg(now.as_secs()).arg(now.subsec_nanos());
            }
            None => {
                invocation.arg("").arg("");
            }
        }
        invocation.arg(batch.len());
        for job in &batch {
            invocation.arg(job.keys.len());
            for (key, args) in job.keys.iter().zip(&job.args) {
                invocation.key(key);
                for arg in args {
                    invocation.arg(*arg);
                }
            }
        }
        self.stats.script_calls.fetch_add(1, Ordering::Relaxed);
        self.stats
            .requests_sent
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let result: Result<Vec<i64>, RedisError> = match &self.conn {
            Conn::Single(manager) => invocation.invoke_async(&mut manager.clone()).await,
            Conn::Cluster(cluster) => match cluster.get().await {
                Ok(mut conn) => invocation.invoke_async(&mut conn).await,
                Err(err) => Err(err),
            },
        };
        match result {
            Ok(values) => {
                self.breaker.success();
                self.deliver(batch, &values);
            }
            Err(err) => {
                let kind = kind_of(&err);
                tracing::debug!(%err, "redis rate-limit script failed");
                self.breaker.failure(self);
                let message = err.to_string();
                for job in batch {
                    let _ = job.reply.send(Err(StoreError::new(kind, message.clone())));
                }
            }
        }
    }

    /// Hands each job its decisions and remembers denied keys.
    fn deliver(&self, batch: Vec<Job>, values: &[i64]) {
        let local_now = nanos(self.clock.now());
        let mut values = values.iter().map(|v| u64::try_from(*v).unwrap_or(0));
        for job in batch {
            let Some(allowed) = values.next() else {
                let _ = job.reply.send(Err(StoreError::new(
                    StoreErrorKind::Response,
                    "redis script returned too few values",
                )));
                continue;
            };
            let mut each = SmallVec::new();
            for (cache_key, args) in job.cache_keys.into_iter().zip(&job.args) {
                let mut next = || values.next().unwrap_or(0);
                let decision = Decision {
                    allowed: next() == 1,
                    remaining: next(),
                    reset_after: Duration::from_nanos(next()),
                    retry_after: Duration::from_nanos(next()),
                };
                let enforce = args[3] == 1;
                if self.config.local_cache
                    && enforce
                    && !decision.allowed
                    && !decision.retry_after.is_zero()
                {
                    // The wait was for this request's cost: what the bucket
                    // owes is that wait less the request's own charge.
                    let charge = args[0].saturating_mul(args[2]);
                    let owed = (local_now + nanos(decision.retry_after)).saturating_sub(charge);
                    self.remember_denial(cache_key, owed);
                }
                each.push(decision);
            }
            let _ = job.reply.send(Ok(Decisions {
                allowed: allowed == 1,
                each,
            }));
        }
    }

    fn remember_denial(&self, key: (u32, Key), owed: u64) {
        // Bounded: an attacker rotating keys must not grow it forever. A
        // sweep reads every entry, so a full cache is swept only after a
        // quarter of its capacity of denials found it full.
        if self.over_limit.len() >= OVER_LIMIT_CACHE_CAPACITY {
            let full = self.stats.full_since_sweep.fetch_add(1, Ordering::Relaxed) + 1;
            if full < (OVER_LIMIT_CACHE_CAPACITY / 4) as u64 {
                return;
            }
            self.stats.full_since_sweep.store(0, Ordering::Relaxed);
            self.stats.cache_sweeps.fetch_add(1, Ordering::Relaxed);
            let now = nanos(self.clock.now());
            self.over_limit.retain(|_, owed| *owed > now);
            if self.over_limit.len() >= OVER_LIMIT_CACHE_CAPACITY {
                return;
            }
        }
        self.over_limit.insert(key, owed);
    }

    async fn ping(&self, timeout: Duration) -> Result<(), StoreError> {
        let ping = async {
            let cmd = redis::cmd("PING");
            match &self.conn {
                Conn::Single(manager) => cmd.query_async::<String>(&mut manager.clone()).await,
                Conn::Cluster(cluster) => {
                    cmd.query_async::<String>(&mut cluster.get().await?).await
                }
            }
        };
        match tokio::time::timeout(timeout, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(StoreError::new(kind_of(&err), err)),
            Err(_) => Err(StoreError::new(
                StoreErrorKind::Timeout,
                "redis PING timed out",
            )),
        }
    }
}

// === circuit breaker ===

#[derive(Default)]
struct Breaker {
    failures: AtomicU32,
    open: AtomicBool,
}

impl Breaker {
    fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    fn failure(&self, shared: &Arc<Shared>) {
        if self.count_failure(&shared.config) {
            tokio::spawn(probe(shared.clone()));
        }
    }

    /// Counts a failure; `true` when it opened the breaker.
    fn count_failure(&self, config: &RedisConfig) -> bool {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= config.failure_threshold && !self.open.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                failures,
                "redis rate-limit store unavailable; failing over to the failure policy"
            );
            fallback_gauge(1.0);
            return true;
        }
        false
    }
}

/// `tollgate_ratelimit_fallback_active`: 1 while the breaker is open.
fn fallback_gauge(value: f64) {
    #[cfg(feature = "metrics")]
    metrics::gauge!(crate::metrics::RATELIMIT_FALLBACK_ACTIVE).set(value);
    #[cfg(not(feature = "metrics"))]
    let _ = value;
}

/// Pings a Redis the breaker cut off until it answers, then closes the
/// breaker.
async fn probe(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(shared.config.probe_interval).await;
        if shared.ping(Duration::from_secs(1)).await.is_ok() {
            shared.breaker.failures.store(0, Ordering::Relaxed);
            shared.breaker.open.store(false, Ordering::Release);
            tracing::info!("redis rate-limit store reachable again; back in use");
            fallback_gauge(0.0);
            return;
        }
    }
}

// === future ===

pin_project! {
    /// The future of a [`RedisStore`] check: ready at once when the local
    /// cache or the circuit breaker decides, else waiting for its batch,
    /// within the timeout.
    pub struct RedisFuture {
        #[pin]
        state: State,
    }
}

pin_project! {
    #[project = StateProj]
    enum State {
        /// Decided without Redis.
        Ready { result: Option<Result<Decisions, StoreError>> },
        /// Waiting for the batch's reply.
        Waiting {
            #[pin]
            reply: oneshot::Receiver<Result<Decisions, StoreError>>,
            #[pin]
            deadline: tokio::time::Sleep,
            shared: Arc<Shared>,
        },
    }
}

impl RedisFuture {
    fn ready(result: Result<Decisions, StoreError>) -> Self {
        Self {
            state: State::Ready {
                result: Some(result),
            },
        }
    }

    fn waiting(
        reply: oneshot::Receiver<Result<Decisions, StoreError>>,
        timeout: Duration,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            state: State::Waiting {
                reply,
                deadline: tokio::time::sleep(timeout),
                shared,
            },
        }
    }
}

impl Future for RedisFuture {
    type Output = Result<Decisions, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Ready { result } => {
                Poll::Ready(result.take().expect("polled after completion"))
            }
            StateProj::Waiting {
                reply,
                deadline,
                shared,
            } => {
                if let Poll::Ready(result) = reply.poll(cx) {
                    return Poll::Ready(result.unwrap_or_else(|_| {
                        Err(StoreError::new(
                            StoreErrorKind::Connection,
                            "redis batcher stopped",
                        ))
                    }));
                }
                ready!(deadline.poll(cx));
                shared.breaker.failure(shared);
                Poll::Ready(Err(StoreError::new(
                    StoreErrorKind::Timeout,
                    "redis did not answer within the timeout",
                )))
            }
        }
    }
}

impl fmt::Debug for RedisFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisFuture").finish_non_exhaustive()
    }
}
