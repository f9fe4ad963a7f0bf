//! `tollgate::singleton` against a real Postgres: three replicas in one
//! process, each cycle run by exactly one; the holder killed mid-cycle
//! releases the lock and another takes the next cycle.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use tollgate::singleton::{SCHEMA, Singleton};
use tollgate_test_support::TestDb;

const KEY: i64 = 0x7465_7374;

async fn setup(test: &str) -> (TestDb, PgPool) {
    let schema =
        format!("{SCHEMA}; GRANT SELECT, INSERT ON tollgate_singleton_runs TO tollgate_app;");
    let db = TestDb::create(test, &schema).await;
    let pool = PgPool::connect(&db.app_url()).await.unwrap();
    (db, pool)
}

async fn runs(pool: &PgPool) -> Vec<(i64, String)> {
    sqlx::query_as("SELECT cycle, origin FROM tollgate_singleton_runs ORDER BY cycle")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_cycle_runs_on_exactly_one_replica() {
    let (db, pool) = setup("singleton_once").await;
    let executions = Arc::new(AtomicU32::new(0));
    let tasks: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|origin| {
            let executions = executions.clone();
            Singleton::new(pool.clone(), "count", KEY, Duration::from_millis(200))
                .with_origin(origin)
                .spawn(move || {
                    let executions = executions.clone();
                    async move {
                        executions.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, std::convert::Infallible>(())
                    }
                })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for task in &tasks {
        task.abort();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let runs = runs(&pool).await;
    // The job body ran once per recorded cycle: no cycle ran twice. The
    // abort may cut one run between its body and its record (the lock is
    // held by one replica at a time, so at most one): seen once on a
    // loaded machine as 8 bodies for 7 records.
    let executions = executions.load(Ordering::SeqCst) as usize;
    assert!(
        executions == runs.len() || executions == runs.len() + 1,
        "{executions} job bodies for {} recorded cycles: {runs:?}",
        runs.len()
    );
    assert!(
        runs.len() >= 5,
        "only {} cycles in 1.5 s: {runs:?}",
        runs.len()
    );
    // No run of cycles went unrun (a single cycle may be skipped on a
    // loaded machine when every replica's attempt comes late).
    for pair in runs.windows(2) {
        assert!(pair[1].0 - pair[0].0 <= 2, "{runs:?}");
    }
    pool.close().await;
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_holder_mid_cycle_hands_the_next_cycle_to_another() {
    let (db, pool) = setup("singleton_kill").await;
    let running: Arc<Mutex<Option<&'static str>>> = Arc::new(Mutex::new(None));
    let mut tasks = Vec::new();
    for origin in ["a", "b", "c"] {
        let running = running.clone();
        let task = Singleton::new(pool.clone(), "slow", KEY, Duration::from_millis(600))
            .with_origin(origin)
            .spawn(move || {
                let running = running.clone();
                async move {
                    *running.lock().unwrap() = Some(origin);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    *running.lock().unwrap() = None;
                    Ok::<_, std::convert::Infallible>(())
                }
            });
        tasks.push((origin, task));
    }
    // Wait (bounded) for a replica to be inside the job, then kill it there.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let holder = loop {
        if let Some(origin) = *running.lock().unwrap() {
            break origin;
        }
        assert!(tokio::time::Instant::now() < deadline, "no cycle started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let (_, task) = tasks.iter().find(|(o, _)| *o == holder).unwrap();
    task.abort();
    // Its connection closed with it, and so its lock was released: had it
    // not been, no replica could run any later cycle.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    for (_, task) in &tasks {
        task.abort();
    }
    let runs = runs(&pool).await;
    assert!(runs.len() >= 2, "{runs:?}");
    // The holder never finished a cycle; the others ran the later ones. A
    // cycle may be skipped, never run twice: when the re-run of the killed
    // cycle (by a replica that got the lock after the kill) overruns the
    // next cycle's start, that cycle finds the lock held.
    assert!(runs.iter().all(|(_, origin)| origin != holder), "{runs:?}");
    for pair in runs.windows(2) {
        assert!(pair[1].0 - pair[0].0 <= 2, "{runs:?}");
    }
    pool.close().await;
    db.drop_now().await;
}
