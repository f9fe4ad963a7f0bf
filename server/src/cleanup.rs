//! The fleet's cleanup job: purges soft-deleted items older than
//! `ITEM_RETENTION`, on one replica per `CLEANUP_INTERVAL` cycle
//! ([`tollgate::singleton`]).

use std::time::Duration;

use sqlx::PgPool;
use tokio::task::JoinHandle;
use tollgate::singleton::Singleton;

/// The cleanup job's advisory lock key ("tollgate" as a big-endian i64),
/// the only place it is defined.
pub const CLEANUP_LOCK_KEY: i64 = i64::from_be_bytes(*b"tollgate");

/// `tollgate_items_purged_total`.
pub const ITEMS_PURGED: &str = "tollgate_items_purged_total";

/// Starts the job; `origin` names this replica in the runs table.
pub fn spawn(
    pool: PgPool,
    interval: Duration,
    retention: Duration,
    origin: String,
) -> JoinHandle<()> {
    let job_pool = pool.clone();
    Singleton::new(pool, "cleanup", CLEANUP_LOCK_KEY, interval)
        .with_origin(origin)
        .spawn(move || {
            let pool = job_pool.clone();
            async move {
                // In a transaction: DATABASE_URL may be a pooler.
                let mut tx = pool.begin().await?;
                let purged: i64 =
                    sqlx::query_scalar("SELECT purge_deleted_items(make_interval(secs => $1))")
                        .bind(retention.as_secs_f64())
                        .fetch_one(&mut *tx)
                        .await?;
                tx.commit().await?;
                metrics::counter!(ITEMS_PURGED).increment(u64::try_from(purged).unwrap_or(0));
                if purged > 0 {
                    tracing::info!(purged, "cleanup purged deleted items");
                }
                Ok::<_, sqlx::Error>(())
            }
        })
}
