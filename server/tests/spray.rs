//! Key spraying: a client that sends every request from a new forwarded
//! address cannot grow the in-process store beyond its budget, and the
//! clients that were there before keep exactly their standing: one inside
//! its quota stays inside it, one over it stays over it.

mod common;

use common::{Server, client, metric};

const SPRAY: u32 = 12_000;
const BUDGET: &str = "2000";

async fn ping(http: &reqwest::Client, server: &Server, from: &str) -> u16 {
    http.get(server.url("/api/v1/ping"))
        .header("x-forwarded-for", from)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn spraying_addresses_stays_within_the_budget_and_changes_no_standing() {
    let server = Server::process(&[
        ("TRUSTED_PROXIES", "127.0.0.1"),
        ("RATE_LIMIT_IP", "10/h,burst=10"),
        ("RATE_LIMIT_MEMORY_MAX_KEYS", BUDGET),
    ]);
    let http = client();
    // Before: one client inside its quota, one over it.
    for _ in 0..3 {
        assert_eq!(ping(&http, &server, "198.51.100.1").await, 200);
    }
    for _ in 0..10 {
        assert_eq!(ping(&http, &server, "198.51.100.2").await, 200);
    }
    assert_eq!(ping(&http, &server, "198.51.100.2").await, 429);
    // The spray: every request from a new address, 32 at a time.
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..32u32 {
        let (http, url) = (http.clone(), server.url("/api/v1/ping"));
        tasks.spawn(async move {
            let mut denied = 0u32;
            for n in (worker..SPRAY).step_by(32) {
                let from = format!("10.{}.{}.{}", n >> 16, (n >> 8) & 0xff, n & 0xff);
                let res = http
                    .get(&url)
                    .header("x-forwarded-for", from)
                    .send()
                    .await
                    .unwrap();
                denied += u32::from(res.status() == 429);
            }
            denied
        });
    }
    let denied: u32 = tasks.join_all().await.into_iter().sum();
    let overflow = metric(
        &http,
        &server,
        "tollgate_ratelimit_overflow_decisions_total",
    )
    .await;
    let overflow_denied = metric(&http, &server, "tollgate_ratelimit_overflow_denials_total").await;
    eprintln!(
        "{SPRAY} sprayed addresses, budget {BUDGET}: {overflow} decided in the overflow, \
         {overflow_denied} of them denied; {denied} sprayed requests denied in all"
    );
    // Everything beyond the budget went to the fixed-size overflow…
    assert!(
        overflow >= f64::from(SPRAY) - 2000.0,
        "{overflow} overflow decisions"
    );
    // … whose collisions deny few fresh keys here (each sent one request).
    assert!(
        f64::from(denied) < f64::from(SPRAY) * 0.01,
        "{denied} false denials"
    );
    // After: the same standing.
    for _ in 0..3 {
        assert_eq!(
            ping(&http, &server, "198.51.100.1").await,
            200,
            "the good client was denied"
        );
    }
    assert_eq!(
        ping(&http, &server, "198.51.100.2").await,
        429,
        "the over-limit client was freed"
    );
}
