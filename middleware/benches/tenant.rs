//! What the tenant setting costs per transaction, against a real Postgres
//! on loopback: a plain transaction (`BEGIN`, one query, `COMMIT`), the
//! naive tenant transaction (`BEGIN`, then `set_config` as its own
//! statement), and `tollgate::tenant::begin` (both in one round trip, in a
//! spawned task).
//!
//! Run with `cargo bench -p tollgate --all-features --bench tenant`
//! (Postgres with the project's roles: `bash scripts/services.sh`; another
//! database with `DATABASE_URL`).

use criterion::{Criterion, criterion_group, criterion_main};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tollgate::tenant::{Access, TenantId, begin};

const TENANT: &str = "0b9e3d4c-7c0e-4a55-9d8e-3f0a1b2c3d4e";

async fn one_query(tx: &mut sqlx::PgConnection) {
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(tx).await.unwrap();
    assert_eq!(one, 1);
}

fn transactions(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        "postgres://tollgate_app:tollgate_app@127.0.0.1:5432/tollgate".to_owned()
    });
    // One connection: every iteration measures round trips, not the pool.
    let pool: PgPool = rt.block_on(async {
        PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .expect("Postgres on loopback: bash scripts/services.sh")
    });
    let tenant: TenantId = TENANT.parse().unwrap();
    let mut group = c.benchmark_group("tenant_transaction");
    group.bench_function("plain BEGIN; query; COMMIT", |b| {
        b.to_async(&rt).iter(|| async {
            let mut tx = pool.begin().await.unwrap();
            one_query(&mut tx).await;
            tx.commit().await.unwrap();
        });
    });
    group.bench_function("naive: BEGIN; set_config; query; COMMIT", |b| {
        b.to_async(&rt).iter(|| async {
            let mut tx = pool.begin().await.unwrap();
            sqlx::query("SELECT set_config('app.tenant_id', $1, true)")
                .bind(TENANT)
                .execute(&mut *tx)
                .await
                .unwrap();
            one_query(&mut tx).await;
            tx.commit().await.unwrap();
        });
    });
    group.bench_function("tollgate::tenant::begin; query; COMMIT", |b| {
        b.to_async(&rt).iter(|| async {
            let mut tx = begin(&pool, tenant, Access::ReadWrite).await.unwrap();
            one_query(&mut tx).await;
            tx.commit().await.unwrap();
        });
    });
    group.finish();
}

criterion_group!(benches, transactions);
criterion_main!(benches);
