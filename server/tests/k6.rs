//! The k6 scripts as a user runs them (`load-tests/k6/run.sh`, k6 v1.1.0
//! from `scripts/services.sh --with-test-tools`), briefly, one after
//! another against one server started with its defaults: every threshold
//! enforced, k6's exit code checked.

mod common;

use std::process::Command;

use common::{Server, repo_file};
use tollgate::tenant::{Access, TenantId, begin};
use tollgate_test_support::TestDb;

/// The password `load-tests/k6/lib.js` logs in with.
const K6_PASSWORD: &str = "k6-password-123";
/// Users the tenant scripts run (each of its own tenant, as seed.sh makes):
/// more than the hashing gate admits at once on two cores (2 workers + 8
/// queued), so some first logins are answered 503 and retried.
const USERS: usize = 12;

/// What `load-tests/k6/seed.sh` creates: user `k6-user-<n>@example.com` of
/// tenant n, trust level `trusted`.
async fn seed(pool: &sqlx::PgPool) {
    let hash = tollgate_server::auth::hash_password(K6_PASSWORD);
    for n in 1..=USERS {
        let tenant = uuid::Uuid::new_v4();
        let mut tx = begin(pool, TenantId::new(tenant), Access::ReadWrite)
            .await
            .unwrap();
        sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, $2)")
            .bind(tenant)
            .bind(format!("k6 tenant {n}"))
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO users (tenant_id, email, password_hash, trust_level)
             VALUES ($1, $2, $3, 'trusted')",
        )
        .bind(tenant)
        .bind(format!("k6-user-{n}@example.com"))
        .bind(&hash)
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
}

/// Runs `script` with `env`; panics with k6's output unless it exits 0.
fn k6(server: &Server, script: &str, env: &[(&str, &str)]) {
    let out = Command::new("bash")
        .arg(repo_file("load-tests/k6/run.sh"))
        .arg(script)
        .args(["--no-color", "--quiet"])
        .env("BASE_URL", &server.base)
        .envs(env.iter().copied())
        .output()
        .expect("bash");
    let report = String::from_utf8_lossy(&out.stdout);
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{report}\n{errors}",
        out.status
    );
    eprintln!("{script}: passed\n{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_k6_script_passes_against_the_defaults() {
    let db = TestDb::create("k6", "SELECT 1").await;
    let (app, owner) = (db.app_url(), db.owner_url());
    // The defaults: only the test database and the test server's address.
    let server = Server::start(&[("DATABASE_URL", &app), ("MIGRATION_DATABASE_URL", &owner)]);
    let pool = sqlx::PgPool::connect(&app).await.unwrap();
    seed(&pool).await;
    let users = USERS.to_string();
    let http = tokio::task::spawn_blocking(move || {
        k6(&server, "smoke.js", &[("DURATION", "3s")]);
        // 50/s for 6 s against the default 100/min: 110 of 300 allowed.
        k6(
            &server,
            "rate_limit.js",
            &[("RATE", "50"), ("SECONDS", "6"), ("QUOTA_PER_MIN", "100")],
        );
        k6(
            &server,
            "tenant_mix.js",
            &[("USERS", &users), ("DURATION", "5s")],
        );
        k6(&server, "soak.js", &[("USERS", &users), ("DURATION", "5s")]);
        server
    });
    drop(http.await.unwrap());
    pool.close().await;
    db.drop_now().await;
}
