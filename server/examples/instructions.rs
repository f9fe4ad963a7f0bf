//! Requests through one axum app with one stack of layers
//! (`support/stacks.rs`), or through the whole server's app with its
//! defaults, in-process on a current-thread runtime, for counting
//! instructions per request under valgrind (`load-tests/instructions.sh`
//! runs N and 3N requests and takes the difference, so start-up cancels
//! out).
//!
//! `cargo run --release -p tollgate-server --example instructions -- STACK N`
//! with STACK one of `bare`, `noop`, `ratelimit`, `ratelimit-outside`, `governor`, `metrics`,
//! `prometheus`; `server`: `GET /api/v1/ping` through
//! `tollgate_server::app` as `Config::from_env` sets it up (the metrics
//! recorder installed, access lines formatted into the binary's sink when
//! `RUST_LOG` enables them), the client's address in `X-Forwarded-For`
//! from a trusted loopback peer as behind a load balancer; or `tenant`:
//! the same app's `GET /api/v1/items` for a tenant it seeds (token, plan,
//! concurrency, trust, shedding, limits, the RLS transaction against the
//! real database); or `plain`: the tenant route's reference, the same
//! query and response in a plain transaction on bare axum
//! (`support/plain.rs`, as the load harness's baseline serves it) as the
//! owner (`MIGRATION_DATABASE_URL`), for a tenant it seeds.

use std::convert::Infallible;
use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::Response;
use axum::routing::get;
use http::Request;
use tollgate_server::AppState;
use tower::{Service, ServiceExt};

#[path = "support/plain.rs"]
mod plain;
#[path = "support/stacks.rs"]
mod stacks;

fn main() {
    let mut args = std::env::args().skip(1);
    let stack = args.next().unwrap_or_else(|| "bare".to_owned());
    let n: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(1000);
    // The recorders and governor calibrate one clock, once, spinning for a
    // while (a varying number of instructions): before the measured part,
    // which `instructions.sh` limits to `main`'s future.
    let _ = quanta::Instant::now();
    let metrics = (stack == "server" || stack == "tenant").then(|| {
        tollgate::metrics::prometheus_builder()
            .install_recorder()
            .expect("the only recorder")
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        if stack == "plain" {
            let (tenant, _) = seed_tenant(&server_state(None)).await;
            let url = std::env::var("MIGRATION_DATABASE_URL").expect("the owner's URL");
            // Sized as the baseline's pool.
            let pool = // Tested as the server's pool is (only after a second idle):
            // sqlx's default pings before every acquire, a round trip per
            // request the tenant route does not make.
            tollgate_server::db::tested_when_idle()
                .max_connections(20)
                .connect(&url)
                .await
                .expect("the owner's pool");
            let app = Router::new()
                .route("/api/v1/items", get(plain::items))
                .with_state(Some(plain::Plain {
                    pool,
                    tenant,
                    commit_after_response: false,
                }));
            let peer = ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 4000)));
            drive(app, n, "/api/v1/items", peer, None, None).await;
        } else if let Some(metrics) = metrics {
            // As the load harness runs them: the ping route with the
            // default level (access lines), the tenant route at `warn`.
            let _sink = server_logging(if stack == "tenant" { "warn" } else { "info" });
            let state = server_state(Some(metrics));
            let peer = ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 4000)));
            if stack == "tenant" {
                let (_, token) = seed_tenant(&state).await;
                let app = tollgate_server::app(state);
                drive(
                    app,
                    n,
                    "/api/v1/items",
                    peer,
                    Some("192.0.2.1"),
                    Some(token),
                )
                .await;
            } else {
                let app = tollgate_server::app(state);
                drive(app, n, "/api/v1/ping", peer, Some("192.0.2.1"), None).await;
            }
        } else {
            let router = Router::new().route("/ping", get(stacks::pong));
            stacks::run(router, &stack, DrivePing { n }).await;
        }
    });
}

/// `n` requests for `/ping` from 192.0.2.1.
struct DrivePing {
    n: u64,
}

impl stacks::Run for DrivePing {
    type Output = std::pin::Pin<Box<dyn Future<Output = ()>>>;

    fn run<S: stacks::App>(self, app: S) -> Self::Output {
        let peer = ConnectInfo(SocketAddr::from(([192, 0, 2, 1], 4000)));
        Box::pin(drive(app, self.n, "/ping", peer, None, None))
    }
}

/// `n` requests for `path`, one after another, as from one keep-alive
/// connection from `peer`, with `forwarded_for` in `X-Forwarded-For` and
/// `token` as the bearer token.
async fn drive<S>(
    mut app: S,
    n: u64,
    path: &str,
    peer: ConnectInfo<SocketAddr>,
    forwarded_for: Option<&'static str>,
    token: Option<http::HeaderValue>,
) where
    S: Service<Request<Body>, Response = Response, Error = Infallible>,
{
    for _ in 0..n {
        let mut req = Request::get(path).body(Body::empty()).unwrap();
        if let Some(client) = forwarded_for {
            // A constant name, as hyper's parser hands the server one:
            // parsing a `&str` name here would be counted as the stack's.
            static X_FORWARDED_FOR: http::HeaderName =
                http::HeaderName::from_static("x-forwarded-for");
            req.headers_mut().insert(
                X_FORWARDED_FOR.clone(),
                http::HeaderValue::from_static(client),
            );
        }
        // As `into_make_service_with_connect_info` does per request.
        if let Some(token) = &token {
            req.headers_mut()
                .insert(http::header::AUTHORIZATION, token.clone());
        }
        req.extensions_mut().insert(peer);
        let res = app.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(res.status(), 200, "{:?}", res.into_body());
    }
}

/// The server's state with its defaults from the environment (its pools
/// connect lazily: `/api/v1/ping` never touches the database).
fn server_state(metrics: Option<metrics_exporter_prometheus::PrometheusHandle>) -> AppState {
    let config = tollgate_server::config::Config::from_env().expect("a valid configuration");
    AppState::new(config, metrics).expect("the state")
}

/// A new tenant with one user (trust level `staff`) and twenty items, as
/// the load harness seeds its own (the database migrated, as `scripts/services.sh` leaves it);
/// returns the tenant and the user's bearer token.
async fn seed_tenant(state: &AppState) -> (uuid::Uuid, http::HeaderValue) {
    use tollgate::tenant::{Access, TenantId, begin};
    let tenant = uuid::Uuid::new_v4();
    let mut tx = begin(&state.pool, TenantId::new(tenant), Access::ReadWrite)
        .await
        .expect("a tenant transaction (is the database migrated?)");
    sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, 'instructions')")
        .bind(tenant)
        .execute(&mut *tx)
        .await
        .expect("a tenant");
    let (user,): (uuid::Uuid,) = sqlx::query_as(
        "INSERT INTO users (tenant_id, email, password_hash, trust_level) \
         VALUES ($1, $2, 'unused', 'staff') RETURNING id",
    )
    .bind(tenant)
    .bind(format!("instructions-{tenant}@example.com"))
    .fetch_one(&mut *tx)
    .await
    .expect("a user");
    for n in 0..20 {
        sqlx::query("INSERT INTO items (name) VALUES ($1)")
            .bind(format!("item {n}"))
            .execute(&mut *tx)
            .await
            .expect("an item");
    }
    tx.commit().await.expect("committed");
    let token = state.tokens.issue(user, tenant, "staff");
    let token = http::HeaderValue::try_from(format!("Bearer {token}")).expect("a header value");
    (tenant, token)
}

/// As the binary sets up logging: `RUST_LOG` (else `default`) decides
/// whether access lines are written, into the access-log sink.
fn server_logging(default: &str) -> Option<tollgate_server::access_log::SinkGuard> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::sink)
        .init();
    tollgate_server::access_log::install(false)
}
