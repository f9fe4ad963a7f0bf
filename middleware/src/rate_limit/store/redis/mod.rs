//! The Redis store: one quota for the whole fleet.

mod batch;
mod breaker;
mod cluster;
mod lease;

pub use self::lease::LeaseConfig;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use dashmap::DashMap;
use pin_project_lite::pin_project;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{RedisError, Script};
use smallvec::SmallVec;
use tokio::sync::{mpsc, oneshot};

use self::cluster::{Node, Topology};
use self::lease::Leases;
use super::{Check, Decision, Decisions, Store, StoreError, StoreErrorKind};
use crate::rate_limit::clock::{Clock, MonotonicClock, nanos};
use crate::rate_limit::key::Key;

/// What every script starts with: now, and stored times.
const TIME_LUA: &str = include_str!("time.lua");
/// The GCRA script: the arithmetic of the in-memory store, in Lua.
const GCRA_LUA: &str = include_str!("gcra.lua");
/// The refund of a charge another node's denial voided.
const REFUND_LUA: &str = include_str!("refund.lua");
/// The first line of a script that touches keys of several slots of one
/// cluster node (Redis 7+).
const CROSS_SLOT: &str = "#!lua flags=allow-cross-slot-keys\n";

/// A script and its source, to load it on a node that lacks it.
struct Lua {
    script: Script,
    code: String,
}

impl Lua {
    fn new(code: String) -> Self {
        Self {
            script: Script::new(&code),
            code,
        }
    }
}

/// How long a check may wait for Redis by default: far above a healthy
/// loopback or same-zone round trip, far below what a user notices.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(50);

/// Settings of a [`RedisStore`], each with the reason for its default.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisConfig {
    /// Prefix of every key, so deployments can share a Redis. With
    /// [`Sharding::Slot`] a key is `tollgate:{2:ip:192.0.2.1}` (the policy
    /// and key are the hash tag); with [`Sharding::Single`] the prefix is
    /// the tag: `{tollgate}:2:ip:192.0.2.1`.
    pub prefix: String,
    /// How keys spread over a Redis Cluster ([`Sharding::Slot`]).
    pub sharding: Sharding,
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
    /// Leases for hot keys of some policies; none by default (see
    /// [`LeaseConfig`] for why).
    pub leases: LeaseConfig,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            prefix: "tollgate".to_owned(),
            sharding: Sharding::Slot,
            timeout: DEFAULT_REDIS_TIMEOUT,
            max_batch: 256,
            max_in_flight: 2,
            failure_threshold: 3,
            probe_interval: Duration::from_millis(500),
            local_cache: true,
            leases: LeaseConfig::default(),
        }
    }
}

/// How a [`RedisStore`]'s keys spread over a Redis Cluster. On a single
/// server both decide alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Sharding {
    /// Each (policy, key) in its own hash slot, so keys spread over every
    /// master and the fleet's limiting grows with the cluster. A request
    /// whose policies live on several masters gets one script call per
    /// master; when one denies, what the others charged is refunded (see
    /// [`RedisStore`] for what an observer can see meanwhile).
    #[default]
    Slot,
    /// Every key in one slot (the prefix is the hash tag): a request is
    /// decided by one script on one master, atomically, and that master
    /// decides the whole fleet's limits.
    Single,
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
    /// Script calls made to Redis (one per node per batch).
    pub script_calls: u64,
    /// Requests (batches of checks) sent to Redis.
    pub requests_sent: u64,
    /// Requests denied from the local over-limit cache, without Redis.
    pub local_denials: u64,
    /// Requests failed at once because a node's circuit breaker was open.
    pub short_circuited: u64,
    /// Sweeps of a full over-limit cache for expired entries.
    pub cache_sweeps: u64,
    /// Checks charged on one node and given back because another node
    /// denied (or failed) the same request.
    pub refunds: u64,
    /// Refunds that did not reach their node: those charges stay until
    /// they drain.
    pub refund_failures: u64,
    /// Leases granted for hot keys.
    pub leases: u64,
    /// Requests decided from a lease, without Redis.
    pub lease_hits: u64,
    /// Leased units not used, given back when their lease ended.
    pub lease_units_returned: u64,
    /// Leased units held now, neither used nor given back: the most
    /// requests the fleet may deny early because of this replica.
    pub lease_units_outstanding: u64,
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
///   GCRA arithmetic runs in a Lua script (EVALSHA, reloaded on
///   `NOSCRIPT`), on time from Redis (`TIME`) so replicas with skewed clocks
///   agree. Keys expire when their state stops mattering.
/// - **Batched**: concurrent checks from this replica are coalesced, one
///   script call per Redis node per batch ([`RedisConfig::max_batch`],
///   [`RedisConfig::max_in_flight`]), each request still decided
///   all-or-nothing.
/// - **Spread over a cluster** ([`Sharding::Slot`], the default): each
///   (policy, key) has its own hash slot, so every master takes its share
///   of the keys, and a batch's calls to the masters run in parallel.
/// - **Local over-limit cache**: once Redis denies a key with a wait of T,
///   this replica denies that key itself until T has passed, so a flood from
///   one client costs Redis nothing.
/// - **Failing fast, per node**: a per-call timeout, and a circuit breaker
///   per node that stops sending to a node that keeps failing and probes it
///   in the background. A request with a key on a failed node goes to the
///   layer's [`FailurePolicy`](crate::rate_limit::FailurePolicy); requests
///   whose keys live on the other nodes are still decided by Redis.
///   [`is_available`](Self::is_available) is `false` while any breaker is
///   open.
///
/// # All-or-nothing across nodes
///
/// With [`Sharding::Single`] (or one server) a request is decided by one
/// script, atomically. With [`Sharding::Slot`] on a cluster a request whose
/// policies live on several masters is decided by one script per master,
/// at once; when one master denies (or fails), the others' charges are
/// refunded before the request is answered, so when its answer arrives a
/// denied request has charged nothing. The guarantee, exactly:
///
/// - **Never more admitted than the quota.** Every admission was charged
///   on every node of the request before it was answered.
/// - **A refund never takes back someone else's charge.** It gives back at
///   most the part of its own charge still ahead of the node's clock; a
///   charge by another request stacked on it stays.
/// - **What an observer sees meanwhile**: between the charge and its refund
///   (one round trip, at most [`RedisConfig::timeout`]) a request on the
///   node that allowed sees the bucket charged, and may be denied where it
///   would otherwise have passed — by at most the refunded request's cost.
///   It can never be admitted because of the refund.
/// - **A refund that fails** (the node went down) leaves that charge to
///   drain like any other: the key's allowance is short by the request's
///   cost until then. Counted in [`RedisStats::refund_failures`].
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
    /// The GCRA script with its keys declared (one server, or one slot).
    script: Lua,
    /// The GCRA script with its keys in ARGV and the flag that lets it
    /// touch several slots of one node (cluster, [`Sharding::Slot`]).
    cross_slot_script: Lua,
    refund_script: Lua,
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
    /// Where keys go; replaced when the cluster's slot map is read again.
    topology: RwLock<Arc<Topology>>,
    /// Every node seen, by label: breakers outlive slot-map refreshes.
    nodes: Mutex<HashMap<String, Arc<Node>>>,
    /// A slot-map refresh is running.
    refreshing: AtomicBool,
    /// Leases of hot keys, when any policy has them.
    leases: Option<Leases>,
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
    refunds: AtomicU64,
    refund_failures: AtomicU64,
    leases: AtomicU64,
    lease_hits: AtomicU64,
    lease_units_returned: AtomicU64,
    /// Denials that found the cache full since its last sweep.
    full_since_sweep: AtomicU64,
}

/// One request's checks, waiting for a batch.
struct Job {
    keys: SmallVec<[String; 2]>,
    /// Per check: interval, capacity, cost, enforce, units to lease.
    args: SmallVec<[[u64; 5]; 2]>,
    /// To remember denials in the over-limit cache.
    cache_keys: SmallVec<[(u32, Key); 2]>,
    /// Taken when the request is answered.
    reply: Option<oneshot::Sender<Result<Decisions, StoreError>>>,
    /// Sent again after a slot moved under it (once).
    retried: bool,
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
            refunds: s.refunds.load(Ordering::Relaxed),
            refund_failures: s.refund_failures.load(Ordering::Relaxed),
            leases: s.leases.load(Ordering::Relaxed),
            lease_hits: s.lease_hits.load(Ordering::Relaxed),
            lease_units_returned: s.lease_units_returned.load(Ordering::Relaxed),
            lease_units_outstanding: self
                .shared
                .leases
                .as_ref()
                .map_or(0, |l| l.outstanding.load(Ordering::Relaxed)),
        }
    }

    /// Sends `PING` to every node (every master of a cluster), within the
    /// timeout; for readiness checks. Each answer feeds that node's circuit
    /// breaker like a check's would, so a readiness check and the limiter
    /// see one state of Redis ([`is_available`](Store::is_available)).
    ///
    /// Fails only when no node answers: with one master of a cluster down,
    /// the others still decide their keys, and a replica that took itself
    /// out of its load balancer for that would take every key with it. A
    /// failed node shows in [`ping_nodes`](Self::ping_nodes) and in the
    /// `tollgate_ratelimit_redis_node_up` gauge.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let answers = self.ping_nodes().await?;
        if answers.iter().any(|(_, answer)| answer.is_ok()) {
            return Ok(());
        }
        let failed: Vec<String> = answers
            .into_iter()
            .filter_map(|(_, answer)| answer.err().map(|e| e.to_string()))
            .collect();
        Err(StoreError::new(
            StoreErrorKind::Connection,
            format!("no redis node answers: {}", failed.join("; ")),
        ))
    }

    /// [`ping`](Self::ping) of each node, by label (`host:port`, or `redis`
    /// for one server). Fails when a cluster's slot map cannot be read.
    pub async fn ping_nodes(&self) -> Result<Vec<(String, Result<(), StoreError>)>, StoreError> {
        let shared = &self.shared;
        let topology = shared.topology().await?;
        let mut pings = Vec::with_capacity(topology.nodes.len());
        for node in &topology.nodes {
            pings.push(shared.ping_node(node));
        }
        let answers = futures_util::future::join_all(pings).await;
        Ok(topology
            .nodes
            .iter()
            .map(|node| node.label.clone())
            .zip(answers)
            .collect())
    }

    /// The key's name in Redis. `<policy length>:<policy>:<key>`, after
    /// the prefix: the policy's length makes the name unambiguous whatever
    /// the policy and key contain (`:` included). With [`Sharding::Slot`]
    /// the part after the prefix is the hash tag, so each (policy, key)
    /// hashes alone; with [`Sharding::Single`] the prefix is.
    fn key_name(&self, check: &Check) -> String {
        let policy = check.policy.as_str();
        let prefix = &self.shared.config.prefix;
        match self.shared.config.sharding {
            Sharding::Slot => format!("{prefix}:{{{}:{policy}:{}}}", policy.len(), check.key),
            Sharding::Single => format!("{{{prefix}}}:{}:{policy}:{}", policy.len(), check.key),
        }
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

    /// Decides a request from this replica's leases when every check has
    /// one with the units. Otherwise puts back what it took, and marks in
    /// `lease` the units to ask Redis for, per check of a hot key.
    fn decide_from_leases(&self, checks: &[Check], lease: &mut [u64]) -> Option<Decisions> {
        let leases = self.shared.leases.as_ref()?;
        let now = nanos(self.shared.clock.now());
        let stale_after = 2 * nanos(self.shared.config.timeout);
        let mut local = true;
        let mut each = SmallVec::new();
        let mut taken: SmallVec<[usize; 2]> = SmallVec::new();
        for (i, check) in checks.iter().enumerate() {
            let id = check.policy.id();
            if !leases.covers(id) {
                local = false;
                continue;
            }
            let key = (id, check.key.clone());
            let seen = leases.seen(&key, now);
            let gcra = check.quota.gcra();
            if local {
                let quota = (gcra.interval(), gcra.capacity());
                if let Some((units, reset)) = leases.take(&key, u64::from(check.cost), quota, now) {
                    taken.push(i);
                    each.push(Decision {
                        allowed: true,
                        remaining: units,
                        reset_after: Duration::from_nanos(reset),
                        retry_after: Duration::ZERO,
                    });
                    continue;
                }
                local = false;
            }
            let units = leases.units_for(seen, gcra.capacity() / gcra.interval());
            if units > 0 && leases.start_request(&key, now, stale_after) {
                lease[i] = units;
            }
        }
        if local {
            self.shared.stats.lease_hits.fetch_add(1, Ordering::Relaxed);
            #[cfg(feature = "metrics")]
            metrics::counter!(crate::metrics::RATELIMIT_LEASE_HITS).increment(1);
            return Some(Decisions {
                allowed: true,
                each,
            });
        }
        for i in taken {
            let check = &checks[i];
            leases.untake(
                &(check.policy.id(), check.key.clone()),
                u64::from(check.cost),
            );
        }
        None
    }

    /// A node of these keys whose breaker is open, if any.
    fn open_node(&self, keys: &[String]) -> Option<Arc<Node>> {
        if !breaker::any_open() {
            return None;
        }
        let topology = self.shared.current_topology();
        if !topology.nodes.iter().any(|n| n.breaker.is_open()) {
            return None;
        }
        keys.iter()
            .filter_map(|key| topology.node_of(key))
            .map(|i| &topology.nodes[i])
            .find(|node| node.breaker.is_open())
            .cloned()
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

    /// `false` while any node's circuit breaker is open and checks with
    /// keys on it go to the failure policy.
    fn is_available(&self) -> bool {
        !breaker::any_open()
            || !self
                .shared
                .current_topology()
                .nodes
                .iter()
                .any(|n| n.breaker.is_open())
    }

    fn check(&self, checks: &[Check]) -> Self::Future {
        if let Some(denied) = self.local_denial(checks) {
            self.shared
                .stats
                .local_denials
                .fetch_add(1, Ordering::Relaxed);
            #[cfg(feature = "metrics")]
            metrics::counter!(crate::metrics::RATELIMIT_LOCAL_CACHE_HITS).increment(1);
            return RedisFuture::ready(Ok(denied));
        }
        let mut lease: SmallVec<[u64; 2]> = smallvec::smallvec![0; checks.len()];
        if let Some(leased) = self.decide_from_leases(checks, &mut lease) {
            return RedisFuture::ready(Ok(leased));
        }
        let keys: SmallVec<[String; 2]> = checks.iter().map(|c| self.key_name(c)).collect();
        if let Some(node) = self.open_node(&keys) {
            self.shared
                .stats
                .short_circuited
                .fetch_add(1, Ordering::Relaxed);
            return RedisFuture::ready(Err(StoreError::new(
                StoreErrorKind::Connection,
                format!(
                    "redis node {} unavailable (circuit breaker open)",
                    node.label
                ),
            )));
        }
        let (reply, rx) = oneshot::channel();
        let job = Job {
            keys,
            args: checks
                .iter()
                .zip(&lease)
                .map(|(c, lease)| {
                    let gcra = c.quota.gcra();
                    [
                        gcra.interval(),
                        gcra.capacity(),
                        u64::from(c.cost),
                        u64::from(c.enforce),
                        *lease,
                    ]
                })
                .collect(),
            cache_keys: checks
                .iter()
                .map(|c| (c.policy.id(), c.key.clone()))
                .collect(),
            reply: Some(reply),
            retried: false,
        };
        if self.jobs.try_send(job).is_err() {
            return RedisFuture::ready(Err(StoreError::new(
                StoreErrorKind::Timeout,
                "redis check queue full",
            )));
        }
        RedisFuture::waiting(rx, self.shared.config.timeout)
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

    /// Sets the key prefix.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.prefix = prefix.into();
        self
    }

    /// Sets how keys spread over a cluster.
    #[must_use]
    pub fn sharding(mut self, sharding: Sharding) -> Self {
        self.config.sharding = sharding;
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

    /// Sets how many batches may be in flight at once.
    #[must_use]
    pub fn max_in_flight(mut self, max_in_flight: usize) -> Self {
        self.config.max_in_flight = max_in_flight.max(1);
        self
    }

    /// Sets the leases of hot keys.
    #[must_use]
    pub fn leases(mut self, leases: LeaseConfig) -> Self {
        self.config.leases = leases;
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
    /// # Errors
    ///
    /// A URL Redis cannot parse, or with [`Sharding::Slot`] a prefix with
    /// `{` or `}` (it would be the hash tag of every key).
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn build(self) -> Result<RedisStore, StoreError> {
        let sharding = self.config.sharding;
        if sharding == Sharding::Slot && self.config.prefix.contains(['{', '}']) {
            return Err(StoreError::new(
                StoreErrorKind::Response,
                format!(
                    "redis key prefix {:?} has a hash tag; with slot sharding the policy and key are the tag",
                    self.config.prefix
                ),
            ));
        }
        let (conn, topology) = match self.target {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(url.as_str()).map_err(config_error)?;
                let manager_config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(1)))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(200));
                let conn = Conn::Single(
                    ConnectionManager::new_lazy_with_config(client, manager_config)
                        .map_err(config_error)?,
                );
                let node = Arc::new(Node::new("redis".to_owned(), None));
                (conn, Topology::single(node))
            }
            RedisTarget::Cluster(nodes) => {
                let conn = Conn::Cluster(Box::new(ClusterConn {
                    client: redis::cluster::ClusterClient::builder(nodes)
                        .connection_timeout(Duration::from_secs(1))
                        .response_timeout(self.config.timeout.max(Duration::from_millis(10)))
                        // Our own timeout and breakers decide; one retry
                        // covers a connection that just dropped.
                        .retries(1)
                        .build()
                        .map_err(config_error)?,
                    conn: tokio::sync::OnceCell::new(),
                }));
                let topology = match sharding {
                    // One slot: the key routes each call; one breaker.
                    Sharding::Single => {
                        // Every key is `{prefix}:…`: one slot, one master.
                        let tag = format!("{{{}}}", self.config.prefix);
                        let slot = cluster::slot_of(tag.as_bytes());
                        Topology::single(Arc::new(Node::owning("cluster".to_owned(), slot)))
                    }
                    Sharding::Slot => Topology::unknown(),
                };
                (conn, topology)
            }
        };
        let clock: Arc<dyn Clock> = match &self.clock {
            Some(clock) => clock.clone(),
            None => Arc::new(MonotonicClock::new()),
        };
        for node in &topology.nodes {
            breaker::node_gauge(&node.label, 1.0);
        }
        let shared = Arc::new(Shared {
            conn,
            script: Lua::new(format!("{TIME_LUA}{GCRA_LUA}")),
            cross_slot_script: Lua::new(format!("{CROSS_SLOT}{TIME_LUA}{GCRA_LUA}")),
            refund_script: Lua::new(format!("{CROSS_SLOT}{TIME_LUA}{REFUND_LUA}")),
            script_clock: self.clock,
            clock,
            over_limit: DashMap::with_hasher(foldhash::fast::RandomState::default()),
            topology: RwLock::new(Arc::new(topology)),
            nodes: Mutex::new(HashMap::new()),
            refreshing: AtomicBool::new(false),
            leases: Leases::new(self.config.leases.clone()),
            stats: Stats::default(),
            config: self.config,
        });
        let (jobs, rx) = mpsc::channel(16 * 1024);
        tokio::spawn(batch::batcher(shared.clone(), rx));
        if shared.leases.is_some() {
            tokio::spawn(batch::lease_sweeper(Arc::downgrade(&shared)));
        }
        breaker::fallback_gauge(0);
        Ok(RedisStore { shared, jobs })
    }
}

fn config_error(err: RedisError) -> StoreError {
    StoreError::new(StoreErrorKind::Connection, err)
}

/// Whether `err` says the call went to a node that does not own (all) its
/// keys: a slot moved (`MOVED`, `ASK`, `TRYAGAIN` during a migration,
/// `CROSSSLOT`) or a script touched a key another node owns. The slot map
/// is stale, the node is healthy: not a failure for its breaker.
fn is_routing_error(err: &RedisError) -> bool {
    use redis::ServerErrorKind::{Ask, CrossSlot, Moved, TryAgain};
    matches!(
        err.kind(),
        redis::ErrorKind::Server(Moved | Ask | TryAgain | CrossSlot)
    ) || err.to_string().contains("non local key")
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

// === nodes ===

impl Shared {
    /// The topology as last read, without waiting.
    fn current_topology(&self) -> Arc<Topology> {
        self.topology
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The topology, reading the cluster's slot map first if it was never
    /// read.
    async fn topology(&self) -> Result<Arc<Topology>, StoreError> {
        let topology = self.current_topology();
        if !topology.is_unknown() {
            return Ok(topology);
        }
        self.refresh_topology().await
    }

    /// Reads the cluster's slot map (`CLUSTER SLOTS`) again.
    async fn refresh_topology(&self) -> Result<Arc<Topology>, StoreError> {
        let Conn::Cluster(cluster) = &self.conn else {
            return Ok(self.current_topology());
        };
        let read = async {
            let mut conn = cluster.get().await?;
            redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<redis::Value>(&mut conn)
                .await
        };
        let reply = match tokio::time::timeout(Duration::from_secs(1), read).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(err)) => return Err(StoreError::new(kind_of(&err), err)),
            Err(_) => {
                return Err(StoreError::new(
                    StoreErrorKind::Timeout,
                    "redis CLUSTER SLOTS timed out",
                ));
            }
        };
        let topology = Topology::from_cluster_slots(reply, |host, port| {
            let label = format!("{host}:{port}");
            self.nodes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(label.clone())
                .or_insert_with(|| {
                    breaker::node_gauge(&label, 1.0);
                    Arc::new(Node::new(label, Some((host.to_owned(), port))))
                })
                .clone()
        })
        .map_err(|err| StoreError::new(StoreErrorKind::Response, err))?;
        let topology = Arc::new(topology);
        *self.topology.write().unwrap_or_else(|e| e.into_inner()) = topology.clone();
        Ok(topology)
    }

    /// Reads the slot map again in the background (once at a time): a node
    /// failed or answered that it no longer holds a key.
    fn refresh_soon(self: &Arc<Self>) {
        if matches!(self.conn, Conn::Single(_))
            || self.config.sharding == Sharding::Single
            || self.refreshing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let shared = self.clone();
        tokio::spawn(async move {
            if let Err(err) = shared.refresh_topology().await {
                tracing::debug!(%err, "cannot read the redis cluster's slot map");
            }
            shared.refreshing.store(false, Ordering::Release);
        });
    }

    /// Counts a node's failure; opens its breaker (and starts its probe)
    /// at the threshold.
    fn node_failed(self: &Arc<Self>, node: &Arc<Node>) {
        if node
            .breaker
            .failure(self.config.failure_threshold, &node.label)
        {
            tokio::spawn(probe(self.clone(), node.clone()));
        }
        self.refresh_soon();
    }

    /// Runs `cmd` on `node`: routed to its address on a cluster, else to
    /// the one server (or, with one hash slot, by the command's key).
    async fn query(&self, node: &Node, cmd: &redis::Cmd) -> Result<redis::Value, RedisError> {
        match &self.conn {
            Conn::Single(manager) => cmd.query_async(&mut manager.clone()).await,
            Conn::Cluster(cluster) => {
                let mut conn = cluster.get().await?;
                let route = match (&node.address, node.slot) {
                    (Some((host, port)), _) => SingleNodeRoutingInfo::ByAddress {
                        host: host.clone(),
                        port: *port,
                    },
                    (None, Some(slot)) => {
                        SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master))
                    }
                    (None, None) => return cmd.query_async(&mut conn).await,
                };
                // Routed commands hand a server's error back as a value.
                conn.route_command(cmd.clone(), RoutingInfo::SingleNode(route))
                    .await?
                    .extract_error()
            }
        }
    }

    /// Runs `cmd`, an `EVALSHA` of `script`, on `node`, loading the
    /// script there first when the node does not know it.
    async fn eval(
        &self,
        node: &Node,
        script: &Lua,
        cmd: &redis::Cmd,
    ) -> Result<redis::Value, RedisError> {
        match self.query(node, cmd).await {
            Err(err)
                if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                let mut load = redis::cmd("SCRIPT");
                load.arg("LOAD").arg(&script.code);
                self.query(node, &load).await?;
                self.query(node, cmd).await
            }
            result => result,
        }
    }

    /// [`RedisStore::ping`] of one node.
    async fn ping_node(self: &Arc<Self>, node: &Arc<Node>) -> Result<(), StoreError> {
        let result = self.ping(node, self.config.timeout).await;
        match &result {
            Ok(()) => node.breaker.success(),
            Err(_) => self.node_failed(node),
        }
        result.map_err(|err| StoreError::new(err.kind(), format!("{}: {err}", node.label)))
    }

    async fn ping(&self, node: &Node, timeout: Duration) -> Result<(), StoreError> {
        match tokio::time::timeout(timeout, self.query(node, &redis::cmd("PING"))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(StoreError::new(kind_of(&err), err)),
            Err(_) => Err(StoreError::new(
                StoreErrorKind::Timeout,
                "redis PING timed out",
            )),
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
}

/// Pings a node its breaker cut off until it answers, then closes the
/// breaker.
async fn probe(shared: Arc<Shared>, node: Arc<Node>) {
    loop {
        tokio::time::sleep(shared.config.probe_interval).await;
        if shared.ping(&node, Duration::from_secs(1)).await.is_ok() {
            node.breaker.close(&node.label);
            return;
        }
        // A failed-over master is replaced by its replica in the slot map.
        shared.refresh_soon();
        if !shared
            .current_topology()
            .nodes
            .iter()
            .any(|n| Arc::ptr_eq(n, &node))
        {
            // No longer serving slots: its keys went elsewhere.
            node.breaker.close(&node.label);
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

    fn waiting(reply: oneshot::Receiver<Result<Decisions, StoreError>>, timeout: Duration) -> Self {
        Self {
            state: State::Waiting {
                reply,
                deadline: tokio::time::sleep(timeout),
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
            StateProj::Waiting { reply, deadline } => {
                if let Poll::Ready(result) = reply.poll(cx) {
                    return Poll::Ready(result.unwrap_or_else(|_| {
                        Err(StoreError::new(
                            StoreErrorKind::Connection,
                            "redis batcher stopped",
                        ))
                    }));
                }
                // The batch's calls have timeouts of their own, which feed
                // the breakers; this bounds the wait in the queue too.
                ready!(deadline.poll(cx));
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
