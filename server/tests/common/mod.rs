//! Helpers shared by the integration tests: the real binary on a free
//! loopback port.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The secret test servers sign tokens with.
pub const AUTH_SECRET: &str = "test-secret-0123456789abcdef0123456789";

/// A running server, stopped when dropped (also when a test fails):
/// in this process ([`Server::start`]) or as the real binary
/// ([`Server::process`], for signals, exit codes, kills, memory and
/// `/metrics`, whose recorder is one per process).
pub struct Server {
    pub base: String,
    child: Option<Child>,
    runtime: Option<tokio::runtime::Runtime>,
    /// What a process server wrote to stdout so far.
    stdout: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// The variables every test server gets unless the test sets its own.
fn base_env() -> Vec<(&'static str, String)> {
    vec![
        ("LISTEN_ADDR", "127.0.0.1:0".to_owned()),
        // Tests that care about draining set their own delay.
        ("SHUTDOWN_DRAIN_DELAY", "0".to_owned()),
        ("AUTH_SECRET", AUTH_SECRET.to_owned()),
        ("DATABASE_URL", tollgate_test_support::app_url("tollgate")),
        (
            "MIGRATION_DATABASE_URL",
            tollgate_test_support::owner_url("tollgate"),
        ),
    ]
}

/// The configuration of a test server: `env` over the test defaults,
/// nothing read from the process environment.
pub fn config(env: &[(&str, &str)]) -> tollgate_server::config::Config {
    let mut vars: std::collections::HashMap<String, String> = base_env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    for (k, v) in env {
        vars.insert((*k).to_owned(), (*v).to_owned());
    }
    tollgate_server::config::Config::from_lookup(|name| vars.get(name).cloned())
        .expect("test configuration")
}

impl Server {
    /// Starts the server in this process, on its own runtime (two worker
    /// threads, so a test's client and the server do not share one), with
    /// `env` over the test defaults: nothing is read from the process
    /// environment.
    pub fn start(env: &[(&str, &str)]) -> Self {
        let config = config(env);
        // A runtime cannot be started from within the test's own: build
        // and bind on a plain thread.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let server = runtime
                // A recorder of its own, not installed: `/metrics` answers
                // (empty), as documented, without sharing the process's.
                .block_on(tollgate_server::Server::bind(
                    config,
                    Some(
                        tollgate::metrics::prometheus_builder()
                            .build_recorder()
                            .handle(),
                    ),
                ))
                .expect("start the server in-process");
            let base = format!("http://{}", server.local_addr());
            runtime.spawn(server.run());
            Self {
                base,
                child: None,
                runtime: Some(runtime),
                stdout: std::sync::Arc::default(),
            }
        })
        .join()
        .expect("server thread")
    }

    /// Starts the binary with `env` on 127.0.0.1:0 and waits (bounded) for
    /// the address it logs.
    pub fn process(env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate-server"));
        for (k, v) in base_env() {
            cmd.env(k, v);
        }
        cmd.env("RUST_LOG", "info")
            .env_remove("LOG_FORMAT")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start tollgate-server");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // `addr=…` in text logs, `"addr":"…"` in JSON ones.
                let addr = line
                    .split("addr=")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .or_else(|| line.split(r#""addr":""#).nth(1)?.split('"').next());
                if let Some(addr) = addr {
                    let _ = tx.send(addr.to_owned());
                }
                // Keep draining so the server never blocks on a full pipe.
                kept.lock().unwrap().push(line);
            }
        });
        let Ok(addr) = rx.recv_timeout(Duration::from_secs(20)) else {
            // Not left running (holding the test's pipes) after the panic.
            let _ = child.kill();
            let _ = child.wait();
            panic!("server did not log its address within 20 s");
        };
        Self {
            child: Some(child),
            base: format!("http://{addr}"),
            runtime: None,
            stdout: lines,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The lines a [`Server::process`] server wrote to stdout so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// The process of a [`Server::process`] server.
    pub fn child(&mut self) -> &mut Child {
        self.child
            .as_mut()
            .expect("an in-process server has no child")
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .expect("an in-process server has no pid")
            .id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Like a kill: every task of the server stops where it is.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// The status of `GET url`.
pub async fn status(http: &reqwest::Client, url: String) -> u16 {
    http.get(url).send().await.unwrap().status().as_u16()
}

/// The app role's pool on the shared `tollgate` database (migrated by the
/// first server a test starts).
pub async fn app_pool() -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&tollgate_test_support::app_url("tollgate"))
        .await
        .expect("connect as tollgate_app")
}

/// A new tenant with `users` (e-mail, trust level; password
/// [`PASSWORD`]) and `items` items named `<tenant>-<n>`. E-mails get a
/// unique suffix; the returned users hold the real ones.
pub async fn seed_tenant(
    pool: &sqlx::PgPool,
    users: &[(&str, &str)],
    items: usize,
) -> (uuid::Uuid, Vec<String>) {
    use std::sync::LazyLock;
    use tollgate::tenant::{Access, TenantId, begin};
    static HASH: LazyLock<String> =
        LazyLock::new(|| tollgate_server::auth::hash_password(PASSWORD));
    let tenant = uuid::Uuid::new_v4();
    let mut tx = begin(pool, TenantId::new(tenant), Access::ReadWrite)
        .await
        .unwrap();
    sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, 'test')")
        .bind(tenant)
        .execute(&mut *tx)
        .await
        .unwrap();
    let mut emails = Vec::new();
    for (email, trust) in users {
        let email = format!("{email}-{tenant}@example.com");
        sqlx::query(
            "INSERT INTO users (tenant_id, email, password_hash, trust_level) VALUES ($1, $2, $3, $4)",
        )
        .bind(tenant)
        .bind(&email)
        .bind(&*HASH)
        .bind(trust)
        .execute(&mut *tx)
        .await
        .unwrap();
        emails.push(email);
    }
    for n in 0..items {
        sqlx::query("INSERT INTO items (name) VALUES ($1)")
            .bind(format!("{tenant}-{n}"))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    (tenant, emails)
}

/// Every seeded user's password.
pub const PASSWORD: &str = "correct horse battery staple";

/// Logs in and returns the bearer token.
pub async fn login(http: &reqwest::Client, server: &Server, email: &str) -> String {
    let res = http
        .post(server.url("/auth/login"))
        .json(&serde_json::json!({ "email": email, "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "login of {email}");
    let body: serde_json::Value = res.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

/// The id of the user with `email` in `tenant`.
pub async fn user_id(pool: &sqlx::PgPool, tenant: uuid::Uuid, email: &str) -> uuid::Uuid {
    use tollgate::tenant::{Access, TenantId, begin};
    let mut tx = begin(pool, TenantId::new(tenant), Access::ReadOnly)
        .await
        .unwrap();
    sqlx::query_scalar("SELECT id FROM users WHERE email = $1")
        .bind(email)
        .fetch_one(&mut *tx)
        .await
        .unwrap()
}

/// The sum of every series of `metric` in the server's `/metrics` (0 when
/// there is none).
pub async fn metric(http: &reqwest::Client, server: &Server, metric: &str) -> f64 {
    metric_with(http, server, metric, "").await
}

/// The sum of `metric`'s series, failing the test when the server has no
/// such series at all (so a renamed metric cannot pass as "0").
pub async fn metric_present(http: &reqwest::Client, server: &Server, metric: &str) -> f64 {
    let values = series(http, server, metric, "").await;
    assert!(!values.is_empty(), "the server exports no {metric}");
    values.iter().sum()
}

/// The sum of the series of `metric` whose labels contain `labels`.
pub async fn metric_with(
    http: &reqwest::Client,
    server: &Server,
    metric: &str,
    labels: &str,
) -> f64 {
    series(http, server, metric, labels).await.iter().sum()
}

/// The values of `metric`'s series whose labels contain `labels`.
async fn series(http: &reqwest::Client, server: &Server, metric: &str, labels: &str) -> Vec<f64> {
    let text = http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with(['{', ' ']) && rest.contains(labels))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect()
}

/// The trust quota `server` applies to `token` now: the `q=…` of the
/// `"trust"` item of `RateLimit-Policy` on a read.
pub async fn trust_quota(http: &reqwest::Client, server: &Server, token: &str) -> String {
    let res = http
        .get(server.url("/api/v1/items"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let policy = res.headers()["ratelimit-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    policy
        .split(", ")
        .find(|p| p.starts_with("\"trust\""))
        .and_then(|p| p.split(';').nth(1))
        .unwrap_or("none")
        .to_owned()
}

/// The cleanup job's recorded cycles, oldest first: (cycle, origin).
pub async fn cleanup_cycles(pool: &sqlx::PgPool) -> Vec<(i64, String)> {
    sqlx::query_as(
        "SELECT cycle, origin FROM tollgate_singleton_runs WHERE job = 'cleanup' ORDER BY cycle",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Singleton runs counted by every server's `/metrics`, each server having
/// counted no failure.
pub async fn singleton_runs_without_failures(http: &reqwest::Client, servers: &[Server]) -> f64 {
    let mut runs = 0.0;
    for server in servers {
        runs += metric(http, server, "tollgate_singleton_runs_total").await;
        assert_eq!(
            metric_present(http, server, "tollgate_singleton_failures_total").await,
            0.0
        );
    }
    runs
}

/// A file of the repository.
pub fn repo_file(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// Debian's Prometheus on a free loopback port, scraping `targets` every
/// second with the project's alert rules; killed when dropped.
pub struct Prometheus {
    child: Child,
    base: String,
    _dir: std::path::PathBuf,
}

impl Prometheus {
    pub fn start(targets: &[&str]) -> Self {
        let port = tollgate_test_support::free_port();
        let dir = std::env::temp_dir().join(format!("tollgate-prom-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rules = repo_file("grafana/alerts.yml");
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let target = targets.join(", ");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: tollgate\n    static_configs:\n      - targets: [{target}]\n",
            rules.display()
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus on PATH (make test installs it)");
        Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    pub async fn try_query(
        &self,
        http: &reqwest::Client,
        expr: &str,
    ) -> reqwest::Result<serde_json::Value> {
        http.get(format!("{}/api/v1/query", self.base))
            .query(&[("query", expr)])
            .send()
            .await?
            .json()
            .await
    }

    pub async fn query(&self, http: &reqwest::Client, expr: &str) -> serde_json::Value {
        self.try_query(http, expr).await.unwrap()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}
