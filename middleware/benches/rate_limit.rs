//! ns per check of `MemoryStore` against governor's keyed limiter, for one
//! hot key and for 1 M distinct keys; and, with the `redis` feature, the
//! batched `RedisStore` against one script call per check.
//!
//! Run with `cargo bench -p tollgate --all-features --bench rate_limit`
//! (Redis on 127.0.0.1:6379 or `REDIS_URL`: `bash scripts/services.sh`).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate::rate_limit::{Check, Key, MemoryStore, PolicyName, Quota, Store};

const KEYS: u32 = 1_000_000;

fn ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

fn check(policy: PolicyName, key: IpAddr, quota: Quota) -> Check {
    Check {
        policy,
        key: Key::ip(key),
        quota,
        cost: 1,
        enforce: true,
    }
}

fn decide(store: &MemoryStore, checks: &[Check]) -> bool {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut fut = std::pin::pin!(store.check(checks));
    match std::future::Future::poll(fut.as_mut(), &mut cx) {
        std::task::Poll::Ready(Ok(d)) => d.allowed,
        _ => unreachable!("the memory store is always ready"),
    }
}

fn bench(c: &mut Criterion) {
    // Large enough that every check is allowed: both limiters do the full
    // read-compute-write.
    let quota = Quota::per_second(1_000_000_000);
    let gov_quota = governor::Quota::per_second(NonZeroU32::new(1_000_000_000).unwrap());
    let policy = PolicyName::new("ip");

    let mut group = c.benchmark_group("hot_key");
    let store = MemoryStore::new();
    let hot = check(policy, ip(1), quota);
    group.bench_function("tollgate_memory", |b| {
        b.iter(|| decide(&store, black_box(std::slice::from_ref(&hot))))
    });
    let manual = MemoryStore::with_clock(tollgate::rate_limit::ManualClock::new());
    group.bench_function("tollgate_memory_manual_clock", |b| {
        b.iter(|| {
            let waker = std::task::Waker::noop();
            let mut cx = std::task::Context::from_waker(waker);
            let mut fut = std::pin::pin!(manual.check(black_box(std::slice::from_ref(&hot))));
            matches!(std::future::Future::poll(fut.as_mut(), &mut cx), std::task::Poll::Ready(Ok(d)) if d.allowed)
        })
    });
    let gov = governor::DefaultKeyedRateLimiter::<IpAddr>::keyed(gov_quota);
    group.bench_function("governor_keyed", |b| {
        b.iter(|| gov.check_key(black_box(&ip(1))).is_ok())
    });
    // With a budget (the server's default), never reached here: what the
    // bound costs a key that has its entry.
    let bounded = MemoryStore::new().with_max_keys(1_000_000);
    group.bench_function("tollgate_memory_bounded", |b| {
        b.iter(|| decide(&bounded, black_box(std::slice::from_ref(&hot))))
    });
    let tenant = check(PolicyName::new("tenant"), ip(2), quota);
    let pair = [hot.clone(), tenant];
    group.bench_function("tollgate_memory_two_policies", |b| {
        b.iter(|| decide(&store, black_box(&pair)))
    });
    group.finish();

    let mut group = c.benchmark_group("distinct_keys_1m");
    // Each store is dropped before the next is measured, so no run pays
    // for another's million entries in memory. Both build the key per
    // request, as a server does. With a budget that holds every key (the
    // server's default) and with one a tenth their number (most keys then
    // decided in the overflow sketch).
    for (name, store) in [
        ("tollgate_memory", MemoryStore::new()),
        (
            "tollgate_memory_bounded",
            MemoryStore::new().with_max_keys(KEYS as usize),
        ),
        (
            "tollgate_memory_overflowing",
            MemoryStore::new().with_max_keys(KEYS as usize / 10),
        ),
    ] {
        let mut i = 0u32;
        group.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % KEYS;
                decide(&store, &[check(policy, ip(i), quota)])
            })
        });
        drop(store);
    }
    let gov = governor::DefaultKeyedRateLimiter::<IpAddr>::keyed(gov_quota);
    let mut i = 0u32;
    group.bench_function("governor_keyed", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            gov.check_key(&ip(i)).is_ok()
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(std::time::Duration::from_secs(4));
    targets = bench, bench_redis
}
criterion_main!(benches);

/// 64 concurrent checks of distinct keys against the Redis of
/// `scripts/services.sh`: the batched store against one script call per
/// check (the naive way), per check.
#[cfg(feature = "redis")]
fn bench_redis(c: &mut Criterion) {
    use tollgate::rate_limit::{RedisStore, RedisTarget};

    const CONCURRENT: u32 = 64;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let quota = Quota::per_second(1_000_000_000);
    let policy = PolicyName::new("ip");
    let mut group = c.benchmark_group("redis_64_concurrent");
    group.throughput(criterion::Throughput::Elements(u64::from(CONCURRENT)));
    for (name, naive) in [("batched", false), ("naive_one_call_per_check", true)] {
        let store = runtime.block_on(async {
            let mut builder = RedisStore::builder(RedisTarget::Single(url.clone()))
                .prefix(format!("bench-{}-{name}", std::process::id()));
            if naive {
                builder = builder
                    .max_batch(1)
                    .max_in_flight(100_000)
                    .local_cache(false);
            }
            builder.build().unwrap()
        });
        let mut round = 0u32;
        group.bench_function(name, |b| {
            b.iter(|| {
                round = round.wrapping_add(1);
                runtime.block_on(async {
                    let checks: Vec<_> = (0..CONCURRENT)
                        .map(|i| {
                            let store = store.clone();
                            let key = ip(round.wrapping_mul(CONCURRENT).wrapping_add(i) % KEYS);
                            tokio::spawn(
                                async move { store.check(&[check(policy, key, quota)]).await },
                            )
                        })
                        .collect();
                    for c in checks {
                        assert!(c.await.unwrap().unwrap().allowed);
                    }
                })
            })
        });
    }
    group.finish();
}

#[cfg(not(feature = "redis"))]
fn bench_redis(_: &mut Criterion) {}
