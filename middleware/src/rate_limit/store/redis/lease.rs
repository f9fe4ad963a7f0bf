//! Leases for hot keys: a replica that sees a key often reserves a few
//! units of its allowance in Redis, with a request it sends anyway, and
//! decides the next requests of that key itself until they are used or
//! the lease ends; then what is left goes back.

use std::hash::BuildHasher;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;

use crate::rate_limit::key::Key;

/// Leases for hot keys of some policies ([`RedisConfig::leases`](super::RedisConfig::leases)).
///
/// Off unless policies are named: an exact fleet-wide count is what the
/// Redis store promises by default. With leases the fleet still never
/// admits more than a quota (every leased unit is charged in Redis before
/// it is used), but units one replica holds unused cannot be used by
/// another until they go back, so the fleet may deny early — by at most
/// the units leased and unused, at most `burst / (2 × replicas)` per
/// replica and key, for at most [`duration`](Self::duration). Name the
/// policies whose keys are hot and whose bursts are large (a tenant at
/// thousands of requests per second), not small per-client quotas.
///
/// ```no_run
/// use tollgate::rate_limit::{LeaseConfig, RedisStore, RedisTarget};
///
/// # #[tokio::main] async fn main() {
/// let mut leases = LeaseConfig::default();
/// leases.policies = vec!["tenant".to_owned()];
/// leases.replicas = 3;
/// let store = RedisStore::builder(RedisTarget::Cluster(vec!["redis://10.0.0.5:6379".into()]))
///     .leases(leases)
///     .build()
///     .unwrap();
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseConfig {
    /// Policies whose hot keys may be leased; empty: none (the default).
    pub policies: Vec<String>,
    /// How long a lease lasts before its unused units go back (100 ms:
    /// long enough to decide hundreds of requests of a hot key locally,
    /// short enough that held units return before a client notices).
    pub duration: Duration,
    /// Requests for a key within one `duration` from which it is hot
    /// (8: about 80 requests per second with the default duration). Colder
    /// keys keep the exact path.
    pub hot_after: u32,
    /// Replicas sharing the keys. A lease takes at most
    /// `burst / (2 × replicas)` units, so all replicas' leases together
    /// hold at most half a burst.
    pub replicas: u32,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            policies: Vec::new(),
            duration: Duration::from_millis(100),
            hot_after: 8,
            replicas: 1,
        }
    }
}

/// Slots of the hot-key detector: its memory is fixed, whatever the number
/// of keys.
const HEAT_SLOTS: usize = 4096;

/// Leases held at once at most; hot keys beyond them use the exact path.
pub(super) const MAX_LEASES: usize = 4096;

/// How often one key was seen lately, in a fixed table: keys sharing a
/// slot push each other out, so a key must stay frequent to stay hot.
#[derive(Default, Clone, Copy)]
struct Heat {
    hash: u64,
    /// Start of the current window (local ns).
    window: u64,
    count: u32,
    /// Count of the window before.
    last: u32,
}

/// A key's lease on this replica.
pub(super) struct Lease {
    /// Units left to hand out.
    pub(super) units: u64,
    /// Local time (ns) the lease ends.
    pub(super) ends: u64,
    /// Local time (ns) the key's bucket is full again, as of the grant.
    pub(super) reset_at: u64,
    /// A lease request is on its way to Redis (since this local time).
    pub(super) pending_since: Option<u64>,
    /// To give unused units back: the key's name, ns per unit, and the
    /// state in Redis the grant left.
    pub(super) name: String,
    pub(super) t: u64,
    pub(super) left: (u64, u64),
    /// The capacity (ns) of the quota the units were granted under: with
    /// `t`, the quota. A request under another quota of the same key (a
    /// quota chosen per request) is not decided from this lease: a unit
    /// of a larger quota may be worth less than one of a smaller.
    pub(super) capacity: u64,
}

/// Unused units to give back to Redis.
pub(super) struct Return {
    pub(super) name: String,
    pub(super) charge: u64,
    pub(super) left: (u64, u64),
    pub(super) units: u64,
}

/// A replica's leases and the detector of its hot keys.
pub(super) struct Leases {
    pub(super) config: LeaseConfig,
    /// Interned ids of the leased policies.
    policies: Vec<u32>,
    heat: Box<[Mutex<Heat>]>,
    hasher: foldhash::fast::FixedState,
    pub(super) held: DashMap<(u32, Key), Lease, foldhash::fast::RandomState>,
    /// Leases replaced or ended with units left, waiting to go back.
    pub(super) returns: Mutex<Vec<Return>>,
    /// Units leased and not yet used or returned, over all keys.
    pub(super) outstanding: AtomicU64,
}

impl Leases {
    pub(super) fn new(config: LeaseConfig) -> Option<Self> {
        if config.policies.is_empty() {
            return None;
        }
        let policies = config
            .policies
            .iter()
            .map(|p| crate::rate_limit::PolicyName::new(p).id())
            .collect();
        Some(Self {
            config,
            policies,
            heat: (0..HEAT_SLOTS).map(|_| Mutex::default()).collect(),
            hasher: foldhash::fast::FixedState::default(),
            held: DashMap::with_hasher(foldhash::fast::RandomState::default()),
            returns: Mutex::new(Vec::new()),
            outstanding: AtomicU64::new(0),
        })
    }

    pub(super) fn covers(&self, policy: u32) -> bool {
        self.policies.contains(&policy)
    }

    /// Counts a request for `key`; returns how many requests the key had in
    /// the last full window and the current one.
    pub(super) fn seen(&self, key: &(u32, Key), now: u64) -> (u32, u32) {
        let hash = self.hasher.hash_one(key);
        let window = nanos(self.config.duration).max(1);
        let mut heat = self.heat[(hash as usize) % HEAT_SLOTS]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if heat.hash != hash {
            *heat = Heat {
                hash,
                window: now,
                count: 0,
                last: 0,
            };
        }
        let elapsed = now.saturating_sub(heat.window);
        if elapsed >= 2 * window {
            heat.last = 0;
            heat.count = 0;
            heat.window = now;
        } else if elapsed >= window {
            heat.last = heat.count;
            heat.count = 0;
            heat.window += window;
        }
        heat.count = heat.count.saturating_add(1);
        (heat.last, heat.count)
    }

    /// Units to ask for with a request of a key seen `(last, current)`
    /// times, under a quota of `burst`; 0 when the key is not hot or a
    /// lease would be too small to matter.
    pub(super) fn units_for(&self, (last, current): (u32, u32), burst: u64) -> u64 {
        if last.max(current) < self.config.hot_after {
            return 0;
        }
        let most = burst / (2 * u64::from(self.config.replicas.max(1)));
        // Enough for the next window at the rate seen, with room to grow.
        let wanted = 2 * u64::from(last.max(current));
        let units = wanted.min(most);
        if units < 2 { 0 } else { units }
    }

    /// Takes `cost` units of the key's lease, if it has them and was
    /// granted under the request's quota (`t` ns per unit, `capacity` ns).
    pub(super) fn take(
        &self,
        key: &(u32, Key),
        cost: u64,
        (t, capacity): (u64, u64),
        now: u64,
    ) -> Option<(u64, u64)> {
        let mut lease = self.held.get_mut(key)?;
        if lease.ends <= now || lease.units < cost || lease.t != t || lease.capacity != capacity {
            return None;
        }
        lease.units -= cost;
        self.outstanding.fetch_sub(cost, Ordering::Relaxed);
        Some((lease.units, lease.reset_at.saturating_sub(now)))
    }

    /// Puts back units [`take`](Self::take) took, for a request another
    /// check denied.
    pub(super) fn untake(&self, key: &(u32, Key), cost: u64) {
        if let Some(mut lease) = self.held.get_mut(key) {
            lease.units += cost;
            self.outstanding.fetch_add(cost, Ordering::Relaxed);
        }
    }

    /// Marks a lease request for `key` as sent; `false` when one is already
    /// on its way (then this request asks for none), or too many keys are
    /// leased.
    pub(super) fn start_request(&self, key: &(u32, Key), now: u64, stale_after: u64) -> bool {
        if let Some(mut lease) = self.held.get_mut(key) {
            if lease
                .pending_since
                .is_some_and(|since| now.saturating_sub(since) < stale_after)
            {
                return false;
            }
            lease.pending_since = Some(now);
            return true;
        }
        if self.held.len() >= MAX_LEASES {
            return false;
        }
        self.held.insert(
            key.clone(),
            Lease {
                units: 0,
                ends: 0,
                reset_at: 0,
                pending_since: Some(now),
                name: String::new(),
                t: 0,
                left: (0, 0),
                capacity: 0,
            },
        );
        true
    }

    /// Ends a lease request: `granted` units (maybe 0) now held until
    /// `now + duration`. What an earlier lease of the key still held goes
    /// back.
    pub(super) fn settle(&self, key: &(u32, Key), granted: Option<Lease>, now: u64) {
        let granted = granted.filter(|g| g.units > 0);
        let Some(mut lease) = self.held.get_mut(key) else {
            // The sweep forgot the request (it outlived `stale_after`):
            // nothing will hand these units out, so they go back now
            // rather than stay charged until they drain.
            if let Some(mut late) = granted {
                self.queue_return(&mut late);
            }
            return;
        };
        lease.pending_since = None;
        let Some(new) = granted else {
            return;
        };
        if lease.units > 0 {
            self.give_back(&mut lease);
        }
        self.outstanding.fetch_add(new.units, Ordering::Relaxed);
        let ends = now + nanos(self.config.duration);
        *lease = Lease { ends, ..new };
    }

    /// Moves a held lease's unused units to the return queue.
    fn give_back(&self, lease: &mut Lease) {
        self.outstanding.fetch_sub(lease.units, Ordering::Relaxed);
        self.queue_return(lease);
    }

    /// Queues a lease's units to go back to Redis.
    fn queue_return(&self, lease: &mut Lease) {
        let units = std::mem::take(&mut lease.units);
        self.returns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Return {
                name: std::mem::take(&mut lease.name),
                charge: lease.t.saturating_mul(units),
                left: lease.left,
                units,
            });
    }

    /// Ends the leases whose time is up, and forgets idle ones; returns
    /// everything to give back.
    pub(super) fn sweep(&self, now: u64, stale_after: u64) -> Vec<Return> {
        self.held.retain(|_, lease| {
            if lease.ends > now {
                return true;
            }
            if lease.units > 0 {
                self.give_back(lease);
            }
            // Kept only while a request for it is on its way.
            lease
                .pending_since
                .is_some_and(|since| now.saturating_sub(since) < stale_after)
        });
        std::mem::take(&mut *self.returns.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn nanos(d: Duration) -> u64 {
    crate::rate_limit::clock::nanos(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client rotating keys cannot grow a replica's lease state: the
    /// detector is a fixed table, and leases stop at `MAX_LEASES`.
    #[test]
    fn lease_state_is_bounded_whatever_the_number_of_keys() {
        let leases = Leases::new(LeaseConfig {
            policies: vec!["hot".to_owned()],
            ..LeaseConfig::default()
        })
        .unwrap();
        let policy = crate::rate_limit::PolicyName::new("hot").id();
        let mut started = 0;
        for i in 0..(MAX_LEASES + 1000) {
            let key = (policy, Key::from(format!("k{i}")));
            for _ in 0..10 {
                leases.seen(&key, 0);
            }
            if leases.start_request(&key, 0, u64::MAX) {
                started += 1;
            }
        }
        assert_eq!(started, MAX_LEASES);
        assert_eq!(leases.held.len(), MAX_LEASES);
        assert_eq!(leases.heat.len(), HEAT_SLOTS);
        // Ended requests that leased nothing are swept away.
        for i in 0..MAX_LEASES {
            leases.settle(&(policy, Key::from(format!("k{i}"))), None, 0);
        }
        assert!(leases.sweep(1, 0).is_empty());
        assert_eq!(leases.held.len(), 0);
    }

    fn leases() -> (Leases, (u32, Key)) {
        let leases = Leases::new(LeaseConfig {
            policies: vec!["hot".to_owned()],
            ..LeaseConfig::default()
        })
        .unwrap();
        let key = (
            crate::rate_limit::PolicyName::new("hot").id(),
            Key::from("k"),
        );
        (leases, key)
    }

    fn grant(units: u64, t: u64, capacity: u64) -> Lease {
        Lease {
            units,
            ends: 0,
            reset_at: 0,
            pending_since: None,
            name: "tollgate:{3:hot:k}".to_owned(),
            t,
            left: (1, 0),
            capacity,
        }
    }

    /// A grant that arrives after the sweep forgot its request goes back,
    /// not nowhere (its units were charged in Redis).
    #[test]
    fn a_grant_settled_after_its_request_was_swept_is_given_back() {
        let (leases, key) = leases();
        assert!(leases.start_request(&key, 0, 10));
        // The request outlives `stale_after`: the sweep drops its entry.
        assert!(leases.sweep(100, 10).is_empty());
        assert!(leases.held.is_empty());
        leases.settle(&key, Some(grant(5, 1000, 100_000)), 100);
        let returns = leases.sweep(101, 10);
        assert_eq!(returns.len(), 1);
        assert_eq!((returns[0].units, returns[0].charge), (5, 5000));
        assert_eq!(leases.outstanding.load(Ordering::Relaxed), 0);
    }

    /// Units granted under one quota are not spent by a request of the same
    /// key under another (per-request quotas): a unit of the larger quota
    /// is worth less of the smaller one's allowance.
    #[test]
    fn a_lease_serves_only_requests_of_the_quota_it_was_granted_under() {
        let (leases, key) = leases();
        assert!(leases.start_request(&key, 0, 10));
        leases.settle(&key, Some(grant(5, 1000, 100_000)), 0);
        assert!(
            leases.take(&key, 1, (4000, 100_000), 1).is_none(),
            "a slower quota"
        );
        assert!(
            leases.take(&key, 1, (1000, 10_000), 1).is_none(),
            "a smaller burst"
        );
        assert_eq!(
            leases.take(&key, 1, (1000, 100_000), 1).map(|(u, _)| u),
            Some(4)
        );
    }
}
