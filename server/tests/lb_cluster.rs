//! The docker-compose topology as local processes: three server replicas
//! on loopback behind Debian's Caddy (round robin, active health checks on
//! `/ready`), PgBouncer in transaction mode between them and Postgres,
//! Redis for fleet-wide limits, Prometheus scraping all three.
//! Load goes through Caddy only.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use common::{Prometheus, Server, client};
use tokio::time::Instant;
use tollgate_test_support::OwnPgBouncer;

/// Caddy on a free loopback port in front of `upstreams`; killed when
/// dropped.
struct Caddy {
    child: Child,
    base: String,
    dir: std::path::PathBuf,
}

impl Caddy {
    async fn start(upstreams: &[&Server]) -> Self {
        // Every replica ready before Caddy's first health check, so none
        // starts out marked down (it would get no traffic until its next
        // passing check).
        let http = client();
        let deadline = Instant::now() + Duration::from_secs(20);
        for server in upstreams {
            while !matches!(http.get(server.url("/ready")).send().await, Ok(res) if res.status() == 200)
            {
                assert!(Instant::now() < deadline, "{} never ready", server.base);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let port = tollgate_test_support::free_port();
        let dir =
            std::env::temp_dir().join(format!("tollgate-caddy-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hosts: Vec<&str> = upstreams
            .iter()
            .map(|s| s.base.trim_start_matches("http://"))
            .collect();
        let caddyfile = format!(
            "{{\n\tadmin off\n\tauto_https off\n\tstorage file_system {dir}\n}}\n\
             http://:{port} {{\n\tbind 127.0.0.1\n\
             \treverse_proxy {hosts} {{\n\
             \t\tlb_policy round_robin\n\t\tlb_try_duration 2s\n\
             \t\thealth_uri /ready\n\t\thealth_interval 250ms\n\t\thealth_timeout 1s\n\t}}\n}}\n",
            dir = dir.display(),
            hosts = hosts.join(" "),
        );
        let path = dir.join("Caddyfile");
        std::fs::write(&path, caddyfile).unwrap();
        let child = Command::new("caddy")
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&path)
            .env("HOME", &dir)
            .env("XDG_DATA_HOME", &dir)
            .env("XDG_CONFIG_HOME", &dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("caddy on PATH (make test installs it)");
        let caddy = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            dir,
        };
        // Up when it answers and every replica passed a health check.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(res) = http.get(format!("{}/ready", caddy.base)).send().await {
                if res.status() == 200 {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "caddy did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
        caddy
    }
}

impl Drop for Caddy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Three replicas as docker-compose.yml runs them: requests through
/// PgBouncer in transaction mode, LISTEN on a direct connection.
fn replicas(prefix: &str, extra: &[(&str, &str)]) -> (OwnPgBouncer, Vec<Server>) {
    let bouncer = OwnPgBouncer::start(10);
    let through = bouncer.app_url("tollgate");
    let direct = tollgate_test_support::app_url("tollgate");
    let mut env = vec![
        ("DATABASE_URL", through.as_str()),
        ("DB_STATEMENT_CACHE", "0"),
        ("DATABASE_DIRECT_URL", direct.as_str()),
        ("RATE_LIMIT_STORE", "redis"),
        ("RATE_LIMIT_REDIS_PREFIX", prefix),
        ("TRUSTED_PROXIES", "127.0.0.1/32"),
        ("READY_CHECK_INTERVAL", "200"),
    ];
    env.extend_from_slice(extra);
    let servers = (0..3).map(|_| Server::process(&env)).collect();
    (bouncer, servers)
}

fn signal(server: &Server, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Steady load through `base` from `clients` keep-alive clients until
/// `stop`; returns (ok, failed).
fn load(base: &str, clients: usize, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u32, u32)> {
    let url = format!("{base}/api/v1/ping");
    tokio::spawn(async move {
        let (ok, failed) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..clients {
            let (url, stop, ok, failed) = (url.clone(), stop.clone(), ok.clone(), failed.clone());
            tasks.spawn(async move {
                let http = client();
                while !stop.load(Ordering::Relaxed) {
                    match http.get(&url).send().await {
                        Ok(res) if res.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_holds_fleet_wide_through_the_load_balancer() {
    let prefix = tollgate_test_support::unique_prefix("lb");
    let (_bouncer, servers) = replicas(&prefix, &[("RATE_LIMIT_IP", "30/min")]);
    let caddy = Caddy::start(&servers.iter().collect::<Vec<_>>()).await;
    let http = client();
    let mut allowed = 0;
    for _ in 0..90 {
        let res = http
            .get(format!("{}/api/v1/ping", caddy.base))
            .send()
            .await
            .unwrap();
        match res.status().as_u16() {
            200 => allowed += 1,
            429 => {}
            other => panic!("status {other}"),
        }
    }
    assert_eq!(allowed, 30, "fleet-wide quota of 30");
    // Round robin: every replica answered some of them.
    for server in &servers {
        let seen = common::metric(&http, server, "tollgate_ratelimit_decisions_total").await;
        assert!(seen > 0.0, "{} got no traffic", server.base);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_replica_leaves_without_failures_and_a_killed_one_costs_only_its_in_flight() {
    let prefix = tollgate_test_support::unique_prefix("lb-drain");
    let (_bouncer, mut servers) = replicas(
        &prefix,
        &[
            ("RATE_LIMIT_IP", "1000000/min"),
            ("SHUTDOWN_DRAIN_DELAY", "1500"),
        ],
    );
    let caddy = Caddy::start(&servers.iter().collect::<Vec<_>>()).await;
    let targets: Vec<String> = servers
        .iter()
        .map(|s| s.base.trim_start_matches("http://").to_owned())
        .collect();
    let prometheus = Prometheus::start(&targets.iter().map(String::as_str).collect::<Vec<_>>());
    let http = client();

    // Prometheus sees all three up (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = prometheus
            .try_query(&http, "sum(up)")
            .await
            .unwrap_or_default();
        if up["data"]["result"][0]["value"][1].as_str() == Some("3") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not see 3 targets: {up}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // SIGTERM one replica under steady load: not one request fails.
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(&caddy.base, 8, stop.clone());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let drained = &mut servers[0];
    signal(drained, "TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = drained.child().try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the drained replica did not exit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = running.await.unwrap();
    eprintln!("SIGTERM under load: {ok} ok, {failed} failed");
    assert!(ok > 100, "too little load to prove anything: {ok}");
    assert_eq!(failed, 0, "requests failed across a drain");

    // Prometheus saw it drain, then go.
    let instance = &targets[0];
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let drained_seen = prometheus
            .query(
                &http,
                &format!("max_over_time(tollgate_draining{{instance=\"{instance}\"}}[1m])"),
            )
            .await;
        let up = prometheus
            .query(&http, &format!("up{{instance=\"{instance}\"}}"))
            .await;
        let value = |v: &serde_json::Value| {
            v["data"]["result"][0]["value"][1]
                .as_str()
                .map(str::to_owned)
        };
        if value(&drained_seen).as_deref() == Some("1") && value(&up).as_deref() == Some("0") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not see {instance} drain and leave: {drained_seen} {up}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // SIGKILL another: only requests in flight on it may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let clients = 8;
    let running = load(&caddy.base, clients, stop.clone());
    tokio::time::sleep(Duration::from_millis(700)).await;
    servers[1].child().kill().unwrap();
    servers[1].child().wait().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = running.await.unwrap();
    eprintln!("SIGKILL under load: {ok} ok, {failed} failed");
    assert!(ok > 100, "the fleet stopped serving: {ok}");
    assert!(
        failed as usize <= clients,
        "{failed} failures for {clients} in flight"
    );
    // The survivor keeps serving.
    let res = http
        .get(format!("{}/api/v1/ping", caddy.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}
