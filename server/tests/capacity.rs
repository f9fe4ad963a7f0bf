//! Noisy neighbours against the real binary and a real Postgres: one
//! client or tenant holding what it can (half-sent bodies, slow headers,
//! many requests, many logins) must not take capacity from the others.
//! Every wait is bounded.

mod common;

use std::time::Duration;

use tokio::time::Instant;

use common::{Server, app_pool, client, login, metric_with, seed_tenant, user_id};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Rates high enough to stay out of the way: these tests are about what
/// requests hold, not how many arrive.
const GENEROUS: &[(&str, &str)] = &[
    ("RATE_LIMIT_IP", "1000000/min"),
    ("RATE_LIMIT_TENANT", "1000000/min"),
    ("RATE_LIMIT_CLASS_READ", "1000000/min"),
    ("RATE_LIMIT_CLASS_WRITE", "1000000/min"),
    ("RATE_LIMIT_CLASS_AUTH", "1000000/min"),
    ("RATE_LIMIT_TRUST_NEW", "1000000/min"),
    ("RATE_LIMIT_TRUST_BASIC", "1000000/min"),
];

/// Taken by the tests that load the machine (a login storm, an overload)
/// and by the one that compares latencies: two cores shared with a storm
/// would make a latency comparison measure the storm.
static MACHINE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn env<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    GENEROUS.iter().chain(extra).copied().collect()
}

fn addr(server: &Server) -> String {
    server.base.trim_start_matches("http://").to_owned()
}

/// Opens a connection and sends a `POST /api/v1/items` head announcing a
/// 100-byte body, then only `{`: a request that holds whatever the server
/// gives it while it waits for the rest.
async fn half_sent_body(server: &Server, token: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr(server)).await.unwrap();
    let head = format!(
        "POST /api/v1/items HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

/// Polls `metric_with` until it equals `want` (at most `within`).
async fn wait_for_metric(
    http: &reqwest::Client,
    server: &Server,
    metric: &str,
    labels: &str,
    want: f64,
    within: Duration,
) -> f64 {
    let deadline = Instant::now() + within;
    loop {
        let now = metric_with(http, server, metric, labels).await;
        if now == want || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[(samples.len() * 99).div_ceil(100) - 1]
}

/// `n` sequential `GET /api/v1/items` of `token`, each 200; their
/// latencies.
async fn timed_reads(
    http: &reqwest::Client,
    server: &Server,
    token: &str,
    n: usize,
) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let res = http
            .get(server.url("/api/v1/items?limit=5"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{:?}", res.text().await);
        samples.push(started.elapsed());
    }
    samples
}

/// The issue's attack: tenant A holds 2 × DB_MAX_CONNECTIONS half-sent
/// bodies. Handlers read the body before their transaction begins, so A
/// holds no connection: B keeps its latency and readiness stays 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_bodies_of_one_tenant_leave_other_tenants_and_readiness_alone() {
    let _machine = MACHINE.lock().await;
    let server = Server::process(&env(&[
        ("DB_MAX_CONNECTIONS", "4"),
        ("HTTP_BODY_READ_TIMEOUT", "60s"),
    ]));
    let pool = app_pool().await;
    let http = client();
    let (_, a) = seed_tenant(&pool, &[("a", "basic")], 0).await;
    let (_, b) = seed_tenant(&pool, &[("b", "basic")], 5).await;
    let (token_a, token_b) = (
        login(&http, &server, &a[0]).await,
        login(&http, &server, &b[0]).await,
    );
    // Warm up (connections opened, caches filled), then the baseline.
    timed_reads(&http, &server, &token_b, 20).await;
    let unloaded = p99(timed_reads(&http, &server, &token_b, 200).await);

    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(half_sent_body(&server, &token_a).await);
    }
    let in_flight = wait_for_metric(
        &http,
        &server,
        "tollgate_concurrency_in_flight",
        "tenant-concurrency",
        8.0,
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(in_flight, 8.0, "A's requests are not all in flight");

    let mut samples = Vec::new();
    for _ in 0..10 {
        samples.extend(timed_reads(&http, &server, &token_b, 20).await);
        let ready = http.get(server.url("/ready")).send().await.unwrap();
        assert_eq!(ready.status(), 200, "{:?}", ready.text().await);
    }
    let loaded = p99(samples);
    // Loopback latencies are a millisecond or two: below 2 ms the
    // comparison would measure the machine's noise, not the server.
    let bound = (unloaded * 2).max(Duration::from_millis(2));
    eprintln!("tenant B p99: unloaded {unloaded:?}, with A's 8 half-sent bodies {loaded:?}");
    assert!(
        loaded < bound,
        "B's p99 went from {unloaded:?} to {loaded:?} while A held half-sent bodies"
    );
    drop(held);
}

/// A slowloris client (a header byte every 100 ms) is disconnected after
/// the header timeout; a client trickling its body gets 408 and a closed
/// connection after the body timeout.
#[tokio::test]
async fn slowloris_and_trickled_bodies_are_cut_off() {
    let server = Server::process(&env(&[
        ("HTTP_HEADER_READ_TIMEOUT", "1s"),
        ("HTTP_BODY_READ_TIMEOUT", "1s"),
    ]));
    let pool = app_pool().await;
    let http = client();
    let (_, users) = seed_tenant(&pool, &[("slow", "basic")], 0).await;
    let token = login(&http, &server, &users[0]).await;

    // Slowloris.
    let mut stream = TcpStream::connect(addr(&server)).await.unwrap();
    let started = Instant::now();
    let head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed_after = None;
    for byte in head {
        if stream.write_all(&[*byte]).await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        let mut buf = [0u8; 256];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await
        {
            closed_after = Some(started.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("the slowloris connection was never closed");
    assert!(
        closed_after >= Duration::from_millis(900) && closed_after < Duration::from_millis(2500),
        "slowloris closed after {closed_after:?}, header timeout 1 s"
    );
    eprintln!("slowloris disconnected after {closed_after:?}");

    // A trickled body: a byte every 200 ms of an announced 100.
    let mut stream = TcpStream::connect(addr(&server)).await.unwrap();
    let head = format!(
        "POST /api/v1/items HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let (mut reader, mut writer) = stream.into_split();
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            if writer.write_all(b" ").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut response = Vec::new();
    let read_all = async {
        let mut buf = [0u8; 4096];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => response.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read_all)
        .await
        .expect("the trickling connection was not closed within 5 s");
    let elapsed = started.elapsed();
    trickle.abort();
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("application/problem+json"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_millis(2500),
        "trickled body answered after {elapsed:?}, body timeout 1 s"
    );
    let timeouts = metric_with(
        &http,
        &server,
        "tollgate_http_timeouts_total",
        "stage=\"body\"",
    )
    .await;
    assert_eq!(timeouts, 1.0);
    let header_timeouts =
        metric_with(&http, &server, "tollgate_http_header_timeouts_total", "").await;
    assert!(header_timeouts >= 1.0);
}

/// Tenant A at its concurrency limit gets 429 with the draft's
/// `concurrent-requests` quota unit; tenant B is unaffected; the slots
/// come back when A's clients hang up, mid-request or mid-response.
#[tokio::test]
async fn a_tenant_at_its_concurrency_limit_gets_429_and_its_slots_come_back() {
    let server = Server::process(&env(&[
        ("RATE_LIMIT_TENANT_CONCURRENCY", "2"),
        ("RATE_LIMIT_SUBJECT_CONCURRENCY", "unlimited"),
        ("HTTP_BODY_READ_TIMEOUT", "60s"),
    ]));
    let pool = app_pool().await;
    let http = client();
    let (tenant_a, a) = seed_tenant(&pool, &[("a1", "basic"), ("a2", "basic")], 0).await;
    let (_, b) = seed_tenant(&pool, &[("b", "basic")], 0).await;
    let token_a1 = login(&http, &server, &a[0]).await;
    let token_a2 = login(&http, &server, &a[1]).await;
    let token_b = login(&http, &server, &b[0]).await;

    let held = [
        half_sent_body(&server, &token_a1).await,
        half_sent_body(&server, &token_a1).await,
    ];
    let in_flight = |labels: &'static str| {
        let (http, server) = (&http, &server);
        async move {
            wait_for_metric(
                http,
                server,
                "tollgate_concurrency_in_flight",
                labels,
                0.0,
                Duration::from_secs(3),
            )
            .await
        }
    };
    assert_eq!(
        wait_for_metric(
            &http,
            &server,
            "tollgate_concurrency_in_flight",
            "tenant-concurrency",
            2.0,
            Duration::from_secs(2)
        )
        .await,
        2.0
    );
    // Another user of A: the tenant's limit applies.
    let res = http
        .get(server.url("/api/v1/items"))
        .bearer_auth(&token_a2)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(
        res.headers()["ratelimit-policy"],
        r#""tenant-concurrency";q=2;qu="concurrent-requests""#
    );
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    // B is not.
    let res = http
        .get(server.url("/api/v1/items"))
        .bearer_auth(&token_b)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        metric_with(
            &http,
            &server,
            "tollgate_concurrency_rejected_total",
            "tenant-concurrency"
        )
        .await
            >= 1.0
    );

    // A's clients hang up mid-request: the slots come back.
    drop(held);
    assert_eq!(in_flight("tenant-concurrency").await, 0.0);

    // Mid-response: a page of about 1 MB, read a little, then hang up.
    let mut tx = tollgate::tenant::begin(
        &pool,
        tollgate::tenant::TenantId::new(tenant_a),
        tollgate::tenant::Access::ReadWrite,
    )
    .await
    .unwrap();
    sqlx::query("INSERT INTO items (name, body) SELECT 'big-' || n, repeat('x', 10000) FROM generate_series(1, 100) n")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(addr(&server)).await.unwrap();
        let req = format!(
            "GET /api/v1/items?limit=100 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token_a1}\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut first = [0u8; 64];
        let n = stream.read(&mut first).await.unwrap();
        assert!(first[..n].starts_with(b"HTTP/1.1 200"));
        drop(stream);
    }
    assert_eq!(in_flight("tenant-concurrency").await, 0.0);
    assert_eq!(in_flight("subject-concurrency").await, 0.0);
    // And A is served again.
    let res = http
        .get(server.url("/api/v1/items?limit=1"))
        .bearer_auth(&token_a2)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

/// The server's peak resident memory (kB), from /proc.
fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// 200 concurrent logins: Argon2 runs on two workers with a short queue,
/// the rest get 503 with Retry-After, memory stays bounded, and other
/// routes keep answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_logins_stay_bounded() {
    let _machine = MACHINE.lock().await;
    let server = Server::process(&env(&[
        ("AUTH_HASH_WORKERS", "2"),
        ("AUTH_HASH_QUEUE", "4"),
    ]));
    let pool = app_pool().await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let (_, users) = seed_tenant(&pool, &[("login", "basic"), ("other", "basic")], 1).await;
    let other = login(&http, &server, &users[1]).await;
    let before = peak_rss_kb(server.pid());

    let mut logins = tokio::task::JoinSet::new();
    for i in 0..200 {
        let (http, url, email) = (http.clone(), server.url("/auth/login"), users[0].clone());
        logins.spawn(async move {
            // Half of them for an unknown user: same cost, same bound.
            let email = if i % 2 == 0 {
                email
            } else {
                format!("nobody-{i}@example.com")
            };
            let res = http
                .post(url)
                .json(&json!({ "email": email, "password": common::PASSWORD }))
                .send()
                .await
                .unwrap();
            let retry = res.headers().get("retry-after").is_some();
            (res.status().as_u16(), retry)
        });
    }
    // Meanwhile, other routes answer promptly.
    let mut slowest = Duration::ZERO;
    // Let the flood arrive first.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(common::status(&http, server.url("/health")).await, 200);
        let res = http
            .get(server.url("/api/v1/items"))
            .bearer_auth(&other)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        slowest = slowest.max(started.elapsed());
    }
    let mut counts = std::collections::BTreeMap::new();
    while let Some(result) = logins.join_next().await {
        let (status, retry) = result.unwrap();
        if status == 503 {
            assert!(retry, "503 without Retry-After");
        }
        *counts.entry(status).or_insert(0) += 1;
    }
    let after = peak_rss_kb(server.pid());
    eprintln!(
        "200 logins: {counts:?}; peak RSS {before} kB before, {after} kB after; slowest other request {slowest:?}"
    );
    assert!(counts.get(&503).copied().unwrap_or(0) > 0, "{counts:?}");
    assert!(counts.get(&200).copied().unwrap_or(0) > 0, "{counts:?}");
    assert_eq!(counts.values().sum::<i32>(), 200);
    // Measured 75-120 ms here (145-185 ms before the hashing threads ran
    // at a lower priority, and once 1.06 s on a busier CI machine); a
    // thread per hash would leave the runtime 2 of 202 runnable threads.
    assert!(
        slowest < Duration::from_secs(2),
        "other routes took {slowest:?}"
    );
    // Two Argon2 workers at ~19 MiB each over the server's own footprint
    // (about 25 MiB) and 200 connections: measured 65-91 MiB. Unbounded,
    // 200 concurrent hashes peaked at 3.9 GB.
    assert!(
        after < 160 * 1024,
        "peak RSS {after} kB during 200 concurrent logins"
    );
}

/// The demoted-staff attack: a staff user is demoted (in the database, with
/// no broadcast, so this replica's cache still says staff), then tries to
/// restore its own level. The handler decides on the level stored, read in
/// its own transaction: 403, and the row stays demoted.
#[tokio::test]
async fn a_demoted_staff_user_cannot_restore_its_own_level() {
    let server = Server::start(&env(&[("TRUST_BROADCAST_ENABLED", "false")]));
    let pool = app_pool().await;
    let http = client();
    let (tenant, users) = seed_tenant(&pool, &[("staff", "staff")], 0).await;
    let token = login(&http, &server, &users[0]).await;
    let me = user_id(&pool, tenant, &users[0]).await;
    // A request caches the level "staff" on this replica.
    let res = http
        .get(server.url("/api/v1/items"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let mut tx = tollgate::tenant::begin(
        &pool,
        tollgate::tenant::TenantId::new(tenant),
        tollgate::tenant::Access::ReadWrite,
    )
    .await
    .unwrap();
    sqlx::query("UPDATE users SET trust_level = 'new' WHERE id = $1")
        .bind(me)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let res = http
        .put(server.url(&format!("/api/v1/users/{me}/trust")))
        .bearer_auth(&token)
        .json(&json!({ "trust_level": "staff" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403, "{:?}", res.text().await);
    let mut tx = tollgate::tenant::begin(
        &pool,
        tollgate::tenant::TenantId::new(tenant),
        tollgate::tenant::Access::ReadOnly,
    )
    .await
    .unwrap();
    let level: String = sqlx::query_scalar("SELECT trust_level FROM users WHERE id = $1")
        .bind(me)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(level, "new", "the demoted user restored its own level");
}

/// Under overload (a pool of 2, 24 concurrent readers), `new` users are
/// shed with 503 + Retry-After while `staff` users, sending the same
/// traffic, are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_sheds_the_lowest_trust_level_first() {
    let _machine = MACHINE.lock().await;
    let server = Server::process(&env(&[
        ("DB_MAX_CONNECTIONS", "2"),
        ("DB_TENANT_MAX_CONNECTIONS", "2"),
        ("RATE_LIMIT_TENANT_CONCURRENCY", "unlimited"),
        ("RATE_LIMIT_SUBJECT_CONCURRENCY", "unlimited"),
        // Every level at a full pool, except `staff`, the highest: never.
        ("LOAD_SHED_START", "1.0"),
        ("LOAD_SHED_STEP", "0"),
    ]));
    let pool = app_pool().await;
    let http = client();
    let (_, new_users) = seed_tenant(&pool, &[("new", "new")], 20).await;
    let (_, staff_users) = seed_tenant(&pool, &[("staff", "staff")], 20).await;
    let token_new = login(&http, &server, &new_users[0]).await;
    let token_staff = login(&http, &server, &staff_users[0]).await;

    let deadline = Instant::now() + Duration::from_secs(3);
    let mut workers = tokio::task::JoinSet::new();
    for i in 0..24 {
        let (http, url) = (http.clone(), server.url("/api/v1/items?limit=20"));
        let (level, token) = if i % 2 == 0 {
            ("new", token_new.clone())
        } else {
            ("staff", token_staff.clone())
        };
        workers.spawn(async move {
            let (mut ok, mut shed, mut other) = (0u32, 0u32, 0u32);
            while Instant::now() < deadline {
                let res = http.get(&url).bearer_auth(&token).send().await.unwrap();
                match res.status().as_u16() {
                    200 => ok += 1,
                    503 => {
                        assert_eq!(res.headers()["retry-after"], "1");
                        let body = res.text().await.unwrap();
                        assert!(body.contains("#temporary-reduced-capacity"), "{body}");
                        shed += 1;
                    }
                    _ => other += 1,
                }
            }
            (level, ok, shed, other)
        });
    }
    let mut totals = std::collections::BTreeMap::new();
    while let Some(result) = workers.join_next().await {
        let (level, ok, shed, other) = result.unwrap();
        let entry = totals.entry(level).or_insert((0, 0, 0));
        entry.0 += ok;
        entry.1 += shed;
        entry.2 += other;
    }
    eprintln!("(ok, shed, other) by level: {totals:?}");
    let (new_ok, new_shed, new_other) = totals["new"];
    let (staff_ok, staff_shed, staff_other) = totals["staff"];
    assert!(new_shed > 0, "nothing shed under overload: {totals:?}");
    assert_eq!(staff_shed, 0, "staff shed before new: {totals:?}");
    assert!(staff_ok > 0 && new_ok + new_shed > 0);
    assert_eq!((new_other, staff_other), (0, 0), "{totals:?}");
    assert_eq!(
        metric_with(
            &http,
            &server,
            "tollgate_shed_requests_total",
            "priority=\"new\""
        )
        .await,
        f64::from(new_shed)
    );
}
