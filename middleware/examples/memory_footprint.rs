//! Measures what a key costs in `MemoryStore`: resident memory before and
//! after one million distinct IPv4 keys, and after they go idle and are
//! purged.
//!
//! Run with `cargo run --release -p tollgate --example memory_footprint`
//! (Linux: reads `/proc/self/statm`).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use tollgate::rate_limit::{Check, Key, ManualClock, MemoryStore, PolicyName, Quota, Store};

const KEYS: u32 = 1_000_000;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    let clock = ManualClock::new();
    let store = MemoryStore::with_clock(clock.clone());
    let policy = PolicyName::new("ip");
    let quota = Quota::per_minute(100);
    let before = rss_bytes();
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    for i in 0..KEYS {
        let check = Check {
            policy,
            key: Key::ip(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))),
            quota,
            cost: 1,
            enforce: true,
        };
        let mut fut = std::pin::pin!(store.check(&[check]));
        let _ = std::future::Future::poll(fut.as_mut(), &mut cx);
    }
    let after = rss_bytes();
    let per_key = (after - before) as f64 / f64::from(KEYS);
    println!("keys held:         {}", store.len());
    println!("RSS before:        {:.1} MiB", before as f64 / 1048576.0);
    println!("RSS after 1M keys: {:.1} MiB", after as f64 / 1048576.0);
    println!("bytes per key:     {per_key:.0}");
    clock.advance(Duration::from_secs(61));
    let removed = store.purge();
    println!("purged idle keys:  {removed} (left {})", store.len());
    println!(
        "RSS after purge:   {:.1} MiB",
        rss_bytes() as f64 / 1048576.0
    );
}
