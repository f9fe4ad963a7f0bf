//! [`TenantPool`]: a Postgres pool shared fairly between tenants.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::TenantId;
use super::transaction::TenantError;

/// A Postgres pool whose connections tenants share fairly.
///
/// - **A cap per tenant**: one tenant holds at most
///   [`with_tenant_max`](Self::with_tenant_max) connections at once (by
///   default the whole pool); its further work waits in its own queue.
/// - **Fair waiting**: work first takes a place in its tenant's queue,
///   then in the pool's FIFO queue. A tenant therefore has at most its cap
///   of requests ahead of anyone else in the pool's queue, whatever it has
///   queued behind: a tenant with 100 waiting requests does not starve one
///   with 1.
/// - **Bounded**: waiting ends after the pool's acquire timeout with a 503
///   ([`TenantError::TenantAtCapacity`] when the tenant held its whole
///   share, else a pool timeout). A tenant's queue entry is removed when
///   it has nothing held or waiting, so memory follows active tenants.
///
/// Give it the pool's only users: connections taken from
/// [`pool`](Self::pool) around it are not counted. Internal work
/// (readiness checks, lookups, listeners) belongs on a separate small pool,
/// so that tenant load cannot make a replica look unhealthy.
///
/// ```
/// use tollgate::tenant::{TenantLayer, TenantPool, FromHeader};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let pool = sqlx::postgres::PgPoolOptions::new()
///     .max_connections(20)
///     .connect_lazy("postgres://app@127.0.0.1/app")
///     .unwrap();
/// // No tenant holds more than a quarter of the pool.
/// let fair = TenantPool::new(pool).with_tenant_max(5);
/// assert_eq!(fair.tenant_max(), 5);
/// let layer = TenantLayer::new(fair.clone(), FromHeader::new(http::HeaderName::from_static("x-tenant-id")));
/// assert_eq!(fair.load(), 0.0);
/// # let _ = layer;
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct TenantPool {
    inner: Arc<Inner>,
}

/// Each tenant's cap on connections; foldhash (seeded per process), as
/// the stores' maps: every request looks its tenant up here.
type Caps = HashMap<TenantId, Arc<Semaphore>, foldhash::fast::RandomState>;

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    size: u32,
    tenant_max: u32,
    acquire_timeout: Duration,
    /// One permit per pooled connection; FIFO, so waiters are served in
    /// arrival order.
    connections: Arc<Semaphore>,
    /// Per tenant: permits up to its cap. Entries exist only while the
    /// tenant holds or waits for a connection.
    tenants: Mutex<Caps>,
    /// Waiting at their tenant's cap.
    waiting_for_tenant: AtomicUsize,
    /// Its transactions' metric handles, registered on first use.
    tx_metrics: std::sync::OnceLock<super::transaction::TxMetrics>,
    /// Waiting for the pool.
    waiting_for_pool: AtomicUsize,
}

impl From<PgPool> for TenantPool {
    fn from(pool: PgPool) -> Self {
        Self::new(pool)
    }
}

impl TenantPool {
    /// Shares `pool` with no per-tenant cap below its size; the wait is
    /// bounded by the pool's acquire timeout.
    pub fn new(pool: PgPool) -> Self {
        let options = pool.options();
        let size = options.get_max_connections().max(1);
        let acquire_timeout = options.get_acquire_timeout();
        Self {
            inner: Arc::new(Inner {
                connections: Arc::new(Semaphore::new(size as usize)),
                pool,
                size,
                tenant_max: size,
                acquire_timeout,
                tenants: Mutex::new(HashMap::default()),
                waiting_for_tenant: AtomicUsize::new(0),
                tx_metrics: std::sync::OnceLock::new(),
                waiting_for_pool: AtomicUsize::new(0),
            }),
        }
    }

    /// One tenant holds at most `max` connections at once (at least 1, at
    /// most the pool's size). Call before cloning.
    ///
    /// # Panics
    ///
    /// If the pool has already been cloned.
    #[must_use]
    pub fn with_tenant_max(mut self, max: u32) -> Self {
        let inner = Arc::get_mut(&mut self.inner).expect("configure before cloning");
        inner.tenant_max = max.clamp(1, inner.size);
        self
    }

    /// The underlying pool.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    pub(crate) fn tx_metrics(&self) -> &super::transaction::TxMetrics {
        self.inner
            .tx_metrics
            .get_or_init(super::transaction::TxMetrics::register)
    }

    /// Connections one tenant may hold at once.
    pub fn tenant_max(&self) -> u32 {
        self.inner.tenant_max
    }

    /// Work waiting for a connection: at its tenant's cap, or in the pool's
    /// queue.
    pub fn waiters(&self) -> usize {
        self.inner.waiting_for_tenant.load(Ordering::Relaxed)
            + self.inner.waiting_for_pool.load(Ordering::Relaxed)
    }

    /// How loaded the pool is: connections held plus work queued for the
    /// pool, over the pool's size. Below 1 there is a free connection; 1.5
    /// means a queue half the pool's size. Work waiting only because its
    /// own tenant is at its cap is not load on anyone else and is left out.
    pub fn load(&self) -> f64 {
        let inner = &self.inner;
        let held = inner.size as usize - inner.connections.available_permits();
        let queued = inner.waiting_for_pool.load(Ordering::Relaxed);
        (held + queued) as f64 / f64::from(inner.size)
    }

    /// Waits (fairly, bounded by the acquire timeout) for the right to use
    /// one connection of [`pool`](Self::pool) for `tenant`. Hold the
    /// permit for as long as the connection is used.
    pub async fn acquire(&self, tenant: TenantId) -> Result<PoolPermit, TenantError> {
        #[cfg(feature = "metrics")]
        let started = tokio::time::Instant::now();
        // Where the work was waiting when the time ran out.
        let at_pool = std::sync::atomic::AtomicBool::new(false);
        let result = tokio::time::timeout(
            self.inner.acquire_timeout,
            self.acquire_inner(tenant, &at_pool),
        )
        .await
        .map_err(|_| {
            if at_pool.load(Ordering::Relaxed) {
                Stage::Pool
            } else {
                Stage::Tenant
            }
        });
        #[cfg(feature = "metrics")]
        let metrics = self.tx_metrics();
        #[cfg(feature = "metrics")]
        metrics
            .acquire_duration
            .record(started.elapsed().as_secs_f64());
        result.and_then(|r| r).map_err(|stage| match stage {
            Stage::Tenant => {
                #[cfg(feature = "metrics")]
                metrics.tenant_cap_rejections.increment(1);
                TenantError::TenantAtCapacity
            }
            Stage::Pool => {
                #[cfg(feature = "metrics")]
                metrics.acquire_timeouts.increment(1);
                TenantError::Database(sqlx::Error::PoolTimedOut)
            }
        })
    }

    /// Tenant queue, then pool queue. On timeout the caller is dropped
    /// here; the error it gets says where it was waiting.
    async fn acquire_inner(
        &self,
        tenant: TenantId,
        at_pool: &std::sync::atomic::AtomicBool,
    ) -> Result<PoolPermit, Stage> {
        let semaphore = {
            let mut tenants = self.inner.lock();
            let tenant_max = self.inner.tenant_max as usize;
            tenants
                .entry(tenant)
                .or_insert_with(|| Arc::new(Semaphore::new(tenant_max)))
                .clone()
        };
        let entry = TenantEntry {
            pool: self.clone(),
            tenant,
            semaphore: Some(semaphore),
        };
        // The semaphores are never closed, so acquiring fails only by
        // timing out. The fast paths skip the waiter bookkeeping.
        let semaphore = entry.semaphore().clone();
        let tenant_permit = match semaphore.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let _waiting = Waiting::new(self, &self.inner.waiting_for_tenant);
                semaphore.acquire_owned().await.map_err(|_| Stage::Tenant)?
            }
        };
        at_pool.store(true, Ordering::Relaxed);
        let connections = &self.inner.connections;
        let connection_permit = match connections.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let _waiting = Waiting::new(self, &self.inner.waiting_for_pool);
                connections
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| Stage::Pool)?
            }
        };
        Ok(PoolPermit {
            tenant_permit: Some(tenant_permit),
            _connection_permit: connection_permit,
            _entry: entry,
        })
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Caps> {
        // Entries are inserted or removed whole.
        self.tenants.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Clone, Copy)]
enum Stage {
    Tenant,
    Pool,
}

/// Counts a waiter while it waits (cancellation included), in `count` and
/// in the waiters gauge of `metrics`.
struct Waiting<'a> {
    count: &'a AtomicUsize,
    #[cfg(feature = "metrics")]
    metrics: &'a super::transaction::TxMetrics,
}

impl<'a> Waiting<'a> {
    fn new(pool: &'a TenantPool, count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        let waiting = Self {
            count,
            #[cfg(feature = "metrics")]
            metrics: pool.tx_metrics(),
        };
        #[cfg(feature = "metrics")]
        waiting.metrics.waiters.increment(1.0);
        #[cfg(not(feature = "metrics"))]
        let _ = pool;
        waiting
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics.waiters.decrement(1.0);
    }
}

/// A tenant's claim on its queue entry; the entry is removed when the
/// last claim goes and nothing is held.
#[derive(Debug)]
struct TenantEntry {
    pool: TenantPool,
    tenant: TenantId,
    semaphore: Option<Arc<Semaphore>>,
}

impl TenantEntry {
    fn semaphore(&self) -> &Arc<Semaphore> {
        self.semaphore.as_ref().expect("present until drop")
    }
}

impl Drop for TenantEntry {
    fn drop(&mut self) {
        let inner = &self.pool.inner;
        let mut tenants = inner.lock();
        // Dropped under the lock, where every other clone is made: a count
        // of one means nobody else holds or waits for this tenant.
        drop(self.semaphore.take());
        if tenants
            .get(&self.tenant)
            .is_some_and(|s| Arc::strong_count(s) == 1)
        {
            tenants.remove(&self.tenant);
        }
    }
}

/// The right to use one connection of a [`TenantPool`] for one tenant;
/// given back when dropped.
#[derive(Debug)]
pub struct PoolPermit {
    tenant_permit: Option<OwnedSemaphorePermit>,
    _connection_permit: OwnedSemaphorePermit,
    _entry: TenantEntry,
}

impl Drop for PoolPermit {
    fn drop(&mut self) {
        // Before the entry's own drop, which removes an idle tenant.
        drop(self.tenant_permit.take());
    }
}
