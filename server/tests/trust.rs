//! Trust levels across replicas: two server processes on one Postgres, a
//! downgrade made through one enforced by the other, with and without the
//! LISTEN/NOTIFY broadcast, and after the listener's connection is killed.

mod common;

use std::time::Duration;

use common::{Server, app_pool, client, login, metric, seed_tenant, user_id};
use serde_json::json;
use tokio::time::Instant;

const QUOTAS: &[(&str, &str)] = &[
    ("RATE_LIMIT_TRUST_NEW", "2/min"),
    ("RATE_LIMIT_TRUST_BASIC", "1000/min"),
    ("RATE_LIMIT_CLASS_READ", "100000/min"),
    ("RATE_LIMIT_CLASS_WRITE", "100000/min"),
    ("RATE_LIMIT_TENANT", "100000/min"),
    ("RATE_LIMIT_IP", "100000/min"),
    ("RATE_LIMIT_CLASS_AUTH", "100000/min"),
];

struct Fleet {
    a: Server,
    b: Server,
    staff_token: String,
    user_token: String,
    user: uuid::Uuid,
}

async fn fleet(a_env: &[(&str, &str)], b_env: &[(&str, &str)]) -> Fleet {
    let a = Server::process(&with_quotas(a_env));
    let b = Server::process(&with_quotas(b_env));
    let pool = app_pool().await;
    let (tenant, emails) = seed_tenant(&pool, &[("staff", "staff"), ("user", "basic")], 0).await;
    let http = client();
    let staff_token = login(&http, &a, &emails[0]).await;
    let user_token = login(&http, &b, &emails[1]).await;
    let user = user_id(&pool, tenant, &emails[1]).await;
    Fleet {
        a,
        b,
        staff_token,
        user_token,
        user,
    }
}

/// [`QUOTAS`] followed by `extra` (later entries win).
fn with_quotas<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    QUOTAS.iter().chain(extra).copied().collect()
}

/// The trust quota `server` applies to `token` now.
async fn trust_quota(server: &Server, token: &str) -> String {
    common::trust_quota(&client(), server, token).await
}

async fn downgrade(fleet: &Fleet) {
    let res = client()
        .put(fleet.a.url(&format!("/api/v1/users/{}/trust", fleet.user)))
        .bearer_auth(&fleet.staff_token)
        .json(&json!({ "trust_level": "new" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
}

/// How long until `server` applies the `new` quota, polling every 20 ms
/// for at most `within`.
async fn enforced_after(fleet: &Fleet, server: &Server, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if trust_quota(server, &fleet.user_token).await == "q=2" {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test]
async fn a_downgrade_through_one_replica_is_enforced_by_the_other_within_a_second() {
    let fleet = fleet(&[], &[]).await;
    // B has the user's `basic` level cached.
    assert_eq!(trust_quota(&fleet.b, &fleet.user_token).await, "q=1000");
    assert_eq!(trust_quota(&fleet.b, &fleet.user_token).await, "q=1000");
    downgrade(&fleet).await;
    // A applies its own change at once (after its commit).
    assert_eq!(trust_quota(&fleet.a, &fleet.user_token).await, "q=2");
    let took = enforced_after(&fleet, &fleet.b, Duration::from_secs(1)).await;
    eprintln!("B enforced the downgrade after {took:?}");
    assert!(took.is_some(), "B still applied the old level after 1 s");
    let http = client();
    assert!(metric(&http, &fleet.b, "tollgate_cache_invalidations_total").await >= 1.0);
    assert_eq!(
        metric(&http, &fleet.b, "tollgate_cache_listener_connected").await,
        1.0
    );
}

#[tokio::test]
async fn without_the_broadcast_the_ttl_bounds_staleness() {
    let ttl = [("TRUST_CACHE_TTL", "1500")];
    let off = [
        ("TRUST_CACHE_TTL", "1500"),
        ("TRUST_BROADCAST_ENABLED", "false"),
    ];
    let fleet = fleet(&ttl, &off).await;
    assert_eq!(trust_quota(&fleet.b, &fleet.user_token).await, "q=1000");
    downgrade(&fleet).await;
    // Still cached on B right after the change…
    assert_eq!(trust_quota(&fleet.b, &fleet.user_token).await, "q=1000");
    // …and enforced once the entry expires.
    let took = enforced_after(&fleet, &fleet.b, Duration::from_millis(3000)).await;
    eprintln!("without broadcast, B enforced the downgrade after {took:?} (TTL 1.5 s)");
    assert!(took.is_some(), "B never applied the new level");
}

#[tokio::test]
async fn the_listener_reconnects_after_its_connection_is_killed() {
    let fleet = fleet(&[], &[]).await;
    let pool = app_pool().await;
    let name = format!(
        "tollgate-listener {}",
        fleet.b.base.trim_start_matches("http://")
    );
    let kill =
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1";
    // The listener connects in the background: wait (bounded) until it has.
    let deadline = Instant::now() + Duration::from_secs(5);
    let killed: i64 = loop {
        let n: i64 = sqlx::query_scalar(kill)
            .bind(&name)
            .fetch_one(&pool)
            .await
            .unwrap();
        if n > 0 || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(killed, 1, "no listener connection named {name:?}");

    // Back within the first back-off step (1 s), then working again.
    let deadline = Instant::now() + Duration::from_secs(5);
    let http = client();
    while metric(&http, &fleet.b, "tollgate_cache_listener_reconnects_total").await < 1.0
        || metric(&http, &fleet.b, "tollgate_cache_listener_connected").await < 1.0
    {
        assert!(Instant::now() < deadline, "the listener did not reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(trust_quota(&fleet.b, &fleet.user_token).await, "q=1000");
    downgrade(&fleet).await;
    let took = enforced_after(&fleet, &fleet.b, Duration::from_secs(1)).await;
    assert!(took.is_some(), "B missed the change after reconnecting");
}

#[tokio::test]
async fn only_the_highest_level_changes_levels() {
    let fleet = fleet(&[], &[]).await;
    let res = client()
        .put(fleet.a.url(&format!("/api/v1/users/{}/trust", fleet.user)))
        .bearer_auth(&fleet.user_token)
        .json(&json!({ "trust_level": "staff" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let res = client()
        .put(fleet.a.url(&format!("/api/v1/users/{}/trust", fleet.user)))
        .bearer_auth(&fleet.staff_token)
        .json(&json!({ "trust_level": "overlord" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 422);
    let res = client()
        .put(
            fleet
                .a
                .url(&format!("/api/v1/users/{}/trust", uuid::Uuid::new_v4())),
        )
        .bearer_auth(&fleet.staff_token)
        .json(&json!({ "trust_level": "new" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
}

/// Misses for one subject arriving together share one query (single
/// flight); all of them get the level. In-process, on the shared database
/// (a server migrates it first).
#[tokio::test]
async fn simultaneous_misses_for_one_subject_query_postgres_once() {
    let _migrated = Server::start(&[]);
    let pool = app_pool().await;
    let (tenant, emails) = seed_tenant(&pool, &[("flight", "basic")], 0).await;
    let sub = user_id(&pool, tenant, &emails[0]).await;
    let trust = tollgate_server::trust::TrustLevels::new(
        pool.clone(),
        Duration::from_secs(60),
        std::sync::Arc::new(tokio::sync::Semaphore::new(2)),
        Duration::from_secs(5),
    );
    let claims = tollgate_server::auth::Claims {
        sub,
        tenant,
        trust: "basic".into(),
        iat: 0,
        exp: u64::MAX,
        iss: "tollgate".into(),
        aud: "tollgate-api".into(),
    };
    let lookups = (0..20).map(|_| trust.current(&claims));
    let levels = futures_join_all(lookups).await;
    assert!(
        levels
            .iter()
            .all(|l| l.as_ref().unwrap().as_deref() == Some("basic"))
    );
    assert_eq!(trust.queries(), 1, "20 simultaneous misses, one query");
    // Cached now: no more queries.
    trust.current(&claims).await.unwrap();
    assert_eq!(trust.queries(), 1);
}

/// Polls every future together on this task (no extra dependency).
async fn futures_join_all<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let mut set: Vec<_> = futures.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in set.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}
