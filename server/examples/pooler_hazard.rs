//! Why every query behind a transaction-mode pooler runs in a transaction
//! (README, "Behind a connection pooler"): eight clients through a
//! PgBouncer of their own with one server connection, each running
//! `SELECT $1::int8 + k` with its own `k` and no statement cache, first
//! outside a transaction, then inside one; it counts answers that are not
//! the client's own.
//!
//! Run with (Postgres and PgBouncer from `scripts/services.sh`):
//!
//! ```sh
//! cargo run -p tollgate-server --example pooler_hazard
//! ```

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tollgate_test_support::OwnPgBouncer;

const CLIENTS: i64 = 8;
const QUERIES: i64 = 300;

/// The texts, one per client (`&'static`: sqlx takes audited SQL only).
const SQL: [&str; CLIENTS as usize] = [
    "SELECT $1::int8 + 0",
    "SELECT $1::int8 + 1",
    "SELECT $1::int8 + 2",
    "SELECT $1::int8 + 3",
    "SELECT $1::int8 + 4",
    "SELECT $1::int8 + 5",
    "SELECT $1::int8 + 6",
    "SELECT $1::int8 + 7",
];

#[tokio::main]
async fn main() {
    let bouncer = OwnPgBouncer::start(1);
    let options: PgConnectOptions = bouncer.app_url("tollgate").parse().unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(CLIENTS as u32)
        .connect_with(options.statement_cache_capacity(0))
        .await
        .expect("connect through PgBouncer");
    for in_transaction in [false, true] {
        let mut clients = tokio::task::JoinSet::new();
        for k in 0..CLIENTS {
            let pool = pool.clone();
            clients.spawn(async move {
                let (mut wrong, mut failed) = (0, 0);
                for i in 0..QUERIES {
                    let query = sqlx::query_scalar::<_, i64>(SQL[k as usize]).bind(i);
                    let answer = if in_transaction {
                        match pool.begin().await {
                            Ok(mut tx) => {
                                let answer = query.fetch_one(&mut *tx).await;
                                let _ = tx.commit().await;
                                answer
                            }
                            Err(err) => Err(err),
                        }
                    } else {
                        query.fetch_one(&pool).await
                    };
                    match answer {
                        Ok(n) if n == i + k => {}
                        Ok(_) => wrong += 1,
                        Err(_) => failed += 1,
                    }
                }
                (wrong, failed)
            });
        }
        let (mut wrong, mut failed) = (0, 0);
        while let Some(counts) = clients.join_next().await {
            let (w, f) = counts.unwrap();
            wrong += w;
            failed += f;
        }
        let total = CLIENTS * QUERIES;
        let place = if in_transaction {
            "inside a transaction"
        } else {
            "outside a transaction"
        };
        println!("{place}: {wrong} of {total} answers were another client's, {failed} failed");
    }
}
