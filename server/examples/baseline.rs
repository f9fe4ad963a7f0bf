//! Bare axum: the same routes and runtime as `tollgate-server`, no layers.
//! The load harness measures every configuration against it.
//!
//! - `GET /api/v1/ping`: the public route, no layers at all, answering as
//!   the server does (its `Pong`, serialized the same way);
//! - `GET /api/v1/items`: the tenant route's list query and response in a
//!   plain transaction (no token, no limits, no tenant setting: the tenant
//!   is a query parameter, run as the owner role that row-level security
//!   does not filter), on a pool sized like the server's. Set
//!   `DATABASE_URL` (the owner's URL) and `TENANT_ID`.
//!
//! `STACK` puts one layer alone on the app (`support/stacks.rs`): Tollgate's
//! rate limit or metrics layer, or a peer's (tower_governor,
//! axum-prometheus), so the harness compares them on the same bare app.
//! Those are served with the peer's address (`ConnectInfo`), bare without
//! it unless `CONNECT_INFO` is set.
//!
//! Run with `LISTEN_ADDR=127.0.0.1:8090 cargo run --release -p tollgate-server --example baseline`.

use axum::{Router, routing::get};

#[path = "support/plain.rs"]
mod plain;
#[path = "support/stacks.rs"]
mod stacks;

use plain::{Plain, items};

/// Serves the app with its stack; with the peer's address (the limiters'
/// key) unless bare, as the reference has always been served.
struct Serve {
    listener: tokio::net::TcpListener,
    connect_info: bool,
}

impl stacks::Run for Serve {
    type Output = std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>>>>;

    fn run<S: stacks::App>(self, app: S) -> Self::Output {
        use axum::ServiceExt as _;
        let listener = self.listener;
        if self.connect_info {
            let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
            Box::pin(async move { axum::serve(listener, app).await })
        } else {
            Box::pin(async move { axum::serve(listener, app.into_make_service()).await })
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::var("LISTEN_ADDR").unwrap_or_else(|_| "127.0.0.1:8090".to_owned());
    let plain = match (std::env::var("DATABASE_URL"), std::env::var("TENANT_ID")) {
        (Ok(url), Ok(tenant)) => Some(Plain {
            // Tested as the server's pool is (only after a second idle):
            // sqlx's default pings before every acquire, a round trip per
            // request the tenant route does not make. `SQLX_DEFAULT_POOL`
            // keeps the default, for the harness's row that shows it.
            pool: if std::env::var_os("SQLX_DEFAULT_POOL").is_some() {
                sqlx::postgres::PgPoolOptions::new()
            } else {
                tollgate_server::db::tested_when_idle()
            }
            .max_connections(20)
            .connect(&url)
            .await?,
            tenant: tenant.parse()?,
            commit_after_response: std::env::var_os("COMMIT_AFTER_RESPONSE").is_some(),
        }),
        _ => None,
    };
    let app = Router::new()
        .route("/api/v1/ping", get(stacks::pong))
        .route("/api/v1/items", get(items))
        .with_state(plain);
    let stack = std::env::var("STACK").unwrap_or_else(|_| "bare".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening addr={}", listener.local_addr()?);
    // `CONNECT_INFO=1` serves bare with it too (what the peer's address
    // alone costs, for the instruction count of a whole connection).
    let connect_info = stack != "bare" || std::env::var_os("CONNECT_INFO").is_some();
    stacks::run(
        app,
        &stack,
        Serve {
            listener,
            connect_info,
        },
    )
    .await?;
    Ok(())
}
