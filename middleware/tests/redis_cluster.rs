//! `RedisStore` on a real three-master Redis Cluster of the test's own,
//! keys spread over slots (`Sharding::Slot`, the default).
#![cfg(feature = "redis")]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tokio::time::Instant;
use tollgate::rate_limit::{
    Check, Decisions, Key, ManualClock, MemoryStore, PolicyName, Quota, RedisStore, RedisTarget,
    Store,
};
use tollgate_test_support::{OwnCluster, unique_prefix as prefix};

fn check(policy: &str, key: impl Into<Key>, quota: Quota, cost: u32) -> Check {
    Check {
        policy: PolicyName::new(policy),
        key: key.into(),
        quota,
        cost,
        enforce: true,
    }
}

fn store(cluster: &OwnCluster, prefix: &str) -> RedisStore {
    RedisStore::builder(RedisTarget::Cluster(cluster.urls()))
        .prefix(prefix)
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap()
}

/// The name `RedisStore` gives a text key (`Sharding::Slot`).
fn key_name(prefix: &str, policy: &str, key: &str) -> String {
    format!("{prefix}:{{{}:{policy}:k:{key}}}", policy.len())
}

/// A key of `policy` that lives on master `node`.
fn key_on(cluster: &OwnCluster, prefix: &str, policy: &str, node: usize) -> String {
    (0..)
        .map(|i| format!("k{i}"))
        .find(|k| cluster.node_of(&key_name(prefix, policy, k)) == node)
        .unwrap()
}

/// Random sequences of requests under two policies, which often live on
/// different masters: decisions identical to the memory store's, refunds
/// included.
#[test]
fn same_decisions_as_the_memory_store_on_three_masters() {
    let cluster = OwnCluster::start(3);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refunds = std::cell::Cell::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 24,
        ..Config::default()
    });
    let strategy = (
        1u32..40,
        1u64..3_000,
        1u32..15,
        1u32..20,
        proptest::collection::vec(
            (0u8..6, 1u32..20, 0u64..300, any::<bool>(), any::<bool>()),
            1..60,
        ),
    );
    runner
        .run(
            &strategy,
            |(count, period_ms, burst, tenant_count, steps)| {
                runtime.block_on(async {
                    let quota =
                        Quota::new(count, Duration::from_millis(period_ms)).with_burst(burst);
                    let tenant_quota = Quota::per_second(tenant_count);
                    let clock = ManualClock::new();
                    let memory = MemoryStore::with_clock(clock.clone());
                    let redis = RedisStore::builder(RedisTarget::Cluster(cluster.urls()))
                        .prefix(prefix("cluster-prop"))
                        .clock(clock.clone())
                        .local_cache(false)
                        .timeout(Duration::from_secs(1))
                        .build()
                        .unwrap();
                    for (key, cost, step_ms, shadow_tenant, twice) in steps {
                        clock.advance(Duration::from_millis(step_ms));
                        let mut tenant = check("tenant", "t", tenant_quota, 1);
                        tenant.enforce = !shadow_tenant;
                        let ip = check("ip", key.to_string(), quota, cost);
                        // Sometimes one key twice: charged twice, and both
                        // charges refunded when another node denies.
                        let mut checks = vec![ip.clone(), tenant];
                        if twice {
                            checks.push(ip);
                        }
                        let expected: Decisions = memory.check(&checks).await.unwrap();
                        let got = redis.check(&checks).await.unwrap();
                        prop_assert_eq!(got, expected);
                    }
                    refunds.set(refunds.get() + redis.stats().refunds);
                    Ok(())
                })
            },
        )
        .unwrap();
    // The cross-node path ran: some denials gave back another node's charge.
    assert!(refunds.get() > 0, "no refund in any case");
}

/// 10 000 client addresses: every master decides its share of the script
/// calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_keys_spread_over_the_masters() {
    let cluster = OwnCluster::start(3);
    let store = store(&cluster, &prefix("spread"));
    let before: Vec<u64> = cluster.nodes.iter().map(|n| n.calls("evalsha")).collect();
    let quota = Quota::per_minute(10);
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in 0..100u32 {
        let store = store.clone();
        tasks.spawn(async move {
            for i in 0..100 {
                let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + chunk * 100 + i));
                let d = store.check(&[check("ip", ip, quota, 1)]).await.unwrap();
                assert!(d.allowed);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let calls: Vec<u64> = cluster
        .nodes
        .iter()
        .zip(&before)
        .map(|(n, before)| n.calls("evalsha") - before)
        .collect();
    let total: u64 = calls.iter().sum();
    // Plus the NOSCRIPT answers before the script was loaded: at most one
    // per batch in flight (2) per master.
    let sent = store.stats().script_calls;
    assert!(
        (sent..=sent + 6).contains(&total),
        "{total} calls, {sent} sent"
    );
    eprintln!("script calls per master: {calls:?} of {total}");
    for c in &calls {
        let share = *c as f64 / total as f64;
        assert!(
            (0.23..=0.43).contains(&share),
            "a master took {:.1} % of the calls: {calls:?}",
            share * 100.0
        );
    }
    // Batching still works per node: fewer calls than requests.
    assert!(total < 10_000, "{total} script calls for 10 000 requests");
}

/// A request whose policies live on two masters, one of which denies:
/// the other master's state is as if the request had never come.
#[tokio::test]
async fn a_denial_on_one_master_leaves_the_other_unchanged() {
    let cluster = OwnCluster::start(3);
    let prefix = prefix("refund");
    let store = store(&cluster, &prefix);
    let ip = key_on(&cluster, &prefix, "ip", 0);
    let tenant = key_on(&cluster, &prefix, "tenant", 1);
    let ip_name = key_name(&prefix, "ip", &ip);
    let both = [
        check("ip", ip.as_str(), Quota::per_minute(10), 1),
        check("tenant", tenant.as_str(), Quota::per_minute(1), 1),
    ];
    // The tenant's one unit is used, by a request without the ip key.
    assert!(store.check(&both[1..]).await.unwrap().allowed);
    let tenant_name = key_name(&prefix, "tenant", &tenant);
    assert_eq!(cluster.nodes[1].cli(&["exists", &tenant_name]).trim(), "1");
    let denied = store.check(&both).await.unwrap();
    assert!(!denied.allowed);
    assert!(denied.each[0].allowed && !denied.each[1].allowed);
    // Reported as it stands: the ip key has all 10 left.
    assert_eq!(denied.each[0].remaining, 10);
    // Read the state after: the ip key was charged on master 0 and given
    // back, so nothing of it is left.
    assert_eq!(cluster.nodes[0].cli(&["exists", &ip_name]).trim(), "0");
    assert_eq!(store.stats().refunds, 1);
    // And the ip key still has its whole burst.
    let alone = store.check(&both[..1]).await.unwrap();
    assert_eq!((alone.allowed, alone.each[0].remaining), (true, 9));
}

/// One master killed: keys on the others are still decided by Redis,
/// exactly; keys on the dead one are store errors (the layer's failure
/// policy decides them), soon without waiting (its breaker opens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_master_fails_only_its_keys() {
    let mut cluster = OwnCluster::start(3);
    let prefix = prefix("kill");
    let store = RedisStore::builder(RedisTarget::Cluster(cluster.urls()))
        .prefix(prefix.as_str())
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let quota = Quota::per_minute(3);
    let keys: Vec<String> = (0..3).map(|n| key_on(&cluster, &prefix, "ip", n)).collect();
    for key in &keys {
        assert!(
            store
                .check(&[check("ip", key.as_str(), quota, 1)])
                .await
                .unwrap()
                .allowed
        );
    }
    // Each key is where the test thinks it is.
    for (n, key) in keys.iter().enumerate() {
        let name = key_name(&prefix, "ip", key);
        assert_eq!(cluster.nodes[n].cli(&["exists", &name]).trim(), "1");
    }
    drop(cluster.nodes.remove(2));
    // The dead master's keys: errors, then the breaker answers at once.
    let dead = [check("ip", keys[2].as_str(), quota, 1)];
    for _ in 0..3 {
        let result = store.check(&dead).await;
        assert!(result.is_err(), "{result:?}");
    }
    assert!(!store.is_available());
    // At once: well under the store's 200 ms timeout.
    let started = Instant::now();
    assert!(store.check(&dead).await.is_err());
    assert!(started.elapsed() < Duration::from_millis(100));
    // The live masters' keys: exactly the quota, from Redis.
    for key in &keys[..2] {
        let c = [check("ip", key.as_str(), quota, 1)];
        let allowed = {
            let mut allowed = 0;
            for _ in 0..5 {
                if store.check(&c).await.unwrap().allowed {
                    allowed += 1;
                }
            }
            allowed
        };
        assert_eq!(allowed, 2, "key {key}: one of 3 was used before the kill");
    }
}

/// Readiness: with one master down the store still answers `ping` (the
/// other masters decide their keys), and `ping_nodes` names the dead one.
#[tokio::test]
async fn ping_fails_only_when_no_master_answers() {
    let mut cluster = OwnCluster::start(3);
    let store = RedisStore::builder(RedisTarget::Cluster(cluster.urls()))
        .prefix(prefix("ping").as_str())
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    store.ping().await.unwrap();
    let dead = format!("127.0.0.1:{}", cluster.nodes[1].port);
    drop(cluster.nodes.remove(1));
    store.ping().await.unwrap();
    let answers = store.ping_nodes().await.unwrap();
    assert_eq!(answers.len(), 3);
    for (node, answer) in &answers {
        assert_eq!(answer.is_err(), *node == dead, "{node}: {answer:?}");
    }
    cluster.nodes.clear();
    assert!(store.ping().await.is_err());
}

/// One master stalled (SIGSTOP: connections open, no answers), the case of
/// a shard holding every call sent to it: requests for the other masters'
/// keys wait at most one timeout while they share a batch with it, and
/// once its breaker opens they are answered as fast as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_master_delays_other_keys_by_at_most_the_timeout() {
    let cluster = OwnCluster::start(3);
    let prefix = prefix("stall");
    let timeout = Duration::from_millis(100);
    let store = RedisStore::builder(RedisTarget::Cluster(cluster.urls()))
        .prefix(prefix.as_str())
        .timeout(timeout)
        .build()
        .unwrap();
    let quota = Quota::per_minute(1000);
    let live = [check(
        "ip",
        key_on(&cluster, &prefix, "ip", 0).as_str(),
        quota,
        1,
    )];
    let stalled = [check(
        "ip",
        key_on(&cluster, &prefix, "ip", 2).as_str(),
        quota,
        1,
    )];
    assert!(store.check(&live).await.unwrap().allowed);
    assert!(store.check(&stalled).await.unwrap().allowed);
    cluster.nodes[2].signal("-STOP");
    // While the breaker is closed, live keys checked alongside the stalled
    // one wait for the batch, never more than the timeout (plus slack).
    for _ in 0..3 {
        let (s, l) = tokio::join!(store.check(&stalled), async {
            let started = Instant::now();
            let result = store.check(&live).await;
            (result, started.elapsed())
        });
        assert!(s.is_err());
        let (result, took) = l;
        assert!(result.unwrap().allowed);
        assert!(
            took < timeout + Duration::from_millis(100),
            "live key took {took:?}"
        );
    }
    // The third call's own timeout opens the breaker (the request's
    // deadline may fire just before it).
    let deadline = Instant::now() + Duration::from_secs(1);
    while store.is_available() {
        assert!(Instant::now() < deadline, "breaker still closed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Breaker open: the stalled key fails at once, live keys are prompt.
    for _ in 0..5 {
        let started = Instant::now();
        assert!(store.check(&stalled).await.is_err());
        assert!(store.check(&live).await.unwrap().allowed);
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "{:?}",
            started.elapsed()
        );
    }
    cluster.nodes[2].signal("-CONT");
}

/// A slot moved while requests run (`CLUSTER SETSLOT … IMPORTING/MIGRATING`,
/// `MIGRATE`, `SETSLOT … NODE`): a call charges all it was sent or nothing,
/// a stale slot map is read again and the request retried, decisions stay
/// the memory store's, no key is charged for a request answered with an
/// error, and no breaker opens: the nodes were healthy all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migrated_under_load_charges_nothing_twice_and_nothing_for_errors() {
    let cluster = OwnCluster::start(3);
    let prefix = prefix("migrate");
    let clock = ManualClock::new();
    let store = RedisStore::builder(RedisTarget::Cluster(cluster.urls()))
        .prefix(prefix.as_str())
        .clock(clock.clone())
        .local_cache(false)
        .timeout(Duration::from_secs(1))
        // One call at a time, so concurrent requests share script calls.
        .max_in_flight(1)
        .build()
        .unwrap();
    let memory = MemoryStore::with_clock(clock.clone());
    let (from, to, other) = (0, 1, 2);
    let moving = key_on(&cluster, &prefix, "ip", from);
    let steady = key_on(&cluster, &prefix, "tenant", other);
    let moving_name = key_name(&prefix, "ip", &moving);
    let slot = cluster.nodes[from].cli(&["cluster", "keyslot", &moving_name]);
    let slot = slot.trim();
    let id = |n: usize| cluster.nodes[n].cli(&["cluster", "myid"]).trim().to_owned();
    let quota = Quota::per_hour(100);
    let checks = [
        check("ip", moving.as_str(), quota, 1),
        check("tenant", steady.as_str(), quota, 1),
    ];
    let mut errors = 0;
    let step = |n: usize| {
        let (store, memory, checks) = (&store, &memory, &checks);
        async move {
            let mut errors = 0;
            for _ in 0..n {
                match store.check(checks).await {
                    Ok(got) => assert_eq!(got, memory.check(checks).await.unwrap()),
                    // Answered with an error: nothing charged, in Redis as
                    // in the model.
                    Err(_) => errors += 1,
                }
            }
            errors
        }
    };

    // Load on other keys of every master meanwhile: none of it may fail.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (store, stop, prefix) = (store.clone(), stop.clone(), prefix.clone());
        let keys: Vec<String> = (0..3)
            .map(|n| key_on(&cluster, &prefix, "load", n))
            .collect();
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for key in &keys {
                    match store
                        .check(&[check("load", key.as_str(), Quota::per_second(1_000_000), 1)])
                        .await
                    {
                        Ok(_) => ok += 1,
                        Err(_) => failed += 1,
                    }
                }
            }
            (ok, failed)
        })
    };

    errors += step(3).await;
    cluster.nodes[to].cli(&["cluster", "setslot", slot, "importing", &id(from)]);
    cluster.nodes[from].cli(&["cluster", "setslot", slot, "migrating", &id(to)]);
    // The key is still on its old master: served there.
    errors += step(2).await;
    let port = cluster.nodes[to].port.to_string();
    let migrated = cluster.nodes[from].cli(&[
        "migrate",
        "127.0.0.1",
        &port,
        "",
        "0",
        "5000",
        "keys",
        &moving_name,
    ]);
    assert!(migrated.contains("OK"), "MIGRATE: {migrated}");
    // Moved, but the slot is still the old master's: the request cannot be
    // decided there (the retry meets the same), so it is answered with an
    // error, and the other key's charge is given back. A request of another
    // key of that master, sent at the same time (often in the same script
    // call), is decided and charged exactly once.
    let neighbour = [check(
        "auth",
        key_on(&cluster, &prefix, "auth", from).as_str(),
        quota,
        1,
    )];
    let mut during = 0;
    for i in 0..4 {
        // Both orders within a call: the moved key's group first, then last.
        let (moved, beside) = if i % 2 == 0 {
            tokio::join!(store.check(&checks), store.check(&neighbour))
        } else {
            let (beside, moved) = tokio::join!(store.check(&neighbour), store.check(&checks));
            (moved, beside)
        };
        match moved {
            Ok(got) => assert_eq!(got, memory.check(&checks).await.unwrap()),
            Err(_) => during += 1,
        }
        assert_eq!(beside.unwrap(), memory.check(&neighbour).await.unwrap());
    }
    assert!(during > 0, "a request touching a migrated key was decided");
    errors += during;
    for node in &cluster.nodes {
        node.cli(&["cluster", "setslot", slot, "node", &id(to)]);
    }
    // The store's map is stale: MOVED, re-read, retried on the new master.
    let after = step(5).await;
    assert_eq!(after, 0, "requests failed after the slot had moved");
    eprintln!("{errors} requests answered with an error while the key's slot moved");

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(ok > 0);
    assert_eq!(failed, 0, "other keys failed during the migration");
    // Healthy nodes: no breaker opened, nothing short-circuited.
    assert_eq!(store.stats().short_circuited, 0, "{:?}", store.stats());
    assert!(store.ping().await.is_ok());
    // Every key holds exactly the charges of the requests decided.
    let d = store.check(&checks).await.unwrap();
    assert_eq!(d, memory.check(&checks).await.unwrap());
    let d = store.check(&neighbour).await.unwrap();
    assert_eq!(d, memory.check(&neighbour).await.unwrap());
}
