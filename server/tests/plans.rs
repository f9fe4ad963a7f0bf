//! Tenant plans against the real Postgres (and Redis for the fleet): two
//! plans, live changes through the CLI and the operator API, overrides,
//! the TTL without the listener, the fail-safe when the lookup fails, and
//! who may change a plan.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Server, app_pool, client, login, metric_with, seed_tenant};
use serde_json::{Value, json};
use tokio::time::Instant;
use tollgate_test_support::{TestDb, free_port, unique_prefix};

const ADMIN_TOKEN: &str = "operator-0123456789abcdef0123456789";

/// Two plans, every other limit out of the way.
const PLANS: &[(&str, &str)] = &[
    ("TENANT_PLANS", "free,pro"),
    ("RATE_LIMIT_PLAN_FREE_TENANT", "5/min"),
    ("RATE_LIMIT_PLAN_PRO_TENANT", "50/min"),
    ("RATE_LIMIT_CLASS_READ", "100000/min"),
    ("RATE_LIMIT_CLASS_WRITE", "100000/min"),
    ("RATE_LIMIT_TRUST_NEW", "100000/min"),
    ("RATE_LIMIT_TRUST_BASIC", "100000/min"),
    ("RATE_LIMIT_TRUST_STAFF", "unlimited"),
    ("RATE_LIMIT_IP", "100000/min"),
    ("RATE_LIMIT_CLASS_AUTH", "100000/min"),
];

fn with<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    PLANS.iter().chain(extra).copied().collect()
}

/// `tollgate-server <args>` as an operator runs it, with the plans of
/// [`PLANS`]: (exit code, stdout, stderr).
fn cli(db_url: &str, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate-server"));
    cmd.args(args).env("DATABASE_URL", db_url);
    for (k, v) in PLANS {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run the CLI");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn shared_db() -> String {
    tollgate_test_support::app_url("tollgate")
}

/// An in-process server with [`PLANS`] and the operator API on a port of
/// its own: (server, the API's address).
fn with_operator_api() -> (Server, String) {
    let admin_addr = format!("127.0.0.1:{}", free_port());
    let server = Server::start(&with(&[
        ("ADMIN_ADDR", &admin_addr),
        ("ADMIN_TOKEN", ADMIN_TOKEN),
    ]));
    (server, admin_addr)
}

/// A read: (status, the `"tenant"` item of `RateLimit-Policy`).
async fn read(http: &reqwest::Client, server: &Server, token: &str) -> (u16, String) {
    read_at(http, &server.base, token).await
}

async fn read_at(http: &reqwest::Client, base: &str, token: &str) -> (u16, String) {
    let res = http
        .get(format!("{base}/api/v1/items"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let policy = res
        .headers()
        .get_all("ratelimit-policy")
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(", "))
        .find(|item| item.starts_with("\"tenant\""))
        .unwrap_or("none")
        .to_owned();
    (status, policy)
}

/// A tenant with one `basic` user on `plan`, and the user's token.
async fn tenant_on(server: &Server, plan: &str) -> (uuid::Uuid, String) {
    let pool = app_pool().await;
    let (tenant, emails) = seed_tenant(&pool, &[("reader", "basic")], 0).await;
    let (code, out, err) = cli(
        &shared_db(),
        &["tenant", "set-plan", &tenant.to_string(), plan],
    );
    assert_eq!(code, 0, "set-plan: {out}{err}");
    let token = login(&client(), server, &emails[0]).await;
    (tenant, token)
}

#[tokio::test]
async fn each_tenant_gets_its_plans_quota() {
    // A process: its `/metrics` has the recorder's series.
    let server = Server::process(&with(&[]));
    let http = client();
    let (_, free) = tenant_on(&server, "free").await;
    let (_, pro) = tenant_on(&server, "pro").await;
    for n in 1..=5 {
        let (status, policy) = read(&http, &server, &free).await;
        assert_eq!(
            (status, policy.as_str()),
            (200, r#""tenant";q=5;w=60"#),
            "read {n}"
        );
    }
    let (status, policy) = read(&http, &server, &free).await;
    assert_eq!(status, 429, "the 6th read of a free tenant");
    assert_eq!(policy, r#""tenant";q=5;w=60"#);
    for n in 1..=50 {
        let (status, policy) = read(&http, &server, &pro).await;
        assert_eq!(
            (status, policy.as_str()),
            (200, r#""tenant";q=50;w=60"#),
            "read {n}"
        );
    }
    let (status, policy) = read(&http, &server, &pro).await;
    assert_eq!((status, policy.as_str()), (429, r#""tenant";q=50;w=60"#));
    // Each tenant's plan was looked up once; the other reads were hits.
    let hits = metric_with(
        &http,
        &server,
        "tollgate_cache_hits_total",
        r#"cache="plan""#,
    )
    .await;
    assert!(hits >= 55.0, "{hits} plan cache hits counted");
}

/// Three replicas on Redis, clients reading on each: `tenant set-plan`
/// moves the tenant from free to pro; every replica applies it within 1 s,
/// the tenant is served at once, and the fleet admits no more than the
/// quotas in force (every 200 counted).
#[tokio::test]
async fn an_upgrade_applies_on_every_replica_within_a_second() {
    let prefix = unique_prefix("plans");
    let env = with(&[
        ("RATE_LIMIT_STORE", "redis"),
        ("RATE_LIMIT_REDIS_PREFIX", &prefix),
    ]);
    let replicas: Vec<Server> = (0..3).map(|_| Server::process(&env)).collect();
    let (tenant, token) = tenant_on(&replicas[0], "free").await;
    let http = client();
    // Exhaust free's burst across the fleet, and warm every cache.
    let mut admitted = 0;
    for server in replicas.iter().cycle().take(9) {
        let (status, policy) = read(&http, server, &token).await;
        assert_eq!(policy, r#""tenant";q=5;w=60"#);
        admitted += u32::from(status == 200);
    }
    assert_eq!(admitted, 5, "the fleet admitted free's burst, no more");
    let start = Instant::now();
    let (code, out, err) = cli(
        &shared_db(),
        &["tenant", "set-plan", &tenant.to_string(), "pro"],
    );
    assert_eq!(code, 0, "{out}{err}");
    let changed = start.elapsed();
    // Each replica's client reads until it sees pro; the first read under
    // pro must be served.
    let mut clients = tokio::task::JoinSet::new();
    for server in &replicas {
        let (http, token, base) = (http.clone(), token.clone(), server.base.clone());
        clients.spawn(async move {
            let mut admitted = 0;
            let deadline = start + Duration::from_secs(3);
            loop {
                let (status, policy) = read_at(&http, &base, &token).await;
                admitted += u32::from(status == 200);
                if policy == r#""tenant";q=50;w=60"# {
                    assert_eq!(status, 200, "the upgraded tenant was refused");
                    return (start.elapsed(), admitted);
                }
                assert!(Instant::now() < deadline, "still free after 3 s");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }
    let seen = clients.join_all().await;
    let worst = seen.iter().map(|(took, _)| *took).max().unwrap();
    eprintln!("set-plan took {changed:?}; replicas applied it after {seen:?} (worst {worst:?})");
    assert!(worst <= changed + Duration::from_secs(1), "worst {worst:?}");
    admitted += seen.iter().map(|(_, n)| n).sum::<u32>();
    // Then the fleet is held to pro's 50 (plus what refills meanwhile).
    for server in replicas.iter().cycle().take(150) {
        admitted += u32::from(read(&http, server, &token).await.0 == 200);
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Free's 5 (+1 per 12 s) before, pro's 50 (+1 per 1.2 s) after.
    let bound = 5 + 50 + (elapsed / 12.0).ceil() as u32 + (elapsed / 1.2).ceil() as u32;
    eprintln!("admitted {admitted} of at most {bound} in {elapsed:.1} s");
    assert!(admitted <= bound, "admitted {admitted} > {bound}");
    assert!(
        admitted >= 55,
        "admitted only {admitted}: the upgrade was not usable"
    );
}

/// An override above the plan applies live, and `default` reverts it;
/// through the operator API, with the CLI's `show` agreeing.
#[tokio::test]
async fn overrides_apply_and_revert_live() {
    let (server, admin_addr) = with_operator_api();
    let http = client();
    let (tenant, token) = tenant_on(&server, "free").await;
    assert_eq!(read(&http, &server, &token).await.1, r#""tenant";q=5;w=60"#);
    let admin = |path: &str| format!("http://{admin_addr}/admin/tenants/{tenant}{path}");
    let res = http
        .put(admin("/limits/tenant"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({ "quota": "20/min" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let shown: Value = res.json().await.unwrap();
    assert_eq!(shown["plan"], "free");
    assert_eq!(shown["overrides"]["tenant"], "20/min");
    assert_eq!(shown["effective"]["tenant"], "20/60s");
    assert_eq!(
        read(&http, &server, &token).await.1,
        r#""tenant";q=20;w=60"#
    );
    let (code, out, _) = cli(&shared_db(), &["tenant", "show", &tenant.to_string()]);
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), shown);
    // Back to the plan's, with the CLI this time.
    let (code, out, err) = cli(
        &shared_db(),
        &[
            "tenant",
            "set-limit",
            &tenant.to_string(),
            "tenant",
            "default",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["overrides"], json!({}));
    // The CLI's change reaches this replica through the listener.
    let deadline = Instant::now() + Duration::from_secs(1);
    while read(&http, &server, &token).await.1 != r#""tenant";q=5;w=60"# {
        assert!(
            Instant::now() < deadline,
            "the revert did not apply within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The concurrency override reaches the 429's RateLimit-Policy too: the
    // limit is per request.
    let res = http
        .delete(admin("/limits/concurrency"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

/// Bad input: unknown plan or limit, a tenant that does not exist, a bad
/// quota. Each is refused naming what is allowed, and nothing changes.
#[tokio::test]
async fn bad_changes_are_refused_and_change_nothing() {
    let (server, admin_addr) = with_operator_api();
    let http = client();
    let (tenant, _) = tenant_on(&server, "pro").await;
    let admin = |path: String| format!("http://{admin_addr}/admin/tenants/{path}");
    let put = |path: String, body: Value| {
        http.put(admin(path))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
    };
    let res = put(format!("{tenant}/plan"), json!({"plan": "gold"}))
        .await
        .unwrap();
    assert_eq!(res.status(), 422);
    assert!(res.text().await.unwrap().contains("one of free, pro"));
    let res = put(format!("{tenant}/limits/burst"), json!({"quota": "5/min"}))
        .await
        .unwrap();
    assert_eq!(res.status(), 422);
    assert!(
        res.text()
            .await
            .unwrap()
            .contains("tenant, read, write, concurrency")
    );
    let res = put(format!("{tenant}/limits/tenant"), json!({"quota": "lots"}))
        .await
        .unwrap();
    assert_eq!(res.status(), 422);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let res = put(
        format!("{}/plan", uuid::Uuid::new_v4()),
        json!({"plan": "free"}),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 404);
    let res = put("not-a-uuid/plan".into(), json!({"plan": "free"}))
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    // The CLI: exit 2, naming what is allowed.
    let id = tenant.to_string();
    let (code, _, err) = cli(&shared_db(), &["tenant", "set-plan", &id, "gold"]);
    assert_eq!(code, 2);
    assert!(err.contains("one of free, pro"), "{err}");
    let (code, _, err) = cli(&shared_db(), &["tenant", "set-limit", &id, "burst", "1/s"]);
    assert_eq!(code, 2);
    assert!(err.contains("tenant, read, write, concurrency"), "{err}");
    let (code, _, err) = cli(
        &shared_db(),
        &["tenant", "set-limit", &id, "concurrency", "0"],
    );
    assert_eq!(code, 2, "{err}");
    let missing = uuid::Uuid::new_v4().to_string();
    let (code, _, err) = cli(&shared_db(), &["tenant", "set-plan", &missing, "free"]);
    assert_eq!(code, 2);
    assert!(err.contains("no such tenant"), "{err}");
    // Nothing was applied.
    let (_, out, _) = cli(&shared_db(), &["tenant", "show", &id]);
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (shown["plan"].as_str(), &shown["overrides"]),
        (Some("pro"), &json!({}))
    );
}

/// A tenant's `staff` user cannot change its plan or limits: its token is
/// not the operator credential, and the public listener has no operator
/// routes at all.
#[tokio::test]
async fn a_staff_token_cannot_change_its_tenants_plan() {
    let (server, admin_addr) = with_operator_api();
    let http = client();
    let pool = app_pool().await;
    let (tenant, emails) = seed_tenant(&pool, &[("boss", "staff")], 0).await;
    let staff = login(&http, &server, &emails[0]).await;
    let body = json!({ "plan": "pro" });
    let path = format!("/admin/tenants/{tenant}/plan");
    for base in [format!("http://{admin_addr}"), server.base.clone()] {
        let res = http
            .put(format!("{base}{path}"))
            .bearer_auth(&staff)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            [401, 404].contains(&res.status().as_u16()),
            "{base}: {}",
            res.status()
        );
        let res = http
            .put(format!("{base}/admin/tenants/{tenant}/limits/tenant"))
            .bearer_auth(&staff)
            .json(&json!({ "quota": "100000/min" }))
            .send()
            .await
            .unwrap();
        assert!([401, 404].contains(&res.status().as_u16()));
    }
    let (_, out, _) = cli(&shared_db(), &["tenant", "show", &tenant.to_string()]);
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["plan"], "free", "the staff user changed its plan");
    assert_eq!(shown["overrides"], json!({}));
}

/// With its listener off, a replica applies a change within
/// `PLAN_CACHE_TTL`.
#[tokio::test]
async fn without_the_listener_a_change_applies_within_the_ttl() {
    let server = Server::process(&with(&[
        ("TRUST_BROADCAST_ENABLED", "false"),
        ("PLAN_CACHE_TTL", "1500"),
    ]));
    let http = client();
    let (tenant, token) = tenant_on(&server, "free").await;
    assert_eq!(read(&http, &server, &token).await.1, r#""tenant";q=5;w=60"#);
    let (code, _, _) = cli(
        &shared_db(),
        &["tenant", "set-plan", &tenant.to_string(), "pro"],
    );
    assert_eq!(code, 0);
    let start = Instant::now();
    assert_eq!(
        read(&http, &server, &token).await.1,
        r#""tenant";q=5;w=60"#,
        "cached right after the change"
    );
    while read(&http, &server, &token).await.1 != r#""tenant";q=50;w=60"# {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "not applied after 3 s (TTL 1.5 s)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "without the listener, applied after {:?} (TTL 1.5 s)",
        start.elapsed()
    );
}

/// When the plan lookup fails (here: the app role lost SELECT on tenants)
/// and nothing is cached, the tenant gets the default plan's limits,
/// counted, never unlimited and never a 500.
#[tokio::test]
async fn a_failed_lookup_gives_the_default_plan() {
    let db = TestDb::create("plans_failsafe", "SELECT 1").await;
    let (app_url, owner_url) = (db.app_url(), db.owner_url());
    let server = Server::process(&with(&[
        ("DATABASE_URL", &app_url),
        ("MIGRATION_DATABASE_URL", &owner_url),
        ("TENANT_DEFAULT_PLAN", "free"),
    ]));
    let pool = sqlx::PgPool::connect(&app_url).await.unwrap();
    let (tenant, emails) = seed_tenant(&pool, &[("reader", "basic")], 0).await;
    let http = client();
    let token = login(&http, &server, &emails[0]).await;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate-server"));
    cmd.args(["tenant", "set-plan", &tenant.to_string(), "pro"])
        .env("DATABASE_URL", &app_url);
    for (k, v) in PLANS {
        cmd.env(k, v);
    }
    assert!(cmd.status().unwrap().success());
    let owner = sqlx::PgPool::connect(&owner_url).await.unwrap();
    sqlx::query("REVOKE SELECT ON tenants FROM tollgate_app")
        .execute(&owner)
        .await
        .unwrap();
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let (status, policy) = read(&http, &server, &token).await;
        assert_eq!(policy, r#""tenant";q=5;w=60"#, "not the default plan's");
        statuses.push(status);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);
    let failures = metric_with(
        &http,
        &server,
        "tollgate_cache_lookup_failures_total",
        r#"cache="plan""#,
    )
    .await;
    assert!(failures >= 6.0, "{failures} lookup failures counted");
    drop(server);
    pool.close().await;
    owner.close().await;
    db.drop_now().await;
}
