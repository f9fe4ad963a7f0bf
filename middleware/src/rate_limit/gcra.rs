//! The generic cell rate algorithm, as pure arithmetic on nanoseconds, so
//! every store decides exactly alike (the Redis store runs the same steps
//! in Lua).
//!
//! A key's whole state is its theoretical arrival time `tat`. With `t` the
//! replenish interval and `tau = t * (burst - 1)` the tolerance, a request of
//! cost `n` at `now` is allowed when `max(tat, now) + n*t <= now + tau + t`,
//! and then `tat` becomes that left-hand side. These are the `governor`
//! crate's semantics; `tat <= now` is the same as no state at all, which is
//! why idle keys can be evicted without changing any decision.

// Every store uses this; with no store compiled in, nothing does.
#![cfg_attr(not(any(feature = "memory", feature = "redis")), allow(dead_code))]

use std::time::Duration;

/// GCRA parameters of one quota, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Gcra {
    /// Replenish interval: the cost of one unit.
    t: u64,
    /// Capacity: `t * burst`, i.e. `tau + t`.
    capacity: u64,
}

/// The outcome of evaluating one request against one key's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub(crate) allowed: bool,
    /// The state to store if the request is charged (equal to the old state
    /// when denied).
    pub(crate) new_tat: u64,
    /// Cost-1 requests still allowed after this one.
    pub(crate) remaining: u64,
    /// Until the key is back to a full burst.
    pub(crate) reset_after: u64,
    /// Until this request would be allowed (0 when allowed).
    pub(crate) retry_after: u64,
}

impl Gcra {
    pub(crate) fn new(interval: Duration, burst: u32) -> Self {
        // Same floor as governor: no interval below one nanosecond.
        let t = super::clock::nanos(interval).max(1);
        Self {
            t,
            capacity: t.saturating_mul(u64::from(burst)),
        }
    }

    /// Evaluates a request of `cost` units at `now` against `tat` (`None`:
    /// a key never seen or evicted).
    pub(crate) fn evaluate(self, tat: Option<u64>, now: u64, cost: u32) -> Outcome {
        let base = tat.map_or(now, |tat| tat.max(now));
        let charge = self.charge(cost);
        let new_tat = base.saturating_add(charge);
        let limit = now.saturating_add(self.capacity);
        if new_tat <= limit {
            Outcome {
                allowed: true,
                new_tat,
                remaining: (limit - new_tat) / self.t,
                reset_after: new_tat - now,
                retry_after: 0,
            }
        } else {
            Outcome {
                allowed: false,
                new_tat: base,
                remaining: limit.saturating_sub(base) / self.t,
                reset_after: base - now,
                retry_after: if charge > self.capacity {
                    // A cost above the burst can never pass; the whole
                    // window is the least misleading wait to report.
                    self.capacity
                } else {
                    new_tat - limit
                },
            }
        }
    }

    /// The replenish interval, in nanoseconds.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn interval(self) -> u64 {
        self.t
    }

    /// `interval * burst`, in nanoseconds.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn capacity(self) -> u64 {
        self.capacity
    }

    /// The charge of a request of `cost`, to undo it.
    pub(crate) fn charge(self, cost: u32) -> u64 {
        self.t.saturating_mul(u64::from(cost))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn step(g: Gcra, tat: &mut Option<u64>, now: u64, cost: u32) -> Outcome {
        let out = g.evaluate(*tat, now, cost);
        if out.allowed {
            *tat = Some(out.new_tat);
        }
        out
    }

    #[test]
    fn burst_then_refill() {
        // 3 per second, burst 3: t = 333.33 ms.
        let g = Gcra::new(Duration::from_secs(1) / 3, 3);
        let t = 333_333_333;
        let mut tat = None;
        for remaining in [2, 1, 0] {
            let out = step(g, &mut tat, 0, 1);
            assert!(out.allowed);
            assert_eq!(out.remaining, remaining);
        }
        let out = step(g, &mut tat, 0, 1);
        assert!(!out.allowed);
        assert_eq!(out.retry_after, t);
        assert_eq!(out.reset_after, 3 * t);
        // One interval later exactly one more is allowed.
        assert!(step(g, &mut tat, t, 1).allowed);
        assert!(!step(g, &mut tat, t, 1).allowed);
        // After a full window the key is fresh again.
        let out = step(g, &mut tat, 10 * t, 1);
        assert_eq!((out.allowed, out.remaining), (true, 2));
    }

    #[test]
    fn cost_above_one() {
        // 10 per second, burst 5: t = 100 ms.
        let g = Gcra::new(Duration::from_millis(100), 5);
        let mut tat = None;
        let out = step(g, &mut tat, 0, 3);
        assert_eq!((out.allowed, out.remaining), (true, 2));
        // Cost 3 no longer fits: 2 units are left; needs one more unit (100 ms).
        let out = step(g, &mut tat, 0, 3);
        assert_eq!(
            (out.allowed, out.remaining, out.retry_after),
            (false, 2, 100 * MS)
        );
        // But cost 2 fits.
        assert!(step(g, &mut tat, 0, 2).allowed);
        // A cost above the burst never fits.
        let out = step(g, &mut Some(0), 10_000 * MS, 6);
        assert!(!out.allowed);
        assert_eq!(out.retry_after, 500 * MS);
    }

    #[test]
    fn zero_cost_reads_without_charging() {
        let g = Gcra::new(Duration::from_millis(100), 2);
        let out = g.evaluate(Some(150 * MS), 0, 0);
        assert!(out.allowed);
        assert_eq!(out.new_tat, 150 * MS);
        assert_eq!(out.remaining, 0);
    }
}
