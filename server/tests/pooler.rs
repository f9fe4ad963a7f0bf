//! Behind a transaction-mode pooler: PgBouncer 1.18 (Debian's package) in
//! `pool_mode = transaction`, started by `scripts/pgbouncer.sh` as
//! `make test` starts the shared one. The quick start through it, tenant
//! isolation over one server connection shared by interleaved tenants,
//! three replicas (trust changes over the direct LISTEN connection, the
//! cleanup job once per cycle, no failed request), and what happens
//! without a direct connection.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{
    Server, cleanup_cycles, client, login, metric, seed_tenant, singleton_runs_without_failures,
    trust_quota, user_id,
};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};
use tokio::time::Instant;
use tollgate::tenant::{Access, TenantId, begin};
use tollgate_test_support::{OwnPgBouncer, TestDb};

/// Quotas high enough that no test request is limited, and a trust quota
/// per level that shows which level a replica applies.
const QUOTAS: &[(&str, &str)] = &[
    ("RATE_LIMIT_TRUST_NEW", "2/min"),
    ("RATE_LIMIT_TRUST_BASIC", "100000/min"),
    ("RATE_LIMIT_CLASS_READ", "100000/min"),
    ("RATE_LIMIT_CLASS_WRITE", "100000/min"),
    ("RATE_LIMIT_TENANT", "100000/min"),
    ("RATE_LIMIT_IP", "100000/min"),
    ("RATE_LIMIT_CLASS_AUTH", "100000/min"),
];

/// A pool through `bouncer` as the server makes it: no statement cache.
async fn pooled(url: &str, max: u32) -> PgPool {
    let options: PgConnectOptions = url.parse().unwrap();
    PgPoolOptions::new()
        .max_connections(max)
        .connect_with(options.statement_cache_capacity(0))
        .await
        .unwrap()
}

fn cli(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate-server"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_start_works_through_pgbouncer() {
    let bouncer = OwnPgBouncer::start(1);
    let db = TestDb::create("pooler_quick", "SELECT 1").await;
    let through = bouncer.app_url(&db.name);
    let (direct, owner) = (db.app_url(), db.owner_url());
    // The server migrates (directly) before the CLI needs the schema.
    let server = Server::start(&[
        ("DATABASE_URL", &through),
        ("DB_STATEMENT_CACHE", "0"),
        ("DATABASE_DIRECT_URL", &direct),
        ("MIGRATION_DATABASE_URL", &owner),
    ]);
    let env = [
        ("DATABASE_URL", through.as_str()),
        ("DB_STATEMENT_CACHE", "0"),
    ];
    let out = cli(&["tenant", "add", "Acme"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tenant = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let email = format!("ada-{tenant}@example.com");
    let password = "correct horse";
    let add = [
        "user",
        "add",
        "--tenant",
        &tenant,
        "--email",
        &email,
        "--password",
        password,
    ];
    let out = cli(&add, &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // With sqlx's default statement cache, a command leaves its named
    // statements on the one server connection and the next one meets them
    // ("sqlx_s_1 already exists"); the error says what to set. Once in CI
    // two commands in a row both passed: PgBouncer can hand the second a
    // fresh server connection (it closes one a client left mid-query, say),
    // so a few tries until one meets the statements.
    let set_trust = ["user", "set-trust", "--email", &email, "--level", "basic"];
    let cached = [("DATABASE_URL", through.as_str())];
    let failed = (0..4)
        .map(|_| cli(&set_trust, &cached))
        .find(|out| !out.status.success())
        .expect("named statements went through the pooler");
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("DB_STATEMENT_CACHE=0"), "{stderr}");
    let out = cli(
        &["user", "set-trust", "--email", &email, "--level", "basic"],
        &env,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let http = client();
    let res = http
        .post(server.url("/auth/login"))
        .json(&json!({ "email": email, "password": password }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let token = res.json::<Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let res = http
        .post(server.url("/api/v1/items"))
        .bearer_auth(&token)
        .json(&json!({ "name": "through the pooler" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let page: Value = http
        .get(server.url("/api/v1/items"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"][0]["name"], "through the pooler", "{page}");
    drop(server);
    db.drop_now().await;
}

/// What one round of the interleaving test does.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// A whole transaction: the setting and the rows are the tenant's.
    Read,
    /// A transaction cancelled at a random point (the client went away).
    Cancelled,
    /// A statement fails mid-transaction, which is then dropped.
    Failed,
    /// A transaction that sets no tenant: no setting, no rows.
    NoTenant,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_tenants_over_one_server_connection_never_see_each_other() {
    let bouncer = OwnPgBouncer::start(1);
    // The shared database, migrated by a first server.
    drop(Server::start(&[]));
    let direct = common::app_pool().await;
    let (a, _) = seed_tenant(&direct, &[], 3).await;
    let (b, _) = seed_tenant(&direct, &[], 3).await;
    // Eight client connections, one server connection behind them all.
    let pool = pooled(&bouncer.app_url("tollgate"), 8).await;
    let violations = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..8u64 {
        let (pool, violations, counts) = (pool.clone(), violations.clone(), counts.clone());
        tasks.spawn(async move {
            for round in 0..60u64 {
                let tenant = if (worker + round) % 2 == 0 { a } else { b };
                let step = [Step::Read, Step::Cancelled, Step::Failed, Step::NoTenant]
                    [((worker * 7 + round * 3) % 4) as usize];
                counts[step as usize].fetch_add(1, Ordering::Relaxed);
                if let Err(seen) = run_step(&pool, tenant, step, round).await {
                    violations
                        .lock()
                        .unwrap()
                        .push(format!("{step:?} as {tenant}: {seen}"));
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let violations = violations.lock().unwrap();
    assert!(
        violations.is_empty(),
        "{} violations: {:?}",
        violations.len(),
        &violations[..violations.len().min(5)]
    );
    for (step, n) in ["read", "cancelled", "failed", "no tenant"]
        .iter()
        .zip(counts.iter())
    {
        assert!(n.load(Ordering::Relaxed) >= 100, "too few {step} rounds");
    }
}

/// One step; `Err` describes what the transaction saw that it must not.
async fn run_step(pool: &PgPool, tenant: uuid::Uuid, step: Step, round: u64) -> Result<(), String> {
    let mine = tenant.to_string();
    match step {
        Step::Read => {
            let mut tx = begin(pool, TenantId::new(tenant), Access::ReadOnly)
                .await
                .map_err(|e| e.to_string())?;
            let seen = setting(&mut tx).await?;
            if seen.as_deref() != Some(&mine) {
                return Err(format!("setting {seen:?}"));
            }
            let names: Vec<String> = sqlx::query_scalar("SELECT name FROM items")
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| e.to_string())?;
            if names.is_empty() || !names.iter().all(|n| n.starts_with(&mine)) {
                return Err(format!("rows {names:?}"));
            }
            tx.commit().await.map_err(|e| e.to_string())
        }
        Step::Cancelled => {
            // Cut somewhere between the acquire and the commit.
            let within = Duration::from_micros(200 + (round * 373) % 3000);
            let _ = tokio::time::timeout(within, async {
                let mut tx = begin(pool, TenantId::new(tenant), Access::ReadWrite).await?;
                sqlx::query("SELECT pg_sleep(0.002)")
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("INSERT INTO items (name) VALUES ($1)")
                    .bind(format!("{tenant}-cancelled"))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await
            })
            .await;
            Ok(())
        }
        Step::Failed => {
            let mut tx = begin(pool, TenantId::new(tenant), Access::ReadWrite)
                .await
                .map_err(|e| e.to_string())?;
            let failed = sqlx::query("SELECT 1 / 0").execute(&mut *tx).await;
            if failed.is_ok() {
                return Err("1 / 0 succeeded".to_owned());
            }
            drop(tx);
            Ok(())
        }
        Step::NoTenant => {
            let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
            let seen = setting(&mut tx).await?;
            if seen.as_deref().is_some_and(|s| !s.is_empty()) {
                return Err(format!(
                    "a transaction without a tenant saw setting {seen:?}"
                ));
            }
            let row = sqlx::query("SELECT count(*) FROM items")
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| e.to_string())?;
            let n: i64 = row.get(0);
            if n != 0 {
                return Err(format!("a transaction without a tenant saw {n} rows"));
            }
            tx.commit().await.map_err(|e| e.to_string())
        }
    }
}

async fn setting(conn: &mut sqlx::PgConnection) -> Result<Option<String>, String> {
    sqlx::query_scalar("SELECT current_setting('app.tenant_id', true)")
        .fetch_one(conn)
        .await
        .map_err(|e| e.to_string())
}

/// How long until every server in `servers` applies quota `q`, polling
/// every 20 ms for at most `within`; `None` past it.
async fn applied_everywhere(
    http: &reqwest::Client,
    servers: &[&Server],
    token: &str,
    q: &str,
    within: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    let mut pending: Vec<&Server> = servers.to_vec();
    while start.elapsed() < within {
        let mut still = Vec::new();
        for server in pending {
            if trust_quota(http, server, token).await != q {
                still.push(server);
            }
        }
        if still.is_empty() {
            return Some(start.elapsed());
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

async fn set_trust(
    http: &reqwest::Client,
    server: &Server,
    staff: &str,
    user: uuid::Uuid,
    level: &str,
) {
    let res = http
        .put(server.url(&format!("/api/v1/users/{user}/trust")))
        .bearer_auth(staff)
        .json(&json!({ "trust_level": level }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_through_one_pgbouncer() {
    // Four server connections for three replicas' pools (25 client
    // connections each).
    let bouncer = OwnPgBouncer::start(4);
    let db = TestDb::create("pooler_fleet", "SELECT 1").await;
    let (through, direct, owner) = (bouncer.app_url(&db.name), db.app_url(), db.owner_url());
    let mut env: Vec<(&str, &str)> = QUOTAS.to_vec();
    env.extend([
        ("DATABASE_URL", through.as_str()),
        ("DB_STATEMENT_CACHE", "0"),
        ("DATABASE_DIRECT_URL", direct.as_str()),
        ("MIGRATION_DATABASE_URL", owner.as_str()),
        ("CLEANUP_INTERVAL", "300"),
        ("ITEM_RETENTION", "0"),
    ]);
    let servers: Vec<Server> = (0..3).map(|_| Server::process(&env)).collect();
    let pool = PgPool::connect(&direct).await.unwrap();
    let (tenant, emails) = seed_tenant(&pool, &[("staff", "staff"), ("user", "basic")], 2).await;
    let http = client();
    let staff = login(&http, &servers[0], &emails[0]).await;
    let token = login(&http, &servers[1], &emails[1]).await;
    let user = user_id(&pool, tenant, &emails[1]).await;

    // Clients read through every replica for the whole test.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = tokio::task::JoinSet::new();
    for reader in 0..4usize {
        let (http, stop, token) = (http.clone(), stop.clone(), token.clone());
        let bases: Vec<String> = servers.iter().map(|s| s.base.clone()).collect();
        readers.spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut n = reader;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let url = format!("{}/api/v1/items", bases[n % bases.len()]);
                match http.get(&url).bearer_auth(&token).send().await {
                    // 429 while the user is at `new` (2/min): limited, not failed.
                    Ok(res) if res.status() == 200 || res.status() == 429 => ok += 1,
                    Ok(res) => failed.push(format!("{url}: {}", res.status())),
                    Err(err) => failed.push(format!("{url}: {err}")),
                }
            }
            (ok, failed)
        });
    }

    // Logins too: their lookup is a statement of its own, outside any
    // tenant's transaction.
    let logins = {
        let (http, stop, email) = (http.clone(), stop.clone(), emails[1].clone());
        let bases: Vec<String> = servers.iter().map(|s| s.base.clone()).collect();
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            for n in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let url = format!("{}/auth/login", bases[n % bases.len()]);
                let body = json!({ "email": email, "password": common::PASSWORD });
                match http.post(&url).json(&body).send().await {
                    Ok(res) if res.status() == 200 => ok += 1,
                    Ok(res) => failed.push(format!("{url}: {}", res.status())),
                    Err(err) => failed.push(format!("{url}: {err}")),
                }
            }
            (ok, failed)
        })
    };

    // Every replica's listener proved delivery over the direct connection.
    let deadline = Instant::now() + Duration::from_secs(5);
    for server in &servers {
        while metric(&http, server, "tollgate_cache_listener_connected").await < 1.0 {
            assert!(Instant::now() < deadline, "a listener never connected");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let all: Vec<&Server> = servers.iter().collect();
    assert!(
        applied_everywhere(&http, &all, &token, "q=100000", Duration::from_secs(1))
            .await
            .is_some(),
        "every replica caches the basic level"
    );
    let mut worst = Duration::ZERO;
    for (from, level, q) in [
        (0, "new", "q=2"),
        (2, "basic", "q=100000"),
        (1, "new", "q=2"),
    ] {
        set_trust(&http, &servers[from], &staff, user, level).await;
        let took = applied_everywhere(&http, &all, &token, q, Duration::from_secs(1)).await;
        eprintln!("{level} (changed through replica {from}) applied everywhere after {took:?}");
        worst = worst.max(took.expect("a replica missed the change for 1 s"));
    }
    eprintln!("worst: every replica applied a change within {worst:?}");
    // Back to a level whose quota the readers do not exhaust.
    set_trust(&http, &servers[0], &staff, user, "basic").await;
    assert!(
        applied_everywhere(&http, &all, &token, "q=100000", Duration::from_secs(1))
            .await
            .is_some()
    );

    // The cleanup job: one replica per cycle, each run recorded once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cycles = cleanup_cycles(&pool).await;
    assert!(cycles.len() >= 4, "{cycles:?}");
    for pair in cycles.windows(2) {
        assert!(pair[1].0 - pair[0].0 <= 2, "cycles ran nowhere: {cycles:?}");
    }
    let runs = singleton_runs_without_failures(&http, &servers).await;
    let recorded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tollgate_singleton_runs WHERE job = 'cleanup'")
            .fetch_one(&pool)
            .await
            .unwrap();
    // A run counted after its commit: at most the one in flight differs.
    assert!(
        (recorded as f64 - runs).abs() <= 1.0,
        "{runs} runs counted for {recorded} recorded cycles"
    );

    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    while let Some(done) = readers.join_next().await {
        let (n, f) = done.unwrap();
        ok += n;
        failed.extend(f);
    }
    let (logged_in, login_failures) = logins.await.unwrap();
    eprintln!(
        "{logged_in} logins through the pooler, {} failed",
        login_failures.len()
    );
    assert!(logged_in >= 3, "only {logged_in} logins");
    failed.extend(login_failures);
    eprintln!("{ok} reads through the pooler, {} failed", failed.len());
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 100, "only {ok} reads");
    // Each replica's delivery probe reached the others too: not a warning.
    for server in &servers {
        let lines = server.stdout_lines();
        let warned: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("malformed trust notification"))
            .collect();
        assert!(warned.is_empty(), "{warned:?}");
    }
    drop(servers);
    pool.close().await;
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_direct_url_the_server_says_so_and_the_ttl_still_applies() {
    let bouncer = OwnPgBouncer::start(2);
    drop(Server::start(&[]));
    let through = bouncer.app_url("tollgate");
    let direct = tollgate_test_support::app_url("tollgate");
    let mut env: Vec<(&str, &str)> = QUOTAS.to_vec();
    env.extend([
        ("DATABASE_URL", through.as_str()),
        ("DB_STATEMENT_CACHE", "0"),
        ("TRUST_CACHE_TTL", "1500"),
    ]);
    // B has no direct connection; C's "direct" one is the pooler.
    let a = Server::process(&[QUOTAS, &[("DATABASE_DIRECT_URL", direct.as_str())]].concat());
    let b = Server::process(&env);
    let c = Server::process(&[&env[..], &[("DATABASE_DIRECT_URL", through.as_str())]].concat());

    let said = b.stdout_lines();
    assert!(
        said.iter()
            .any(|l| l.contains("no DATABASE_DIRECT_URL") && l.contains("TRUST_CACHE_TTL")),
        "no start-up warning: {said:?}"
    );
    assert!(
        !c.stdout_lines()
            .iter()
            .any(|l| l.contains("no DATABASE_DIRECT_URL")),
        "C has a direct URL (a wrong one, found by the probe)"
    );
    // Both listeners find that their probe never arrives.
    let deadline = Instant::now() + Duration::from_secs(6);
    for server in [&b, &c] {
        while !server
            .stdout_lines()
            .iter()
            .any(|l| l.contains("probe message did not arrive"))
        {
            assert!(
                Instant::now() < deadline,
                "the probe's failure was not reported: {:?}",
                server.stdout_lines()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let http = client();
    assert_eq!(
        metric(&http, &b, "tollgate_cache_listener_connected").await,
        0.0
    );

    // A change made through A still reaches B and C within the TTL.
    let pool = common::app_pool().await;
    let (tenant, emails) = seed_tenant(&pool, &[("staff", "staff"), ("user", "basic")], 0).await;
    let staff = login(&http, &a, &emails[0]).await;
    let token = login(&http, &b, &emails[1]).await;
    let user = user_id(&pool, tenant, &emails[1]).await;
    assert_eq!(trust_quota(&http, &b, &token).await, "q=100000");
    assert_eq!(trust_quota(&http, &c, &token).await, "q=100000");
    set_trust(&http, &a, &staff, user, "new").await;
    let took =
        applied_everywhere(&http, &[&b, &c], &token, "q=2", Duration::from_millis(3000)).await;
    eprintln!("without a direct connection, B and C applied the change after {took:?} (TTL 1.5 s)");
    assert!(took.is_some(), "the TTL did not bound staleness");
}

/// The request pool skips the ping on acquire for a connection used within
/// `TEST_IDLE_AFTER` (sqlx pings each one as it comes back), but still
/// tests one idle longer: a backend that died while idle is replaced, not
/// handed to a request that then fails.
#[tokio::test]
async fn a_connection_that_died_while_idle_is_replaced_before_use() {
    let db = TestDb::create("pool_idle_test", "").await;
    let url = db.app_url();
    let config = tollgate_server::config::DatabaseConfig::from_lookup(|name| match name {
        "DATABASE_URL" => Some(url.clone()),
        "DB_MAX_CONNECTIONS" => Some("1".to_owned()),
        _ => None,
    })
    .unwrap();
    let pool = tollgate_server::db::pool(&config).unwrap();
    let pid = |pool: PgPool| async move {
        sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
            .fetch_one(&pool)
            .await
    };
    let first = pid(pool.clone()).await.unwrap();
    // Used moments ago: handed out again as it is, the same backend.
    assert_eq!(pid(pool.clone()).await.unwrap(), first);

    // The same role may end its own backends.
    let owner = PgPool::connect(&db.app_url()).await.unwrap();
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(first)
        .execute(&owner)
        .await
        .unwrap();
    tokio::time::sleep(tollgate_server::db::TEST_IDLE_AFTER + Duration::from_millis(200)).await;
    let second = pid(pool.clone())
        .await
        .expect("a dead idle connection reached a request");
    assert_ne!(second, first);
    pool.close().await;
    owner.close().await;
    db.drop_now().await;
}
