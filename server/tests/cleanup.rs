//! The cleanup job across three server processes on a database of the
//! test's own: each cycle runs on exactly one replica, it purges deleted
//! items, and when the replica that ran last is killed the others carry on.

mod common;

use std::time::Duration;

use common::{Server, cleanup_cycles, client, login, seed_tenant, singleton_runs_without_failures};
use serde_json::json;
use sqlx::PgPool;
use tollgate_test_support::TestDb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_per_cycle_and_the_others_take_over_from_a_killed_one() {
    let db = TestDb::create("cleanup", "SELECT 1").await;
    let (app_url, owner_url) = (db.app_url(), db.owner_url());
    let env = [
        ("DATABASE_URL", app_url.as_str()),
        ("MIGRATION_DATABASE_URL", owner_url.as_str()),
        ("CLEANUP_INTERVAL", "300"),
        ("ITEM_RETENTION", "0"),
    ];
    // Three replicas migrating the fresh database at once (sqlx serialises
    // them with its own advisory lock).
    let mut servers: Vec<Server> = (0..3).map(|_| Server::process(&env)).collect();
    let pool = PgPool::connect(&app_url).await.unwrap();
    let http = client();

    // A deleted item, purged by a later cycle.
    let (_, emails) = seed_tenant(&pool, &[("cleaner", "staff")], 0).await;
    let token = login(&http, &servers[0], &emails[0]).await;
    let res = http
        .post(servers[0].url("/api/v1/items"))
        .bearer_auth(&token)
        .json(&json!({ "name": "short-lived" }))
        .send()
        .await
        .unwrap();
    let id = res.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = servers[1].url(&format!("/api/v1/items/{id}"));
    assert_eq!(
        http.delete(&url)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        http.get(&url)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    tokio::time::sleep(Duration::from_millis(2000)).await;
    let before = cleanup_cycles(&pool).await;
    assert!(before.len() >= 4, "{before:?}");
    for pair in before.windows(2) {
        assert!(pair[1].0 - pair[0].0 <= 2, "cycles ran nowhere: {before:?}");
    }
    // The job body ran exactly once per recorded cycle: a second run of a
    // cycle would fail to record it (primary key) and count a failure.
    let rows_before = cleanup_cycles(&pool).await.len() as f64;
    let runs = singleton_runs_without_failures(&http, &servers).await;
    let rows_after = cleanup_cycles(&pool).await.len() as f64;
    assert!(
        rows_before - 1.0 <= runs && runs <= rows_after,
        "{runs} runs for {rows_before}..{rows_after} recorded cycles"
    );
    // The deleted item is gone for good (the owner sees every row).
    let owner = PgPool::connect(&owner_url).await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM items WHERE id = $1::uuid")
        .bind(&id)
        .fetch_one(&owner)
        .await
        .unwrap();
    assert_eq!(left, 0);

    // Kill (SIGKILL) the replica that ran the last cycle.
    let last = before.last().unwrap().1.clone();
    let victim = servers
        .iter()
        .position(|s| s.base.ends_with(&last))
        .expect("the last origin is one of ours");
    let mut killed = servers.remove(victim);
    killed.child().kill().unwrap();
    killed.child().wait().unwrap();
    let killed_at = cleanup_cycles(&pool).await.last().unwrap().0;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after: Vec<_> = cleanup_cycles(&pool)
        .await
        .into_iter()
        .filter(|(cycle, _)| *cycle > killed_at)
        .collect();
    assert!(after.len() >= 3, "the survivors ran {after:?}");
    assert!(after.iter().all(|(_, origin)| *origin != last), "{after:?}");
    // At most one cycle skipped at a time (a run overrunning the next
    // cycle's start on a loaded machine); never one run twice (primary key).
    for pair in after.windows(2) {
        assert!(pair[1].0 - pair[0].0 <= 2, "{after:?}");
    }
    drop(servers);
    pool.close().await;
    owner.close().await;
    db.drop_now().await;
}
