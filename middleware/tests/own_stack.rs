//! Drives `examples/own_stack.rs` as a user's service would run, on the
//! local Postgres (a database of its own): a 429 with its headers and
//! problem body, a concurrency 429, the decision counts on a real
//! `/metrics` scrape, readiness failing then passing with its error logged
//! once, and a drain a client sees as `/ready` 503 before the listener
//! closes.

#[allow(dead_code)]
#[path = "../examples/own_stack.rs"]
mod own_stack;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate::client_ip::TrustedProxies;
use tollgate::metrics::MetricsExporter;
use tollgate_test_support::TestDb;

/// One HTTP/1.1 request over a fresh connection: (status, headers and body).
async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\n{auth}connection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn count(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
}

#[tokio::test(flavor = "current_thread")]
async fn a_users_own_stack_behaves_as_documented() {
    let logs = tollgate_test_support::LogCapture::start();
    let db = TestDb::create("own_stack", "SELECT 1").await;
    let owner = sqlx::PgPool::connect(&db.owner_url()).await.unwrap();
    own_stack::schema(&owner).await.unwrap();
    let pool = sqlx::PgPool::connect(&db.app_url()).await.unwrap();

    let exporter = MetricsExporter::install().unwrap();
    // A check of ours that fails until we say so.
    let up = Arc::new(AtomicBool::new(false));
    let flag = up.clone();
    let readiness = own_stack::readiness(pool.clone())
        .check("cache", move || {
            let up = flag.load(Ordering::SeqCst);
            async move {
                if up {
                    Ok(())
                } else {
                    Err("cache unreachable".to_owned())
                }
            }
        })
        .start();
    let store = own_stack::store(None).unwrap();
    let app = own_stack::app(pool, store, &readiness, &exporter, TrustedProxies::none());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(readiness.drain_after(
            async {
                stopped.await.ok();
            },
            Duration::from_millis(500),
        ))
        .into_future(),
    );

    // Readiness fails on our check, logged once, then passes.
    readiness.wait_first_round().await;
    assert_eq!(get(addr, "/ready", None).await.0, 503);
    tokio::time::sleep(Duration::from_millis(500)).await;
    up.store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while get(addr, "/ready", None).await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = logs.text();
    assert_eq!(
        text.matches("readiness check failing check=cache").count(),
        1,
        "{text}"
    );
    assert!(text.contains("cache unreachable"), "{text}");

    // Limits: a free tenant (5 a minute) with two users (3 a minute each).
    let tenant = uuid::Uuid::new_v4();
    let (ann, bob) = (format!("{tenant}:ann:free"), format!("{tenant}:bob:free"));
    for _ in 0..3 {
        assert_eq!(get(addr, "/notes", Some(&ann)).await.0, 200);
    }
    // Ann's own limit: the tenant is not charged.
    let (status, res) = get(addr, "/notes", Some(&ann)).await;
    assert_eq!(status, 429, "{res}");
    assert!(
        res.contains("content-type: application/problem+json"),
        "{res}"
    );
    assert!(res.contains(r#""violated-policies":["user"]"#), "{res}");
    assert!(
        res.contains(r#"ratelimit-policy: "tenant";q=5;w=60, "user";q=3;w=60"#),
        "{res}"
    );
    assert!(res.contains("retry-after: 20"), "{res}");
    for _ in 0..2 {
        assert_eq!(get(addr, "/notes", Some(&bob)).await.0, 200);
    }
    // The tenant's plan: 5 used.
    let (status, res) = get(addr, "/notes", Some(&bob)).await;
    assert_eq!(status, 429);
    assert!(res.contains(r#""violated-policies":["tenant"]"#), "{res}");
    // A pro tenant has its own, larger quota.
    let pro = format!("{}:cy:pro", uuid::Uuid::new_v4());
    let (_, res) = get(addr, "/notes", Some(&pro)).await;
    assert!(res.contains(r#""tenant";q=50;w=60"#), "{res}");

    // Concurrency: a free tenant has one request in flight at a time.
    let other = format!("{}:dee:free", uuid::Uuid::new_v4());
    let held = tokio::spawn({
        let other = other.clone();
        async move { get(addr, "/slow?ms=800", Some(&other)).await.0 }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, res) = get(addr, "/slow?ms=0", Some(&other)).await;
    assert_eq!(status, 429, "{res}");
    assert!(
        res.contains(r#""tenant-concurrency";q=1;qu="concurrent-requests""#),
        "{res}"
    );
    assert_eq!(held.await.unwrap(), 200);

    // The scrape says exactly what was decided and charged.
    let (_, metrics) = get(addr, "/metrics", None).await;
    let decided = |policy: &str, outcome: &str| {
        count(
            &metrics,
            &format!(
                r#"tollgate_ratelimit_decisions_total{{policy="{policy}",outcome="{outcome}"}}"#
            ),
        )
    };
    // Ann 3, Bob 2, the pro tenant 1, the slow pair 1 (one refused by
    // concurrency before the limiter).
    assert_eq!(decided("tenant", "allowed"), 7.0);
    assert_eq!(decided("tenant", "uncharged"), 1.0, "Ann's 4th");
    assert_eq!(decided("tenant", "rejected"), 1.0, "Bob's 3rd");
    assert_eq!(decided("user", "allowed"), 7.0);
    assert_eq!(decided("user", "rejected"), 1.0);
    assert_eq!(decided("user", "uncharged"), 1.0);
    assert_eq!(count(&metrics, "tollgate_draining "), 0.0);
    assert!(!metrics.contains(r#"="""#), "an empty label value");

    // Drain: /ready 503 while the listener still accepts, then it closes.
    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(get(addr, "/ready", None).await.0, 503, "not draining");
    server.await.unwrap().unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after the drain delay"
    );
    db.drop_now().await;
}
