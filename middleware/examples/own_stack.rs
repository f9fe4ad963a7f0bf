//! Your own axum service on Tollgate's layers, as a new user builds it from
//! the README: per-IP limits behind a trusted proxy; your authentication
//! putting claims in the request; per-tenant (by plan) and per-user limits
//! decided together; a per-tenant concurrency limit by plan; the tenant's
//! transaction on row-level security; metrics on `/metrics`; readiness with
//! your own check; the memory store, or Redis when `REDIS_URL` is set; and
//! a shutdown that drains first.
//!
//! ```sh
//! cargo run -p tollgate --all-features --example own_stack   # the local Postgres of scripts/services.sh
//! T=0b9e3d4c-7c0e-4a55-9d8e-3f0a1b2c3d4e
//! curl -s localhost:3002/notes -H "authorization: Bearer $T:ann:free"
//! curl -s localhost:3002/metrics | grep tollgate_ratelimit_decisions_total
//! ```
//!
//! `middleware/tests/own_stack.rs` drives this same code.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{Query, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use sqlx::PgPool;
use tollgate::client_ip::{SetClientIpLayer, TrustedProxies};
use tollgate::health::{Readiness, ReadinessBuilder};
use tollgate::metrics::{HttpMetricsLayer, MetricsExporter};
use tollgate::problem::Problem;
use tollgate::rate_limit::{
    ByClientIp, ByExtension, ConcurrencyPolicy, EitherStore, FailurePolicy, Key,
    KeyedConcurrencyLimitLayer, LocalFallback, MemoryStore, Policy, Quota, RateLimitLayer,
    RedisStore, RedisTarget, StoreError,
};
use tollgate::tenant::{
    FromClaims, TenantClaims, TenantError, TenantId, TenantLayer, TenantRejection, Tx,
};

/// A tenant's plan, from its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plan {
    /// 5 requests a minute per tenant, one at a time.
    Free,
    /// 50 a minute, four at a time.
    Pro,
}

impl Plan {
    fn quota(self) -> Quota {
        match self {
            Self::Free => Quota::per_minute(5),
            Self::Pro => Quota::per_minute(50),
        }
    }

    fn in_flight(self) -> u32 {
        match self {
            Self::Free => 1,
            Self::Pro => 4,
        }
    }
}

/// What your authentication puts in the request.
#[derive(Debug, Clone)]
pub(crate) struct Claims {
    /// The tenant.
    pub(crate) tenant: TenantId,
    /// The user.
    pub(crate) user: String,
    /// The tenant's plan.
    pub(crate) plan: Plan,
}

impl TenantClaims for Claims {
    fn tenant(&self) -> Result<TenantId, TenantRejection> {
        Ok(self.tenant)
    }
}

/// Demo authentication: `authorization: Bearer <tenant>:<user>:<plan>`.
/// Verify a signed token in real code.
async fn authenticate(mut req: Request, next: Next) -> Response {
    let claims = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok()?.strip_prefix("Bearer "))
        .and_then(|token| {
            let mut parts = token.splitn(3, ':');
            let tenant = parts.next()?.parse().ok()?;
            let user = parts.next()?.to_owned();
            let plan = match parts.next()? {
                "free" => Plan::Free,
                "pro" => Plan::Pro,
                _ => return None,
            };
            Some(Claims { tenant, user, plan })
        });
    match claims {
        Some(claims) => {
            req.extensions_mut().insert(claims);
            next.run(req).await
        }
        // `Problem` is an axum response.
        None => Problem::new(http::StatusCode::UNAUTHORIZED, "Unauthorized")
            .with_detail("send Authorization: Bearer <tenant>:<user>:<plan>")
            .into_response(),
    }
}

fn plan(req: &http::request::Parts) -> Plan {
    req.extensions
        .get::<Claims>()
        .map_or(Plan::Free, |c| c.plan)
}

async fn list(mut tx: Tx) -> Result<Json<Vec<String>>, TenantError> {
    // No WHERE clause: row-level security shows this tenant's rows only.
    let bodies = sqlx::query_scalar("SELECT body FROM notes ORDER BY id")
        .fetch_all(tx.conn().await?)
        .await?;
    Ok(Json(bodies))
}

#[derive(serde::Deserialize)]
struct Wait {
    ms: u64,
}

/// Holds its concurrency slot for `?ms=`.
async fn slow(Query(wait): Query<Wait>) -> &'static str {
    tokio::time::sleep(Duration::from_millis(wait.ms.min(5_000))).await;
    "done"
}

/// The store: Redis when `redis_url` is given, else in memory (bounded).
pub(crate) fn store(
    redis_url: Option<String>,
) -> Result<EitherStore<MemoryStore, RedisStore>, StoreError> {
    Ok(match redis_url {
        Some(url) => EitherStore::Right(RedisStore::builder(RedisTarget::Single(url)).build()?),
        None => EitherStore::Left(MemoryStore::new().with_max_keys(1_000_000)),
    })
}

/// Readiness with your own check (Postgres answers); add more before
/// `start()`.
pub(crate) fn readiness(pool: PgPool) -> ReadinessBuilder {
    Readiness::builder()
        .interval(Duration::from_millis(200))
        .check("postgres", move || {
            let pool = pool.clone();
            async move {
                sqlx::query("SELECT 1")
                    .execute(&pool)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        })
}

/// The service. `proxies`: whose `X-Forwarded-For` is believed.
pub(crate) fn app(
    pool: PgPool,
    store: EitherStore<MemoryStore, RedisStore>,
    readiness: &Readiness,
    exporter: &MetricsExporter,
    proxies: TrustedProxies,
) -> Router {
    let fallback = LocalFallback::new(1).with_max_keys(1_000_000);
    let per_ip = RateLimitLayer::new(store.clone())
        .with_policy(Policy::new(
            "ip",
            ByClientIp::new(),
            Quota::per_minute(1_000),
        ))
        .with_failure_policy(FailurePolicy::Local)
        .with_local_fallback(fallback.clone());
    // Per tenant by plan and per user, decided together: when one denies,
    // neither is charged.
    let limits = RateLimitLayer::new(store)
        .with_policy(Policy::per_request(
            "tenant",
            ByExtension::new(|c: &Claims| Key::from(c.tenant.to_string())),
            |req| plan(req).quota(),
        ))
        .with_policy(Policy::new(
            "user",
            ByExtension::new(|c: &Claims| Key::from(c.user.as_str())),
            Quota::per_minute(3),
        ))
        .with_failure_policy(FailurePolicy::Local)
        .with_local_fallback(fallback);
    let concurrency = KeyedConcurrencyLimitLayer::new().with_policy(
        ConcurrencyPolicy::new(
            "tenant-concurrency",
            ByExtension::new(|c: &Claims| Key::from(c.tenant.to_string())),
            1,
        )
        .with_max_fn(|req| plan(req).in_flight()),
    );
    // Outermost first: authentication → concurrency → tenant → limits.
    let api = Router::new()
        .route("/notes", get(list))
        .route("/slow", get(slow))
        .route_layer(limits)
        .route_layer(TenantLayer::new(pool, FromClaims::<Claims>::new()))
        .route_layer(concurrency)
        .route_layer(axum::middleware::from_fn(authenticate))
        .route_layer(per_ip);
    Router::new()
        .merge(api)
        .merge(readiness.router())
        // Inside the router (it labels by route), outside the limiters.
        .layer(HttpMetricsLayer::new())
        .merge(exporter.router())
        .layer(SetClientIpLayer::new(proxies))
}

/// Creates the example's table (owner role) if it is not there.
pub(crate) async fn schema(owner: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS notes (
             id bigserial PRIMARY KEY,
             tenant_id uuid NOT NULL DEFAULT nullif(current_setting('app.tenant_id', true), '')::uuid,
             body text NOT NULL);
         ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
         ALTER TABLE notes FORCE ROW LEVEL SECURITY;
         DROP POLICY IF EXISTS tenant_isolation ON notes;
         CREATE POLICY tenant_isolation ON notes
             USING (tenant_id = nullif(current_setting('app.tenant_id', true), '')::uuid)
             WITH CHECK (tenant_id = nullif(current_setting('app.tenant_id', true), '')::uuid);
         GRANT SELECT, INSERT ON notes TO tollgate_app;",
    )
    .execute(owner)
    .await?;
    Ok(())
}

#[allow(dead_code)] // the test includes this file and has its own main
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let db = |role: &str| format!("postgres://{role}:{role}@127.0.0.1:5432/tollgate");
    schema(&PgPool::connect(&db("tollgate_owner")).await?).await?;
    let pool = PgPool::connect(&db("tollgate_app")).await?;
    let exporter = MetricsExporter::install()?;
    let readiness = readiness(pool.clone()).start();
    let store = store(std::env::var("REDIS_URL").ok())?;
    let proxies: TrustedProxies = "127.0.0.1/32".parse()?;
    let app = app(pool, store, &readiness, &exporter, proxies);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3002").await?;
    println!("listening on http://{}", listener.local_addr()?);
    // Ctrl-C: /ready turns 503, the listener keeps accepting for 5 s so the
    // load balancer notices, then requests in flight finish.
    let signal = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(readiness.drain_after(signal, Duration::from_secs(5)))
    .await?;
    Ok(())
}
