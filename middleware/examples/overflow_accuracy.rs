//! The false-denial rate of `MemoryStore`'s overflow sketch against its
//! size: `EXHAUSTED` keys spend their whole burst in the sketch (a spray of
//! over-limit clients), then 20 000 fresh keys send one request each. Every
//! fresh request is within its quota, so each denial is a false one, caused
//! by the fresh key sharing all four of its cells with exhausted keys.
//!
//! Run with `cargo run --release -p tollgate --example overflow_accuracy`.

use std::net::{IpAddr, Ipv4Addr};

use tollgate::rate_limit::{Check, Key, ManualClock, MemoryStore, PolicyName, Quota, Store};

const FRESH: u32 = 20_000;

fn check(n: u32, quota: Quota, cost: u32) -> Check {
    Check {
        policy: PolicyName::new("ip"),
        key: Key::ip(IpAddr::V4(Ipv4Addr::from(n))),
        quota,
        cost,
        enforce: true,
    }
}

fn main() {
    // A login-like quota: a key is kept for minutes.
    let quota = Quota::per_hour(10).with_burst(10);
    println!(
        "| sketch width (cells per row) | sketch memory | exhausted keys in it | false denials of fresh keys |"
    );
    println!("|---|---|---|---|");
    for width in [4_096usize, 16_384, 65_536, 262_144] {
        for exhausted in [10_000u32, 100_000, 1_000_000] {
            let store = MemoryStore::with_clock(ManualClock::new()).with_overflow_width(0, width);
            for n in 0..exhausted {
                let _ = store.check(&[check(n, quota, 10)]).into_inner();
            }
            let denied = (0..FRESH)
                .filter(|i| {
                    let d = store.check(&[check(u32::MAX - i, quota, 1)]).into_inner();
                    !d.expect("the memory store does not fail").allowed
                })
                .count();
            let (_, _, bytes) = store.overflow_stats().expect("a budget");
            println!(
                "| {width} | {} KiB | {exhausted} | {:.3} % ({denied} of {FRESH}) |",
                bytes / 1024,
                100.0 * denied as f64 / f64::from(FRESH)
            );
        }
    }
}
