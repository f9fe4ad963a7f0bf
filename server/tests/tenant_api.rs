//! The authenticated API against the real binary and a real Postgres:
//! isolation across 64 tenants, tokens, trust levels, input validation, the
//! app role's limits, the start-up audit, and the OpenAPI document.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{AUTH_SECRET, Server, app_pool, client, login, seed_tenant};
use serde_json::{Value, json};
use tollgate_server::auth::{Claims, Tokens};

/// Limits high enough to stay out of the way.
const GENEROUS: &[(&str, &str)] = &[
    ("RATE_LIMIT_IP", "100000/min"),
    ("RATE_LIMIT_TENANT", "100000/min"),
    ("RATE_LIMIT_CLASS_READ", "100000/min"),
    ("RATE_LIMIT_CLASS_WRITE", "100000/min"),
    ("RATE_LIMIT_CLASS_AUTH", "100000/min"),
    ("DB_CONNECTION_TIMEOUT", "20000"),
];

fn env<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    GENEROUS.iter().chain(extra).copied().collect()
}

async fn get_json(http: &reqwest::Client, url: String, token: &str) -> (u16, Value) {
    let res = http.get(url).bearer_auth(token).send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn sixty_four_tenants(pool_size: &str) {
    let server = Server::start(&env(&[("DB_MAX_CONNECTIONS", pool_size)]));
    let pool = app_pool().await;
    let http = client();
    let mut tenants = Vec::new();
    for _ in 0..64 {
        let (tenant, emails) = seed_tenant(&pool, &[("user", "staff")], 3).await;
        tenants.push((tenant, login(&http, &server, &emails[0]).await));
    }
    let base = server.base.clone();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (tenant, token)) in tenants.iter().cloned().enumerate() {
        let (http, base) = (http.clone(), base.clone());
        // Another tenant's item, to probe for.
        let (_, other_token) = &tenants[(i + 1) % tenants.len()];
        let other_token = other_token.clone();
        tasks.spawn(async move {
            let mine = |v: &Value| v["name"].as_str().unwrap().starts_with(&tenant.to_string());
            let mut created = Vec::new();
            for round in 0..4 {
                let res = http
                    .post(format!("{base}/api/v1/items"))
                    .bearer_auth(&token)
                    .json(&json!({ "name": format!("{tenant}-new-{round}") }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 201);
                let item: Value = res.json().await.unwrap();
                created.push(item["id"].as_str().unwrap().to_owned());
                let (status, page) =
                    get_json(&http, format!("{base}/api/v1/items?limit=100"), &token).await;
                assert_eq!(status, 200);
                let items = page["items"].as_array().unwrap();
                assert_eq!(items.len(), 3 + round + 1, "tenant {tenant}: {page}");
                assert!(items.iter().all(mine), "tenant {tenant} saw {page}");
            }
            // Its own items by id; the neighbour cannot see, change or delete them.
            for id in &created {
                let url = format!("{base}/api/v1/items/{id}");
                let (status, item) = get_json(&http, url.clone(), &token).await;
                assert!(status == 200 && mine(&item));
                assert_eq!(get_json(&http, url.clone(), &other_token).await.0, 404);
                let put = http
                    .put(&url)
                    .bearer_auth(&other_token)
                    .json(&json!({ "name": "stolen" }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(put.status(), 404);
                let delete = http
                    .delete(&url)
                    .bearer_auth(&other_token)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(delete.status(), 404);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_tenants_pool_of_20_see_only_their_rows() {
    sixty_four_tenants("20").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_tenants_pool_of_1_see_only_their_rows() {
    sixty_four_tenants("1").await;
}

#[tokio::test]
async fn crud_round_trip_and_validation() {
    let server = Server::start(&env(&[]));
    let pool = app_pool().await;
    let http = client();
    let (_, emails) = seed_tenant(&pool, &[("crud", "basic")], 0).await;
    let token = login(&http, &server, &emails[0]).await;
    let items = server.url("/api/v1/items");

    let res = http
        .post(&items)
        .bearer_auth(&token)
        .json(&json!({ "name": " first ", "body": "hello" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let location = res.headers()["location"].to_str().unwrap().to_owned();
    let item: Value = res.json().await.unwrap();
    assert_eq!(item["name"], "first");
    let url = server.url(&location);
    let res = http
        .put(&url)
        .bearer_auth(&token)
        .json(&json!({ "name": "renamed" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        get_json(&http, url.clone(), &token).await.1["name"],
        "renamed"
    );
    // Pages of 2 over 5 items.
    for n in 0..4 {
        let res = http
            .post(&items)
            .bearer_auth(&token)
            .json(&json!({ "name": format!("n{n}") }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
    }
    let mut seen = Vec::new();
    let mut next = String::new();
    loop {
        let (status, page) = get_json(&http, format!("{items}?limit=2{next}"), &token).await;
        assert_eq!(status, 200);
        for i in page["items"].as_array().unwrap() {
            seen.push(i["name"].as_str().unwrap().to_owned());
        }
        match page["next"].as_str() {
            Some(cursor) => next = format!("&after={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, ["renamed", "n0", "n1", "n2", "n3"]);
    assert_eq!(
        http.delete(&url)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(get_json(&http, url.clone(), &token).await.0, 404);

    // Bad input: 4xx problem+json, nothing written.
    let long_name = "x".repeat(201);
    let cases: Vec<(reqwest::RequestBuilder, u16)> = vec![
        (http.post(&items).json(&json!({ "name": long_name })), 422),
        (http.post(&items).json(&json!({ "name": "   " })), 422),
        (http.post(&items).json(&json!({ "body": "no name" })), 422),
        (
            http.post(&items)
                .json(&json!({ "name": "x", "owner": "me" })),
            422,
        ),
        (
            http.post(&items)
                .header("content-type", "application/json")
                .body("{"),
            400,
        ),
        (http.post(&items).body("name=x"), 415),
        (
            http.post(&items)
                .json(&json!({ "name": "x", "body": "y".repeat(tollgate_server::BODY_LIMIT) })),
            413,
        ),
        // Under the limit but over the document's 10 000 characters: 422.
        (
            http.post(&items)
                .json(&json!({ "name": "x", "body": "y".repeat(70 * 1024) })),
            422,
        ),
        (http.get(format!("{items}?limit=0")), 422),
        (http.get(format!("{items}?limit=ten")), 400),
        (http.get(server.url("/api/v1/items/not-a-uuid")), 400),
    ];
    for (req, expected) in cases {
        let res = req.bearer_auth(&token).send().await.unwrap();
        assert_eq!(res.status(), expected);
        assert_eq!(res.headers()["content-type"], "application/problem+json");
    }
    // A NUL character cannot be stored in Postgres text: 422 naming the
    // field, never a 500 (also on login, before signing in).
    let nul_cases = [
        (
            http.post(&items).json(&json!({ "name": "a\u{0}b" })),
            "name",
        ),
        (
            http.post(&items)
                .json(&json!({ "name": "x", "body": "a\u{0}b" })),
            "body",
        ),
        (http.put(&url).json(&json!({ "name": "a\u{0}b" })), "name"),
    ];
    for (req, field) in nul_cases {
        let res = req.bearer_auth(&token).send().await.unwrap();
        assert_eq!(res.status(), 422);
        let problem: Value = res.json().await.unwrap();
        assert!(
            problem["detail"].as_str().unwrap().contains(field),
            "{problem}"
        );
    }
    let res = http
        .post(server.url("/auth/login"))
        .json(&json!({ "email": "a\u{0}@example.com", "password": "x" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 422);
    let problem: Value = res.json().await.unwrap();
    assert!(
        problem["detail"].as_str().unwrap().contains("email"),
        "{problem}"
    );
    let (_, page) = get_json(&http, format!("{items}?limit=100"), &token).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn forged_expired_and_foreign_tokens() {
    let server = Server::start(&env(&[]));
    let pool = app_pool().await;
    let http = client();
    let (tenant_a, a) = seed_tenant(&pool, &[("a", "basic")], 2).await;
    let (tenant_b, _) = seed_tenant(&pool, &[("b", "basic")], 2).await;
    let token_a = login(&http, &server, &a[0]).await;
    let items = server.url("/api/v1/items");

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // A real user of tenant A, so that nothing but the token's own
    // validity can refuse these (an unknown user is refused too).
    let user_a = common::user_id(&pool, tenant_a, &a[0]).await;
    let claims_from = |_tenant: uuid::Uuid, exp: u64, iss: &str, aud: &str| Claims {
        sub: user_a,
        tenant: tenant_a,
        trust: "staff".into(),
        iat: now,
        exp,
        iss: iss.into(),
        aud: aud.into(),
    };
    let claims = |tenant, exp| claims_from(tenant, exp, "tollgate", "tollgate-api");
    let ttl = Duration::from_secs(60);
    let ours = Tokens::new(AUTH_SECRET.as_bytes(), ttl, "tollgate", "tollgate-api");
    let forged = Tokens::new(
        b"not-the-secret-0123456789abcdef!",
        ttl,
        "tollgate",
        "tollgate-api",
    );
    let unsigned = {
        // alg "none": header.payload. with an empty signature.
        let good = ours.sign(&claims(tenant_b, now + 60));
        let mut parts = good.split('.');
        let _header = parts.next();
        format!(
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
            parts.next().unwrap()
        )
    };
    for bad in [
        forged.sign(&claims(tenant_b, now + 60)),
        ours.sign(&claims(tenant_b, now - 120)),
        // Our key, but another issuer or audience (say, a token of another
        // service sharing the secret).
        ours.sign(&claims_from(
            tenant_b,
            now + 60,
            "someone-else",
            "tollgate-api",
        )),
        ours.sign(&claims_from(tenant_b, now + 60, "tollgate", "another-api")),
        unsigned,
        "garbage".to_owned(),
    ] {
        let res = http.get(&items).bearer_auth(&bad).send().await.unwrap();
        assert_eq!(res.status(), 401, "{bad}");
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        assert_eq!(res.headers()["www-authenticate"], "Bearer");
    }
    assert_eq!(http.get(&items).send().await.unwrap().status(), 401);
    // The control: the same claims, signed right, are accepted.
    let good = ours.sign(&claims(tenant_b, now + 60));
    let res = http.get(&items).bearer_auth(&good).send().await.unwrap();
    assert_eq!(res.status(), 200);

    // A header naming tenant B changes nothing: the token says A.
    let res = http
        .get(format!("{items}?limit=100"))
        .bearer_auth(&token_a)
        .header("x-tenant-id", tenant_b.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let page: Value = res.json().await.unwrap();
    let mut names: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    // Seeded in one transaction: same created_at, so order by id.
    names.sort_unstable();
    assert_eq!(names, [format!("{tenant_a}-0"), format!("{tenant_a}-1")]);

    // A token (signed with our key) whose tenant is not a UUID does not
    // verify: 401.
    let good = ours.sign(&claims(tenant_a, now + 60));
    let odd = resign_with_tenant(&good, "acme");
    let res = http.get(&items).bearer_auth(odd).send().await.unwrap();
    assert_eq!(res.status(), 401);

    // Login: unknown user and wrong password look the same.
    let attempt = |email: String, password: &'static str| {
        http.post(server.url("/auth/login"))
            .json(&json!({ "email": email, "password": password }))
            .send()
    };
    let wrong = attempt(a[0].clone(), "wrong password").await.unwrap();
    let unknown = attempt("nobody@example.com".into(), "wrong password")
        .await
        .unwrap();
    assert_eq!(
        (wrong.status().as_u16(), unknown.status().as_u16()),
        (401, 401)
    );
    assert_eq!(wrong.text().await.unwrap(), unknown.text().await.unwrap());
}

#[tokio::test]
async fn trust_levels_choose_the_quota_and_a_raise_applies_at_once() {
    let server = Server::start(&[
        ("RATE_LIMIT_TRUST_NEW", "3/min"),
        ("RATE_LIMIT_TRUST_BASIC", "6/min"),
        ("RATE_LIMIT_CLASS_READ", "1000/min"),
        ("RATE_LIMIT_TENANT", "1000/min"),
    ]);
    let pool = app_pool().await;
    let http = client();
    let (_, emails) = seed_tenant(&pool, &[("newbie", "new"), ("regular", "basic")], 0).await;
    let (newbie, regular) = (&emails[0], &emails[1]);
    let items = server.url("/api/v1/items");
    let allowed = |token: String| {
        let (http, items) = (http.clone(), items.clone());
        async move {
            let mut n = 0;
            loop {
                let res = http.get(&items).bearer_auth(&token).send().await.unwrap();
                if res.status() == 429 {
                    let body: Value = res.json().await.unwrap();
                    assert_eq!(body["violated-policies"], json!(["trust"]), "{body}");
                    return n;
                }
                assert_eq!(res.status(), 200);
                n += 1;
                assert!(n < 50, "never limited");
            }
        }
    };
    let new_token = login(&http, &server, newbie).await;
    assert_eq!(allowed(new_token.clone()).await, 3);
    assert_eq!(allowed(login(&http, &server, regular).await).await, 6);

    let out = Command::new(env!("CARGO_BIN_EXE_tollgate-server"))
        .args(["user", "set-trust", "--email", newbie, "--level", "basic"])
        .env("DATABASE_URL", tollgate_test_support::app_url("tollgate"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The level is read from Postgres, not the token: the same token gets
    // the raised quota once the change's notification has arrived.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let res = http
            .get(&items)
            .bearer_auth(&new_token)
            .send()
            .await
            .unwrap();
        if res.status() == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the raise never applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(allowed(login(&http, &server, newbie).await).await, 5);
}

#[tokio::test]
async fn login_is_limited_per_address() {
    let server = Server::start(&[("RATE_LIMIT_CLASS_AUTH", "3/min")]);
    let http = client();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let res = http
            .post(server.url("/auth/login"))
            .json(&json!({ "email": "nobody@example.com", "password": "x" }))
            .send()
            .await
            .unwrap();
        statuses.push(res.status().as_u16());
    }
    assert_eq!(statuses, [401, 401, 401, 429]);
}

#[tokio::test]
async fn the_app_role_cannot_get_around_row_level_security() {
    let _server = Server::start(&[]); // migrated
    let pool = app_pool().await;
    seed_tenant(&pool, &[], 2).await;
    let mut conn = pool.acquire().await.unwrap();
    let count = "SELECT count(*) FROM items";
    // No setting, and the '' a connection keeps after one: no rows.
    let n: i64 = sqlx::query_scalar(count)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(n, 0);
    sqlx::query("SELECT set_config('app.tenant_id', '', false)")
        .execute(&mut *conn)
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar(count)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(n, 0);
    // A value that is not a UUID fails closed, with an error.
    sqlx::query("SELECT set_config('app.tenant_id', 'everyone', false)")
        .execute(&mut *conn)
        .await
        .unwrap();
    assert!(sqlx::query(count).execute(&mut *conn).await.is_err());
    sqlx::query("RESET app.tenant_id")
        .execute(&mut *conn)
        .await
        .unwrap();
    for escape in [
        "SET ROLE tollgate_owner",
        "ALTER TABLE items DISABLE ROW LEVEL SECURITY",
        "ALTER TABLE items NO FORCE ROW LEVEL SECURITY",
        "DROP POLICY tenant_isolation ON items",
        "CREATE POLICY everyone ON items USING (true)",
        "ALTER ROLE tollgate_app BYPASSRLS",
        "SELECT * FROM users",
    ] {
        let result = sqlx::query(escape).execute(&mut *conn).await;
        // SELECT * FROM users succeeds but sees nothing; everything else fails.
        if escape.starts_with("SELECT") {
            assert_eq!(result.unwrap().rows_affected(), 0);
        } else {
            assert!(result.is_err(), "{escape} succeeded");
        }
    }
    // Turning row security off makes queries fail, not leak.
    sqlx::query("SET row_security = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    let err = sqlx::query(count).execute(&mut *conn).await.unwrap_err();
    assert!(err.to_string().contains("row-level security"), "{err}");
}

/// Postgres plans a prepared statement again on every execution for as
/// long as it keeps choosing custom plans. Under row-level security the
/// list's statements must still reach the generic plan, as a plain
/// statement does after five executions, or every request pays the
/// planner.
#[tokio::test]
async fn the_list_statements_are_not_planned_again_on_every_request() {
    use tollgate::tenant::{Access, TenantId, begin};
    use tollgate_server::routes::items::{LIST_AFTER, LIST_FIRST_PAGE};

    let _server = Server::start(&[]); // migrated
    let pool = app_pool().await;
    let (tenant, _) = seed_tenant(&pool, &[], 3).await;
    let mut tx = begin(&pool, TenantId::new(tenant), Access::ReadOnly)
        .await
        .unwrap();
    let cursor: uuid::Uuid = sqlx::query_scalar("SELECT id FROM items ORDER BY created_at, id")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    for (statement, after) in [(LIST_FIRST_PAGE, None), (LIST_AFTER, Some(cursor))] {
        for _ in 0..8 {
            let query = sqlx::query(statement).bind(21_i64);
            let query = match after {
                Some(after) => query.bind(after),
                None => query,
            };
            let rows = query.fetch_all(&mut *tx).await.unwrap();
            assert_eq!(rows.len(), if after.is_some() { 2 } else { 3 });
        }
        let (generic, custom): (i64, i64) = sqlx::query_as(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1",
        )
        .bind(statement)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        assert!(
            generic > 0,
            "planned on every execution ({custom} custom plans, no generic one): {statement}"
        );
    }
}

#[test]
fn a_role_that_could_bypass_row_level_security_stops_the_server() {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate-server"))
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("AUTH_SECRET", AUTH_SECRET)
        .env("DB_MIGRATE_ON_START", "false")
        // The owner: BYPASSRLS, and owns the tables.
        .env("DATABASE_URL", tollgate_test_support::owner_url("tollgate"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        log.contains("BYPASSRLS") && log.contains("tollgate_owner"),
        "{log}"
    );
}

#[tokio::test]
async fn openapi_covers_every_route_with_its_problems() {
    let server = Server::start(&[]);
    let doc: Value = client()
        .get(server.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (path, methods) in [
        ("/auth/login", &["post"][..]),
        ("/api/v1/ping", &["get"]),
        ("/api/v1/items", &["get", "post"]),
        ("/api/v1/items/{id}", &["get", "put", "delete"]),
        ("/api/v1/users/{id}/trust", &["put"]),
        ("/openapi.json", &["get"]),
    ] {
        for method in methods {
            let op = &paths[path][method];
            assert!(op.is_object(), "{method} {path} missing");
            let problem = &op["responses"]["429"]["content"]["application/problem+json"];
            assert!(problem.is_object(), "{method} {path}: no 429 problem");
            let responses = op["responses"].as_object().unwrap();
            if path.starts_with("/api/v1/items") || path.starts_with("/api/v1/users") {
                for status in ["400", "401", "403", "503"] {
                    let body = &responses[status]["content"]["application/problem+json"];
                    assert!(body.is_object(), "{method} {path}: no {status} problem");
                }
            }
            if *method == "post" || *method == "put" {
                for status in ["413", "415", "422"] {
                    assert!(
                        responses.contains_key(status),
                        "{method} {path}: no {status}"
                    );
                }
            }
        }
    }
    for path in ["/health", "/ready", "/metrics"] {
        assert!(paths[path]["get"].is_object(), "{path} missing");
    }
    assert!(doc["components"]["schemas"]["Problem"].is_object());
}

/// `token` with its tenant claim replaced by `tenant`, signed again with
/// the test secret (HS256).
fn resign_with_tenant(token: &str, tenant: &str) -> String {
    use jsonwebtoken::{EncodingKey, Header, decode_header};
    let payload = token.split('.').nth(1).unwrap();
    let mut claims: Value = serde_json::from_slice(&base64_url_decode(payload)).unwrap();
    claims["tenant"] = json!(tenant);
    let header = decode_header(token).unwrap();
    jsonwebtoken::encode(
        &Header::new(header.alg),
        &claims,
        &EncodingKey::from_secret(AUTH_SECRET.as_bytes()),
    )
    .unwrap()
}

fn base64_url_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|c| *c != b'=') {
        let v = ALPHABET.iter().position(|a| *a == c).unwrap() as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[tokio::test]
async fn a_level_changed_through_the_api_applies_on_this_replica_at_once() {
    // No broadcasts and a long cache TTL: only the replica's own
    // after-commit invalidation can make the change visible.
    let server = Server::start(&[
        ("TRUST_BROADCAST_ENABLED", "false"),
        ("TRUST_CACHE_TTL", "10min"),
        ("RATE_LIMIT_TRUST_NEW", "1/min"),
        ("RATE_LIMIT_TRUST_BASIC", "100/min"),
    ]);
    let pool = app_pool().await;
    let http = client();
    let (tenant, emails) = seed_tenant(&pool, &[("boss", "staff"), ("newbie", "new")], 0).await;
    let newbie_id = common::user_id(&pool, tenant, &emails[1]).await;
    let staff = login(&http, &server, &emails[0]).await;
    let newbie = login(&http, &server, &emails[1]).await;
    let items = server.url("/api/v1/items");
    let get = || http.get(&items).bearer_auth(&newbie).send();
    assert_eq!(get().await.unwrap().status(), 200);
    assert_eq!(
        get().await.unwrap().status(),
        429,
        "the cached level is new"
    );
    let res = http
        .put(server.url(&format!("/api/v1/users/{newbie_id}/trust")))
        .bearer_auth(&staff)
        .json(&json!({ "trust_level": "basic" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        get().await.unwrap().status(),
        200,
        "the change did not reach this replica's cache"
    );
}
