//! Several replicas of the real binary: with the Redis store a quota holds
//! for the fleet; with the memory store each replica counts alone; and
//! Redis going away follows the failure policy.

mod common;

use std::time::Duration;

use common::{Server, client};
use tollgate_test_support::{OwnRedis, unique_prefix};

const QUOTA: usize = 20;

/// Sends `n` pings round-robin over `servers`; returns the status counts
/// as (200s, 429s, others).
async fn spread(servers: &[Server], n: usize) -> (usize, usize, usize) {
    let http = client();
    let (mut ok, mut limited, mut other) = (0, 0, 0);
    for i in 0..n {
        let server = &servers[i % servers.len()];
        match http
            .get(server.url("/api/v1/ping"))
            .send()
            .await
            .map(|r| r.status().as_u16())
        {
            Ok(200) => ok += 1,
            Ok(429) => limited += 1,
            _ => other += 1,
        }
    }
    (ok, limited, other)
}

fn replicas(env: &[(&str, &str)]) -> Vec<Server> {
    (0..3).map(|_| Server::start(env)).collect()
}

#[tokio::test]
async fn with_redis_the_quota_holds_across_three_replicas() {
    let prefix = unique_prefix("fleet");
    let servers = replicas(&[
        ("RATE_LIMIT_IP", "20/h"),
        ("RATE_LIMIT_STORE", "redis"),
        ("RATE_LIMIT_REDIS_PREFIX", &prefix),
    ]);
    let (ok, limited, other) = spread(&servers, 90).await;
    assert_eq!((ok, limited, other), (QUOTA, 90 - QUOTA, 0));
}

#[tokio::test]
async fn with_memory_each_replica_counts_alone() {
    let servers = replicas(&[("RATE_LIMIT_IP", "20/h"), ("RATE_LIMIT_STORE", "memory")]);
    let (ok, limited, other) = spread(&servers, 90).await;
    assert_eq!((ok, limited, other), (3 * QUOTA, 90 - 3 * QUOTA, 0));
}

/// Starts one replica on a Redis of its own with `mode`, spends part of
/// the quota, kills Redis, and returns what the next requests got.
async fn after_redis_dies(mode: &str) -> ((usize, usize, usize), OwnRedis, Server) {
    let redis = OwnRedis::start(None);
    let url = redis.url();
    let server = Server::start(&[
        ("RATE_LIMIT_IP", "10/h"),
        ("RATE_LIMIT_STORE", "redis"),
        ("REDIS_URL", &url),
        ("RATE_LIMIT_FAILURE_MODE", mode),
    ]);
    let servers = [server];
    assert_eq!(spread(&servers, 4).await, (4, 0, 0));
    let port = redis.port;
    drop(redis);
    let counts = spread(&servers, 15).await;
    let [server] = servers;
    (counts, OwnRedis::start(Some(port)), server)
}

#[tokio::test]
async fn redis_down_fail_open_lets_everything_through() {
    let (counts, _redis, _server) = after_redis_dies("open").await;
    assert_eq!(counts, (15, 0, 0));
}

#[tokio::test]
async fn redis_down_fail_local_limits_per_replica() {
    // The local store starts from zero: 10 more allowed, then 429.
    let (counts, _redis, _server) = after_redis_dies("local").await;
    assert_eq!(counts, (10, 5, 0));
}

#[tokio::test]
async fn redis_down_fail_closed_answers_503_then_recovers() {
    let (counts, redis, server) = after_redis_dies("closed").await;
    assert_eq!(counts, (0, 0, 15));
    let http = client();
    let res = http.get(server.url("/api/v1/ping")).send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    // Redis is back (empty): the store returns to it by itself.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = http
            .get(server.url("/api/v1/ping"))
            .send()
            .await
            .unwrap()
            .status();
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {status} 5 s after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(redis);
}

/// Three server processes on a three-master Redis Cluster, keys spread
/// over slots (the default sharding): each of 30 client addresses gets
/// exactly its quota fleet-wide, and the keys live on every master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_three_processes_admit_exactly_the_quota_on_every_master() {
    const QUOTA: usize = 3;
    let cluster = tollgate_test_support::OwnCluster::start(3);
    let nodes = cluster.urls().join(",");
    let prefix = unique_prefix("cluster-fleet");
    let env = [
        ("RATE_LIMIT_IP", "3/h"),
        ("RATE_LIMIT_STORE", "redis"),
        ("RATE_LIMIT_REDIS_CLUSTER", nodes.as_str()),
        ("RATE_LIMIT_REDIS_PREFIX", prefix.as_str()),
        ("RATE_LIMIT_FAILURE_MODE", "closed"),
        ("TRUSTED_PROXIES", "127.0.0.1/32"),
    ];
    let servers: Vec<Server> = (0..3).map(|_| Server::process(&env)).collect();
    let http = client();
    for client_ip in 0..30 {
        let ip = format!("198.51.100.{client_ip}");
        let mut ok = 0;
        for i in 0..QUOTA + 3 {
            let res = http
                .get(servers[i % 3].url("/api/v1/ping"))
                .header("x-forwarded-for", &ip)
                .send()
                .await
                .unwrap();
            match res.status().as_u16() {
                200 => ok += 1,
                429 => {}
                other => panic!("{ip}: status {other}"),
            }
        }
        assert_eq!(ok, QUOTA, "{ip}");
    }
    for node in &cluster.nodes {
        let keys: u64 = node.cli(&["dbsize"]).trim().parse().unwrap();
        assert!(keys > 0, "master {} holds no key", node.port);
    }
}
