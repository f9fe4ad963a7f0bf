//! Cluster-wide singleton jobs on Postgres advisory locks (feature
//! `postgres`).
//!
//! Every replica runs a [`Singleton`]; each cycle, exactly one of them runs
//! the job:
//!
//! - cycles are aligned to the wall clock (cycle `n` starts at
//!   `n × interval` since the Unix epoch), so every replica tries at the
//!   same moment;
//! - the job runs while a transaction, on a connection opened for that
//!   cycle alone, holds `pg_try_advisory_xact_lock(key)`. The lock is
//!   transaction-scoped, so it needs no session: it works the same
//!   through a transaction-mode pooler (PgBouncer), which keeps one server
//!   connection for as long as a transaction lasts, and it is released
//!   when the transaction ends — commit, rollback, or a replica that
//!   crashes and loses its connection. (A session lock taken through such
//!   a pooler would stay on whichever server connection ran it, and the
//!   unlock could run on another.)
//! - a replica that gets the lock first checks [`SCHEMA`]'s table for the
//!   cycle, so a replica whose timer fires late cannot run the same cycle
//!   again after the first has finished; the run is recorded, in the
//!   lock's transaction, when it succeeds: the record and the lock's
//!   release commit together.
//!
//! A cycle is never run twice, but it can be skipped: when a run overruns
//! the next cycle's start, that cycle finds the lock held. Keep jobs well
//! shorter than the interval.
//!
//! Metrics (feature `metrics`): `tollgate_singleton_runs_total{job}`,
//! `tollgate_singleton_skipped_total{job}` (another replica held the lock or
//! had run the cycle), `tollgate_singleton_failures_total{job}`,
//! `tollgate_singleton_duration_seconds{job}`.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use tollgate::singleton::Singleton;
//!
//! /// The lock key: one named constant per job, in one place.
//! const CLEANUP_LOCK: i64 = 0x746f_6c6c_0001;
//!
//! # async fn demo(pool: sqlx::PgPool) {
//! let cleanup = Singleton::new(pool.clone(), "cleanup", CLEANUP_LOCK, Duration::from_secs(60));
//! let task = cleanup.spawn(move || {
//!     let pool = pool.clone();
//!     async move {
//!         sqlx::query("DELETE FROM sessions WHERE expires_at < now()").execute(&pool).await?;
//!         Ok::<_, sqlx::Error>(())
//!     }
//! });
//! # }
//! ```

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::{Connection, PgConnection, PgPool};
use tokio::task::JoinHandle;

/// `tollgate_singleton_runs_total{job}`.
pub const RUNS: &str = "tollgate_singleton_runs_total";
/// `tollgate_singleton_skipped_total{job}`.
pub const SKIPPED: &str = "tollgate_singleton_skipped_total";
/// `tollgate_singleton_failures_total{job}`.
pub const FAILURES: &str = "tollgate_singleton_failures_total";
/// `tollgate_singleton_duration_seconds{job}`.
pub const DURATION: &str = "tollgate_singleton_duration_seconds";

/// The table that records which cycle of which job ran where. Create it
/// in your migrations; the role the server runs as needs `SELECT` and
/// `INSERT` on it.
pub const SCHEMA: &str = "CREATE TABLE tollgate_singleton_runs (
    job         text        NOT NULL,
    cycle       bigint      NOT NULL,
    origin      text        NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job, cycle)
)";

/// How one replica's attempt at a cycle ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CycleOutcome {
    /// This replica ran the job.
    Ran,
    /// Another replica holds the lock.
    Locked,
    /// Another replica has run this cycle already.
    AlreadyRan,
    /// The job returned an error (logged); the cycle is not recorded.
    Failed,
}

/// A periodic job that runs on one replica of the fleet per cycle.
#[derive(Debug, Clone)]
pub struct Singleton {
    pool: PgPool,
    name: &'static str,
    key: i64,
    interval: Duration,
    origin: String,
}

impl Singleton {
    /// The job `name`, locked on advisory lock `key`, every `interval`.
    ///
    /// # Panics
    ///
    /// If `interval` is under a millisecond.
    pub fn new(pool: PgPool, name: &'static str, key: i64, interval: Duration) -> Self {
        assert!(interval >= Duration::from_millis(1), "interval under 1 ms");
        Self {
            pool,
            name,
            key,
            interval,
            origin: format!("pid {}", std::process::id()),
        }
    }

    /// Names this replica in the runs table (default: its pid).
    #[must_use]
    pub fn with_origin(mut self, origin: impl Into<String>) -> Self {
        self.origin = origin.into();
        self
    }

    /// The cycle that `now` falls in.
    pub fn cycle_at(&self, now: SystemTime) -> i64 {
        let millis = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        i64::try_from(millis / self.interval_ms()).unwrap_or(i64::MAX)
    }

    /// The interval in whole milliseconds (cycles are counted in them), at
    /// least 1.
    fn interval_ms(&self) -> u128 {
        self.interval.as_millis().max(1)
    }

    /// When `cycle` starts, on the wall clock. Computed in 128 bits: a
    /// cycle number times the interval does not fit 32 bits for short
    /// intervals (50 ms cycles number about 3.5 × 10^10 today).
    pub fn cycle_start(&self, cycle: i64) -> SystemTime {
        let millis = u128::try_from(cycle).unwrap_or(0) * self.interval_ms();
        u64::try_from(millis)
            .ok()
            .and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
            // Beyond what the clock can represent: never.
            .unwrap_or_else(|| UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX) * 1000))
    }

    /// Runs `job` once per cycle, on this replica when it wins the cycle,
    /// until the task is aborted. Errors are logged and counted, never
    /// fatal.
    pub fn spawn<F, Fut, E>(self, job: F) -> JoinHandle<()>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send,
        E: Display + Send,
    {
        // Every series exists from the start, at 0: "no failure" is a
        // reading, not a missing metric.
        for metric in [RUNS, SKIPPED, FAILURES] {
            self.count_by(metric, 0);
        }
        tokio::spawn(async move {
            loop {
                // Sleep to the start of the next cycle (wall clock).
                let now = SystemTime::now();
                let cycle = self.cycle_at(now).saturating_add(1);
                let start = self.cycle_start(cycle);
                tokio::time::sleep(start.duration_since(now).unwrap_or_default()).await;
                if let Err(err) = self.run_cycle(cycle, &job).await {
                    tracing::warn!(job = self.name, %err, "singleton cycle failed");
                    self.count(FAILURES);
                }
            }
        })
    }

    /// One attempt at `cycle`: lock, check, run, record, commit (which
    /// releases the lock).
    pub async fn run_cycle<F, Fut, E>(
        &self,
        cycle: i64,
        job: &F,
    ) -> Result<CycleOutcome, sqlx::Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Display,
    {
        // Its own connection, so the job's own queries never wait for the
        // pool behind the transaction that holds the lock.
        let mut conn = PgConnection::connect_with(&self.pool.connect_options()).await?;
        let mut tx = conn.begin().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(self.key)
            .fetch_one(&mut *tx)
            .await?;
        let outcome = if locked {
            self.run_locked(&mut tx, cycle, job).await
        } else {
            self.count(SKIPPED);
            Ok(CycleOutcome::Locked)
        };
        // Only a recorded run commits; the lock goes either way.
        match outcome {
            Ok(CycleOutcome::Ran) => {
                tx.commit().await?;
                self.count(RUNS);
            }
            _ => tx.rollback().await?,
        }
        conn.close().await?;
        outcome
    }

    async fn run_locked<F, Fut, E>(
        &self,
        conn: &mut PgConnection,
        cycle: i64,
        job: &F,
    ) -> Result<CycleOutcome, sqlx::Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Display,
    {
        let done: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM tollgate_singleton_runs WHERE job = $1 AND cycle = $2)",
        )
        .bind(self.name)
        .bind(cycle)
        .fetch_one(&mut *conn)
        .await?;
        if done {
            self.count(SKIPPED);
            return Ok(CycleOutcome::AlreadyRan);
        }
        let started = tokio::time::Instant::now();
        let result = job().await;
        #[cfg(feature = "metrics")]
        metrics::histogram!(DURATION, "job" => self.name).record(started.elapsed().as_secs_f64());
        if let Err(err) = result {
            tracing::warn!(job = self.name, cycle, %err, "singleton job failed");
            self.count(FAILURES);
            return Ok(CycleOutcome::Failed);
        }
        sqlx::query("INSERT INTO tollgate_singleton_runs (job, cycle, origin) VALUES ($1, $2, $3)")
            .bind(self.name)
            .bind(cycle)
            .bind(&self.origin)
            .execute(&mut *conn)
            .await?;
        tracing::debug!(job = self.name, cycle, took = ?started.elapsed(), "singleton job ran");
        Ok(CycleOutcome::Ran)
    }

    fn count(&self, metric: &'static str) {
        self.count_by(metric, 1);
    }

    fn count_by(&self, metric: &'static str, n: u64) {
        #[cfg(feature = "metrics")]
        metrics::counter!(metric, "job" => self.name).increment(n);
        #[cfg(not(feature = "metrics"))]
        let _ = (metric, n, self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn singleton(interval: Duration) -> Singleton {
        let pool = PgPool::connect_lazy("postgres://nobody@127.0.0.1:1/none").unwrap();
        Singleton::new(pool, "test", 1, interval)
    }

    /// The next cycle starts after `now` and no later than one interval
    /// after it, for short intervals and far-future clocks alike.
    #[tokio::test]
    async fn the_next_cycle_starts_within_one_interval() {
        let year = Duration::from_secs(365 * 24 * 3600);
        let far_future = UNIX_EPOCH + 500 * year;
        for interval in [1, 50, 200, 417, 1_000, 60_000].map(Duration::from_millis) {
            let singleton = singleton(interval);
            for now in [SystemTime::now(), far_future] {
                let cycle = singleton.cycle_at(now) + 1;
                let start = singleton.cycle_start(cycle);
                let wait = start.duration_since(now).unwrap_or_default();
                assert!(
                    start > now && wait <= interval,
                    "interval {interval:?} at {now:?}: next cycle at {start:?}, {wait:?} away"
                );
            }
        }
    }
}
