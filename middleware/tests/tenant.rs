//! `tollgate::tenant` against a real Postgres: isolation by row-level
//! security, commit/rollback by status, error mapping, and the connection a
//! cancelled or panicked request hands back to the pool.

use std::time::Duration;

use axum::body::Body;
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{Request, StatusCode};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tollgate::tenant::{
    Access, AuditError, FromHeader, TenantError, TenantId, TenantLayer, Tx, audit, audit_allowing,
    begin,
};
use tollgate_test_support::TestDb;
use tower::ServiceExt;

const SCHEMA: &str = "
CREATE TABLE notes (
    id bigserial PRIMARY KEY,
    tenant_id uuid NOT NULL DEFAULT nullif(current_setting('app.tenant_id', true), '')::uuid,
    body text NOT NULL,
    -- Checked at COMMIT: how the tests make a commit fail.
    CONSTRAINT notes_body_unique UNIQUE (body) DEFERRABLE INITIALLY DEFERRED
);
ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
ALTER TABLE notes FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON notes
    USING (tenant_id = nullif(current_setting('app.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = nullif(current_setting('app.tenant_id', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO tollgate_app;
GRANT USAGE ON SEQUENCE notes_id_seq TO tollgate_app;
";

const A: &str = "0b9e3d4c-7c0e-4a55-9d8e-3f0a1b2c3d4e";
const B: &str = "6f1d2c3b-4a59-4e8d-9c7b-1a2b3c4d5e6f";

async fn insert(tx: &mut Tx, body: &str) -> Result<(), TenantError> {
    sqlx::query("INSERT INTO notes (body) VALUES ($1)")
        .bind(body)
        .execute(tx.conn().await?)
        .await?;
    Ok(())
}

fn app(pool: PgPool) -> Router {
    app_with(
        pool,
        FromHeader::new(http::HeaderName::from_static("x-tenant-id")),
    )
}

/// [`app`] with tenants resolved by `resolver`.
fn app_with(pool: PgPool, resolver: FromHeader) -> Router {
    Router::new()
        .route(
            "/notes",
            get(|mut tx: Tx| async move {
                let bodies: Vec<String> = sqlx::query_scalar("SELECT body FROM notes ORDER BY id")
                    .fetch_all(tx.conn().await?)
                    .await?;
                Ok::<_, TenantError>(Json(bodies))
            })
            .post(|mut tx: Tx, body: String| async move {
                insert(&mut tx, &body).await?;
                Ok::<_, TenantError>(StatusCode::CREATED)
            }),
        )
        .route(
            "/conflict",
            post(|mut tx: Tx, body: String| async move {
                insert(&mut tx, &body).await?;
                Ok::<_, TenantError>(StatusCode::CONFLICT)
            }),
        )
        .route(
            "/slow",
            post(|mut tx: Tx, body: String| async move {
                insert(&mut tx, &body).await?;
                sqlx::query("SELECT pg_sleep(0.3)")
                    .execute(tx.conn().await?)
                    .await?;
                Ok::<_, TenantError>(StatusCode::CREATED)
            }),
        )
        .route(
            "/panic",
            post(|mut tx: Tx, body: String| async move {
                insert(&mut tx, &body).await.unwrap();
                panic!("handler bug");
                #[allow(unreachable_code)]
                StatusCode::CREATED
            }),
        )
        .route(
            "/pair",
            // Two rows in one transaction: a request is committed whole
            // (both) or not at all (neither).
            post(|mut tx: Tx, body: String| async move {
                insert(&mut tx, &body).await?;
                insert(&mut tx, &format!("{body}-twin")).await?;
                Ok::<_, TenantError>(StatusCode::CREATED)
            }),
        )
        .route(
            "/swallowed-error",
            // A handler that catches a database error and answers 2xx: the
            // transaction is aborted, and Postgres answers its COMMIT with
            // the tag ROLLBACK and no error.
            post(|mut tx: Tx| async move {
                insert(&mut tx, "swallowed").await?;
                let failed = sqlx::query("SELECT 1 / 0").execute(tx.conn().await?).await;
                assert!(failed.is_err());
                Ok::<_, TenantError>(StatusCode::CREATED)
            }),
        )
        .route(
            "/duplicate",
            post(|mut tx: Tx| async move {
                insert(&mut tx, "twice").await?;
                insert(&mut tx, "twice").await?;
                Ok::<_, TenantError>(StatusCode::CREATED)
            }),
        )
        .route(
            "/other-tenant",
            post(|mut tx: Tx| async move {
                sqlx::query("INSERT INTO notes (tenant_id, body) VALUES ($1, 'smuggled')")
                    .bind(uuid_of(B))
                    .execute(tx.conn().await?)
                    .await?;
                Ok::<_, TenantError>(StatusCode::CREATED)
            }),
        )
        .route(
            "/write-on-get",
            get(|mut tx: Tx| async move {
                insert(&mut tx, "from a GET").await?;
                Ok::<_, TenantError>(StatusCode::OK)
            }),
        )
        .layer(TenantLayer::new(pool, resolver))
}

fn uuid_of(s: &str) -> uuid::Uuid {
    s.parse::<TenantId>().unwrap().as_uuid().unwrap()
}

fn req(method: &str, path: &str, tenant: &str, body: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("x-tenant-id", tenant)
        .body(Body::from(body.to_owned()))
        .unwrap()
}

async fn call(app: &Router, r: Request<Body>) -> (StatusCode, String) {
    let res = app.clone().oneshot(r).await.unwrap();
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

async fn pool(db: &TestDb, size: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&db.app_url())
        .await
        .unwrap()
}

/// Takes the pool's connection and checks it carries nothing from an
/// earlier request: no open transaction, no tenant setting, no rows
/// visible. Returns its backend pid.
async fn assert_clean(pool: &PgPool) -> i32 {
    let mut conn = pool.acquire().await.unwrap();
    let (pid, setting): (i32, Option<String>) =
        sqlx::query_as("SELECT pg_backend_pid(), current_setting('app.tenant_id', true)")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    // now() is the transaction's start: two statements 2 ms apart see the
    // same now() only inside one open transaction.
    let now = || sqlx::query_scalar::<_, i64>("SELECT (extract(epoch FROM now()) * 1e6)::bigint");
    let first = now().fetch_one(&mut *conn).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2)).await;
    let second = now().fetch_one(&mut *conn).await.unwrap();
    let in_transaction = first == second;
    assert!(
        !in_transaction,
        "connection {pid} handed back inside a transaction (setting {setting:?})"
    );
    assert_eq!(setting.unwrap_or_default(), "", "tenant setting leaked");
    let visible: i64 = sqlx::query_scalar("SELECT count(*) FROM notes")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(visible, 0, "rows visible without a tenant");
    pid
}

#[tokio::test]
async fn tenants_see_only_their_rows_and_status_decides_commit() {
    let db = TestDb::create("tenant_commit", SCHEMA).await;
    let pool = pool(&db, 4).await;
    let app = app(pool.clone());

    assert_eq!(call(&app, req("POST", "/notes", A, "a1")).await.0, 201);
    assert_eq!(call(&app, req("POST", "/notes", B, "b1")).await.0, 201);
    // 4xx: rolled back.
    assert_eq!(
        call(&app, req("POST", "/conflict", A, "a-rolled-back"))
            .await
            .0,
        409
    );
    assert_eq!(
        call(&app, req("GET", "/notes", A, "")).await,
        (StatusCode::OK, r#"["a1"]"#.into())
    );
    assert_eq!(call(&app, req("GET", "/notes", B, "")).await.1, r#"["b1"]"#);

    // Missing and invalid tenants never reach the handler.
    let no_tenant = Request::get("/notes").body(Body::empty()).unwrap();
    let (status, body) = call(&app, no_tenant).await;
    assert_eq!(status, 401);
    assert!(body.contains("\"status\":401"), "{body}");
    assert_eq!(call(&app, req("GET", "/notes", "acme", "")).await.0, 400);

    // Writing as another tenant is a row-level security violation: 403.
    let (status, body) = call(&app, req("POST", "/other-tenant", A, "")).await;
    assert_eq!(status, 403, "{body}");
    // GET runs READ ONLY: the write fails, nothing is kept.
    assert_eq!(call(&app, req("GET", "/write-on-get", A, "")).await.0, 500);
    // A transaction aborted by an error the handler swallowed is not
    // committed, and not answered 2xx.
    let (status, body) = call(&app, req("POST", "/swallowed-error", A, "")).await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("Commit failed"), "{body}");
    // A commit that fails (deferred unique check) is never answered 2xx.
    let (status, body) = call(&app, req("POST", "/duplicate", A, "")).await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("Commit failed"), "{body}");
    assert_eq!(call(&app, req("GET", "/notes", A, "")).await.1, r#"["a1"]"#);

    // The plain function, outside axum.
    let mut tx = begin(&pool, A.parse().unwrap(), Access::ReadOnly)
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM notes")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(n, 1);
    drop(tx);
    pool.close().await;
    db.drop_now().await;
}

#[tokio::test]
async fn dropped_and_panicked_requests_leave_a_clean_connection() {
    let db = TestDb::create("tenant_cancel", SCHEMA).await;
    // One connection: every request reuses the one before's.
    let pool = pool(&db, 1).await;
    let app = app(pool.clone());
    // A cancelled request may cost the pool its connection (sqlx closes one
    // dropped mid-message); what must hold is that a connection handed on
    // is clean, so count the steps whose connection was the step before's.
    let mut last_pid = assert_clean(&pool).await;
    let mut reused = 0;

    // Futures dropped at every point of acquire, BEGIN, insert and commit.
    for step in 0..200u64 {
        let call = app
            .clone()
            .oneshot(req("POST", "/pair", A, &format!("n{step}")));
        let _ = tokio::time::timeout(Duration::from_micros(step * 25), call).await;
        let pid = assert_clean(&pool).await;
        reused += u32::from(pid == last_pid);
        last_pid = pid;
    }
    // A client that hangs up mid-transaction, over a real socket.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(axum::serve(listener, app.clone()).into_future());
    {
        use tokio::io::AsyncWriteExt;
        let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        socket
            .write_all(
                format!(
                    "POST /slow HTTP/1.1\r\nhost: x\r\nx-tenant-id: {A}\r\ncontent-length: 4\r\n\r\nslow"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    } // hung up while pg_sleep runs
    last_pid = assert_clean(&pool).await;

    // A handler that panics after writing.
    let panicked = tokio::spawn(app.clone().oneshot(req("POST", "/panic", A, "p"))).await;
    assert!(panicked.unwrap_err().is_panic());
    let pid = assert_clean(&pool).await;
    reused += u32::from(pid == last_pid);
    assert!(
        reused > 0,
        "no connection outlived a cancelled request; the test proves nothing"
    );

    // Nothing of the cancelled requests is half there: each pair either
    // committed whole or not at all, and none of the slow or panicked ones.
    let (_, body) = call(&app, req("GET", "/notes", A, "")).await;
    let notes: Vec<String> = serde_json::from_str(&body).unwrap();
    assert!(!notes.iter().any(|n| n == "slow" || n == "p"), "{notes:?}");
    let mut whole = 0;
    for step in 0..200u64 {
        let (one, twin) = (format!("n{step}"), format!("n{step}-twin"));
        let halves = (notes.contains(&one), notes.contains(&twin));
        assert!(
            halves.0 == halves.1,
            "request {step} committed half: {halves:?}"
        );
        whole += u32::from(halves.0);
    }
    // Both outcomes happened, or the steps did not cut where they claim to.
    assert!(
        whole > 0 && whole < 200,
        "{whole} of 200 cancelled pairs committed"
    );
    server.abort();
    pool.close().await;
    db.drop_now().await;
}

#[tokio::test]
async fn audit_names_the_table_or_role_attribute() {
    let db = TestDb::create("tenant_audit", SCHEMA).await;
    let app_pool = pool(&db, 1).await;
    audit(&app_pool).await.unwrap();

    // A view over a tenant table, readable by the app role, running with
    // its owner's rights: refused until it is security_invoker.
    sqlx::raw_sql(
        "CREATE VIEW note_bodies AS SELECT body FROM notes;
         GRANT SELECT ON note_bodies TO tollgate_app",
    )
    .execute(&PgPool::connect(&db.owner_url()).await.unwrap())
    .await
    .unwrap();
    let err = audit(&app_pool).await.unwrap_err();
    assert!(
        matches!(err, AuditError::ViewWithoutInvoker { ref view } if view == "public.note_bodies"),
        "{err}"
    );
    sqlx::query("ALTER VIEW note_bodies SET (security_invoker = true)")
        .execute(&PgPool::connect(&db.owner_url()).await.unwrap())
        .await
        .unwrap();
    audit(&app_pool).await.unwrap();
    // A SECURITY DEFINER function the app role can run: refused unless
    // declared.
    sqlx::raw_sql(
        "CREATE FUNCTION all_notes() RETURNS bigint LANGUAGE sql SECURITY DEFINER
             AS 'SELECT count(*) FROM public.notes';
         GRANT EXECUTE ON FUNCTION all_notes() TO tollgate_app",
    )
    .execute(&PgPool::connect(&db.owner_url()).await.unwrap())
    .await
    .unwrap();
    let err = audit(&app_pool).await.unwrap_err();
    assert!(
        matches!(err, AuditError::SecurityDefiner { ref function } if function == "public.all_notes()"),
        "{err}"
    );
    audit_allowing(&app_pool, &["public.all_notes"])
        .await
        .unwrap();
    sqlx::query("REVOKE EXECUTE ON FUNCTION all_notes() FROM tollgate_app, PUBLIC")
        .execute(&PgPool::connect(&db.owner_url()).await.unwrap())
        .await
        .unwrap();
    audit(&app_pool).await.unwrap();

    // The owner may act as the table's owner (and has BYPASSRLS).
    let owner = PgPool::connect(&db.owner_url()).await.unwrap();
    let err = audit(&owner).await.unwrap_err();
    assert!(matches!(err, AuditError::BypassRls { .. }), "{err}");
    assert!(err.to_string().contains("BYPASSRLS"));

    let breaks = [
        (
            "ALTER TABLE notes NO FORCE ROW LEVEL SECURITY",
            "not forced",
        ),
        (
            "ALTER TABLE notes DISABLE ROW LEVEL SECURITY",
            "not enabled",
        ),
    ];
    for (ddl, expected) in breaks {
        sqlx::query(ddl).execute(&owner).await.unwrap();
        let err = audit(&app_pool).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("public.notes") && msg.contains(expected),
            "{msg}"
        );
    }
    sqlx::raw_sql(
        "ALTER TABLE notes ENABLE ROW LEVEL SECURITY; ALTER TABLE notes FORCE ROW LEVEL SECURITY;
         DROP POLICY tenant_isolation ON notes",
    )
    .execute(&owner)
    .await
    .unwrap();
    let err = audit(&app_pool).await.unwrap_err();
    assert!(
        matches!(err, AuditError::NoPolicy { ref table } if table == "public.notes"),
        "{err}"
    );

    owner.close().await;
    app_pool.close().await;
    db.drop_now().await;
}

/// The fair pool against real connections: a tenant at its cap waits and
/// then gets 503 while another tenant is served at once; a tenant with a
/// long backlog does not starve one that arrives later; idle tenants hold
/// no entry.
#[tokio::test]
async fn tenant_pool_caps_each_tenant_and_serves_tenants_fairly() {
    use tollgate::tenant::TenantPool;
    let db = TestDb::create("tenant_pool_fair", SCHEMA).await;
    let raw = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_millis(400))
        .connect(&db.app_url())
        .await
        .unwrap();
    let fair = TenantPool::new(raw).with_tenant_max(2);
    let (a, b): (TenantId, TenantId) = (A.parse().unwrap(), B.parse().unwrap());

    // A holds its share in two real transactions.
    let held_a = [
        fair.acquire(a).await.unwrap(),
        fair.acquire(a).await.unwrap(),
    ];
    let mut tx = begin(fair.pool(), a, Access::ReadWrite).await.unwrap();
    insert_raw(&mut tx, "a-held").await;
    // A third request of A waits for A's share, not the pool, and gives up.
    let started = tokio::time::Instant::now();
    let err = fair.acquire(a).await.unwrap_err();
    assert!(matches!(err, TenantError::TenantAtCapacity), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(380));
    assert_eq!(err.to_problem().status(), 503);
    // B is served at once, although A's backlog came first.
    let started = tokio::time::Instant::now();
    let permit_b = fair.acquire(b).await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(100));
    let mut tx_b = begin(fair.pool(), b, Access::ReadOnly).await.unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM notes")
        .fetch_one(&mut *tx_b)
        .await
        .unwrap();
    assert_eq!(seen, 0);
    drop(tx_b);
    drop(permit_b);
    drop(tx);

    // Fairness while the pool is full: A queues 20 requests, then B asks
    // once. When a connection frees, B is next in the pool's queue, ahead
    // of 18 of A's: B waits for one release, not for A's backlog.
    let other: TenantId = "11111111-2222-4333-8444-555555555555".parse().unwrap();
    let held_other = [
        fair.acquire(other).await.unwrap(),
        fair.acquire(other).await.unwrap(),
    ];
    assert_eq!(fair.load(), 1.0);
    let mut backlog = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let fair = fair.clone();
        // Each holds its connection long after B's deadline.
        backlog.spawn(async move {
            let permit = fair.acquire(a).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            permit.is_ok()
        });
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(fair.waiters(), 20);
    // Only A's cap of them queue for the pool; the rest wait at A's share.
    let b_request = {
        let fair = fair.clone();
        tokio::spawn(async move { fair.acquire(b).await.map(drop).is_ok() })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(held_a);
    drop(held_other);
    assert!(b_request.await.unwrap(), "B starved behind A's backlog");
    while backlog.join_next().await.is_some() {}
    // Nothing held or waiting: no tenant entry left, load back to 0.
    assert_eq!(fair.load(), 0.0);
    assert_eq!(fair.waiters(), 0);
    fair.pool().close().await;
    db.drop_now().await;
}

async fn insert_raw(tx: &mut sqlx::PgConnection, body: &str) {
    sqlx::query("INSERT INTO notes (body) VALUES ($1)")
        .bind(body)
        .execute(tx)
        .await
        .unwrap();
}

#[tokio::test]
async fn after_commit_runs_once_the_change_is_visible_and_never_on_rollback() {
    let db = TestDb::create("tenant_after_commit", SCHEMA).await;
    let pool = pool(&db, 4).await;
    // What another connection saw when the hook ran.
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<Option<i64>>();
    let observer = pool.clone();
    let app = Router::new()
        .route(
            "/notes",
            post(move |mut tx: Tx, body: String| {
                let (observer, seen_tx) = (observer.clone(), seen_tx.clone());
                async move {
                    let status = if body == "fail" { 409 } else { 201 };
                    insert(&mut tx, &body).await?;
                    tx.after_commit(move || {
                        // A hook must not block: look from a task.
                        tokio::spawn(async move {
                            let mut conn = observer.acquire().await.unwrap();
                            sqlx::query(sqlx::AssertSqlSafe(format!("SET app.tenant_id = '{A}'")))
                                .execute(&mut *conn)
                                .await
                                .unwrap();
                            let count = sqlx::query_scalar("SELECT count(*) FROM notes")
                                .fetch_one(&mut *conn)
                                .await
                                .ok();
                            let _ = seen_tx.send(count);
                        });
                    });
                    Ok::<_, TenantError>(StatusCode::from_u16(status).unwrap())
                }
            }),
        )
        .layer(TenantLayer::new(
            pool.clone(),
            FromHeader::new(http::HeaderName::from_static("x-tenant-id")),
        ));
    assert_eq!(call(&app, req("POST", "/notes", A, "kept")).await.0, 201);
    let count = tokio::time::timeout(Duration::from_secs(5), seen.recv())
        .await
        .expect("the hook did not run after the commit");
    assert_eq!(
        count,
        Some(Some(1)),
        "the hook ran before the row was visible"
    );
    assert_eq!(call(&app, req("POST", "/notes", A, "fail")).await.0, 409);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), seen.recv())
            .await
            .is_err(),
        "the hook ran after a rollback"
    );
}

/// A commit that takes 300 ms: a deferred trigger sleeps at COMMIT for a
/// note whose body starts with "slow".
const SLOW_COMMIT: &str = "
CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.body LIKE 'slow%' THEN PERFORM pg_sleep(0.3); END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER notes_slow_commit AFTER INSERT ON notes
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_commit_runs_even_when_the_caller_is_dropped_during_commit() {
    let db = TestDb::create("tenant_dropped_commit", &format!("{SCHEMA}{SLOW_COMMIT}")).await;
    let pool = pool(&db, 2).await;
    let (ran_tx, mut ran) = tokio::sync::mpsc::unbounded_channel::<()>();
    let app = Router::new()
        .route(
            "/notes",
            post(move |mut tx: Tx, body: String| {
                let ran_tx = ran_tx.clone();
                async move {
                    insert(&mut tx, &body).await?;
                    tx.after_commit(move || {
                        let _ = ran_tx.send(());
                    });
                    Ok::<_, TenantError>(StatusCode::CREATED)
                }
            }),
        )
        .layer(TenantLayer::new(
            pool.clone(),
            FromHeader::new(http::HeaderName::from_static("x-tenant-id")),
        ));
    // The caller gives up 100 ms in, while COMMIT (300 ms) is on the wire.
    let call = app.clone().oneshot(req("POST", "/notes", A, "slow"));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), call)
            .await
            .is_err(),
        "the request finished before the caller gave up"
    );
    // The change committed anyway, and its hook ran.
    tokio::time::timeout(Duration::from_secs(3), ran.recv())
        .await
        .expect("a committed change's after-commit hook never ran")
        .unwrap();
    let mut tx = tollgate::tenant::begin(&pool, A.parse().unwrap(), Access::ReadOnly)
        .await
        .unwrap();
    let notes: i64 = sqlx::query_scalar("SELECT count(*) FROM notes")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(notes, 1, "the note did not commit");
}

/// Tenants whose ids are slugs or integers: a `text` column and a policy
/// comparing with the setting as text. Isolation holds, and an id outside
/// the character set never reaches Postgres.
#[tokio::test]
async fn text_tenant_ids_isolate_on_a_text_column() {
    let schema = "
        CREATE TABLE notes (
            id bigserial PRIMARY KEY,
            tenant_id text NOT NULL DEFAULT nullif(current_setting('app.tenant_id', true), ''),
            body text NOT NULL);
        ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
        ALTER TABLE notes FORCE ROW LEVEL SECURITY;
        CREATE POLICY tenant_isolation ON notes
            USING (tenant_id = nullif(current_setting('app.tenant_id', true), ''))
            WITH CHECK (tenant_id = nullif(current_setting('app.tenant_id', true), ''));
        GRANT SELECT, INSERT ON notes TO tollgate_app;
        GRANT USAGE ON SEQUENCE notes_id_seq TO tollgate_app;";
    let db = TestDb::create("tenant_text_ids", schema).await;
    let app = app_with(
        pool(&db, 2).await,
        FromHeader::new(http::HeaderName::from_static("x-tenant-id")).allow_text_ids(),
    );
    for (tenant, body) in [("acme-corp", "a1"), ("4711", "n1"), ("acme-corp", "a2")] {
        let (status, _) = call(&app, req("POST", "/notes", tenant, body)).await;
        assert_eq!(status, StatusCode::CREATED, "{tenant}");
    }
    assert_eq!(
        call(&app, req("GET", "/notes", "acme-corp", "")).await,
        (StatusCode::OK, r#"["a1","a2"]"#.to_owned())
    );
    assert_eq!(
        call(&app, req("GET", "/notes", "4711", "")).await,
        (StatusCode::OK, r#"["n1"]"#.to_owned())
    );
    // Quotes, spaces: refused before any query.
    let (status, body) = call(&app, req("GET", "/notes", "acme', 'x", "")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    db.drop_now().await;
}

/// The layer counts each transaction by how it ended and times each
/// `BEGIN`, with handles registered once per pool (a recorder in place
/// before the first request sees them all).
#[cfg(feature = "metrics")]
#[tokio::test]
async fn transactions_are_counted_by_outcome() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let _local = metrics::set_default_local_recorder(&recorder);
    let db = TestDb::create("tenant_outcomes", SCHEMA).await;
    let pool = pool(&db, 2).await;
    let app = app(pool.clone());

    assert_eq!(call(&app, req("POST", "/notes", A, "a1")).await.0, 201);
    assert_eq!(call(&app, req("GET", "/notes", A, "")).await.0, 200);
    assert_eq!(call(&app, req("POST", "/conflict", A, "a2")).await.0, 409);
    assert_eq!(call(&app, req("POST", "/duplicate", A, "")).await.0, 500);
    // A read that answers 500: rolled back, after the response.
    assert_eq!(call(&app, req("GET", "/write-on-get", A, "")).await.0, 500);
    // The plain function is timed too.
    drop(
        begin(&pool, A.parse().unwrap(), Access::ReadOnly)
            .await
            .unwrap(),
    );

    // Read-only transactions end after their response: closing the pool
    // waits for their connections to come back.
    pool.close().await;
    let text = handle.render();
    for line in [
        r#"tollgate_tenant_transactions_total{outcome="commit"} 2"#,
        r#"tollgate_tenant_transactions_total{outcome="rollback"} 2"#,
        r#"tollgate_tenant_transactions_total{outcome="commit_error"} 1"#,
        "tollgate_tenant_begin_duration_seconds_count 6",
    ] {
        assert!(text.contains(line), "no {line} in\n{text}");
    }
    db.drop_now().await;
}

/// A read is answered before its `COMMIT`, but its connection and its
/// tenant's share stay held until the transaction has ended: a tenant
/// reading in a loop never holds more than its cap, and another tenant is
/// served meanwhile.
#[tokio::test]
async fn a_read_holds_its_connection_and_share_until_its_commit() {
    use tollgate::tenant::TenantPool;
    let db = TestDb::create("tenant_read_commit", SCHEMA).await;
    let fair = TenantPool::new(pool(&db, 2).await).with_tenant_max(1);
    let app = Router::new()
        .route(
            "/notes",
            get(|mut tx: Tx| async move {
                let n: i64 = sqlx::query_scalar("SELECT count(*) FROM notes")
                    .fetch_one(tx.conn().await?)
                    .await?;
                Ok::<_, TenantError>(n.to_string())
            }),
        )
        .layer(TenantLayer::new(
            fair.clone(),
            FromHeader::new(http::HeaderName::from_static("x-tenant-id")),
        ));

    assert_eq!(call(&app, req("GET", "/notes", A, "")).await.0, 200);
    // Answered; the transaction ends in a task that has not run yet (this
    // runtime has one thread): A's one connection is still held.
    assert_eq!(fair.load(), 0.5);
    // B is served meanwhile, from the pool's other connection.
    assert_eq!(call(&app, req("GET", "/notes", B, "")).await.0, 200);
    // A's next read waits for A's first to end, within A's cap, and then
    // gets its turn.
    assert_eq!(call(&app, req("GET", "/notes", A, "")).await.0, 200);
    // Once the commits have run, nothing is held.
    for _ in 0..200 {
        if fair.load() == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(fair.load(), 0.0);
    fair.pool().close().await;
    db.drop_now().await;
}

/// Every wait for a connection is timed, and the two ways it can give up
/// are counted apart: at the tenant's share and at the pool.
#[tokio::test]
async fn pool_waits_are_timed_and_their_give_ups_counted() {
    use tollgate::tenant::TenantPool;
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let _local = metrics::set_default_local_recorder(&recorder);
    let db = TestDb::create("tenant_pool_metrics", SCHEMA).await;
    let raw = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_millis(50))
        // The waits are for the fair pool's permits: no connection is
        // opened (a connect could outlast the short timeout).
        .connect_lazy(&db.app_url())
        .unwrap();
    let fair = TenantPool::new(raw).with_tenant_max(1);
    let (a, b): (TenantId, TenantId) = (A.parse().unwrap(), B.parse().unwrap());
    let other: TenantId = "11111111-2222-4333-8444-555555555555".parse().unwrap();

    let held = [
        fair.acquire(a).await.unwrap(),
        fair.acquire(b).await.unwrap(),
    ];
    // A waiter is in the gauge while it waits, and leaves it when dropped.
    let mut waiting = Box::pin(fair.acquire(a));
    tokio::time::timeout(Duration::from_millis(5), &mut waiting)
        .await
        .unwrap_err();
    let text = handle.render();
    assert!(text.contains("tollgate_db_pool_waiters 1\n"), "{text}");
    drop(waiting);
    let text = handle.render();
    assert!(text.contains("tollgate_db_pool_waiters 0\n"), "{text}");

    let at_share = fair.acquire(a).await.unwrap_err();
    assert!(
        matches!(at_share, TenantError::TenantAtCapacity),
        "{at_share:?}"
    );
    let at_pool = fair.acquire(other).await.unwrap_err();
    assert!(
        matches!(at_pool, TenantError::Database(sqlx::Error::PoolTimedOut)),
        "{at_pool:?}"
    );
    drop(held);

    let text = handle.render();
    for line in [
        "tollgate_db_pool_acquire_duration_seconds_count 4",
        "tollgate_db_tenant_cap_rejections_total 1",
        "tollgate_db_pool_acquire_timeouts_total 1",
    ] {
        assert!(text.contains(line), "no {line} in\n{text}");
    }
    fair.pool().close().await;
    db.drop_now().await;
}
