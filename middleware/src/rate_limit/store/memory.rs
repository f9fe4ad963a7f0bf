//! The in-process store.

use std::fmt;
use std::future::{Ready, ready};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use dashmap::DashMap;
use smallvec::SmallVec;

use super::overflow::{Cells, Sketch};
use super::{Check, Decision, Decisions, Store, StoreError};
use crate::rate_limit::clock::{Clock, MonotonicClock, nanos};
use crate::rate_limit::gcra::Outcome;
use crate::rate_limit::key::Key;
use crate::rate_limit::policy::PolicyName;

/// How often [`MemoryStore::new`] sweeps out idle keys.
///
/// Idle keys cost memory, not correctness (an idle key decides exactly like
/// a missing one), so the sweep can be lazy; ten seconds keeps a flood of
/// one-shot keys from piling up for long.
pub const DEFAULT_PURGE_INTERVAL: Duration = Duration::from_secs(10);

type Table = DashMap<Key, AtomicU64, foldhash::fast::RandomState>;

/// Policies whose interned number is below this get a table found by one
/// atomic load; the rest (a process with more policies than this) by a map.
const DIRECT_TABLES: usize = 64;

/// One table of buckets per policy, so an entry holds only its key and its
/// state: 32 bytes, the same as governor's, and memory per key is what a
/// flood of distinct keys costs.
struct Tables {
    direct: Box<[OnceLock<Table>]>,
    overflow: DashMap<u32, Arc<Table>, foldhash::fast::RandomState>,
}

/// A policy's table, borrowed or (past [`DIRECT_TABLES`]) shared.
enum TableRef<'a> {
    Direct(&'a Table),
    Overflow(Arc<Table>),
}

impl std::ops::Deref for TableRef<'_> {
    type Target = Table;

    fn deref(&self) -> &Table {
        match self {
            Self::Direct(table) => table,
            Self::Overflow(table) => table,
        }
    }
}

impl Tables {
    fn new() -> Self {
        Self {
            direct: (0..DIRECT_TABLES).map(|_| OnceLock::new()).collect(),
            overflow: DashMap::with_hasher(foldhash::fast::RandomState::default()),
        }
    }

    fn of(&self, policy: PolicyName) -> TableRef<'_> {
        let new_table = || DashMap::with_hasher(foldhash::fast::RandomState::default());
        match self.direct.get(policy.id() as usize) {
            Some(slot) => TableRef::Direct(slot.get_or_init(new_table)),
            None => TableRef::Overflow(
                self.overflow
                    .entry(policy.id())
                    .or_insert_with(|| Arc::new(new_table()))
                    .clone(),
            ),
        }
    }

    fn each(&self, mut f: impl FnMut(&Table)) {
        self.direct
            .iter()
            .filter_map(OnceLock::get)
            .for_each(&mut f);
        self.overflow.iter().for_each(|table| f(table.value()));
    }

    fn len(&self) -> usize {
        let mut len = 0;
        self.each(|table| len += table.len());
        len
    }
}

/// GCRA state in this process's memory: the default store.
///
/// Each replica counts on its own, so N replicas let a client through up to
/// N times its quota; use a shared store for fleet-wide limits.
///
/// A key's whole state is one `u64` (its theoretical arrival time) in a
/// sharded hash map per policy; a check is a read and a compare-and-swap,
/// with no allocation and no lock held across keys. A batch of several checks is
/// decided all-or-nothing by reading every bucket, then swapping each in
/// turn; if another request changed a bucket in between, the swaps already
/// made are undone and the batch is decided again. Policies of the same
/// name share buckets: two checks of one name and key in a batch charge
/// that bucket one after the other.
///
/// # Memory
///
/// An IP key costs about 69 bytes of resident memory (a 32-byte entry in a
/// hash table kept at most half full), measured with
/// `cargo run --release -p tollgate --example memory_footprint`: 1 M
/// distinct IPv4 keys took RSS from 2.1 MiB to 68.3 MiB, and a purge after
/// they went idle brought it back to 2.2 MiB. A text key (tenant, subject) adds its
/// own allocation. Keys whose state has fully replenished are idle and
/// are swept out every [`DEFAULT_PURGE_INTERVAL`] by a background task
/// started by [`new`](MemoryStore::new) (it needs a Tokio runtime and ends
/// when the last clone of the store is dropped), so memory follows the
/// number of keys active within one quota window, not every key ever seen.
///
/// That number is the client's to choose (a new address per request): bound
/// it with [`with_max_keys`](Self::with_max_keys). Keys beyond the budget
/// are decided in a fixed-size overflow that never admits more than an
/// exact bucket would.
///
/// # Example
///
/// ```
/// use tollgate::rate_limit::{Check, Key, ManualClock, MemoryStore, Quota, Store};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let clock = ManualClock::new();
/// let store = MemoryStore::with_clock(clock.clone());
/// let check = Check {
///     policy: "ip".into(),
///     key: Key::from("192.0.2.1"),
///     quota: Quota::per_second(1),
///     cost: 1,
///     enforce: true,
/// };
/// assert!(store.check(&[check.clone()]).await.unwrap().allowed);
/// assert!(!store.check(&[check.clone()]).await.unwrap().allowed);
/// clock.advance(std::time::Duration::from_secs(1));
/// assert!(store.check(&[check]).await.unwrap().allowed);
/// # }
/// ```
pub struct MemoryStore<C = MonotonicClock> {
    inner: Arc<Inner<C>>,
}

struct Inner<C> {
    /// Theoretical arrival time per bucket, in nanoseconds of `clock`.
    buckets: Tables,
    clock: C,
    /// Whether a purge task runs already, so starting one is idempotent.
    purging: AtomicBool,
    /// The most exact entries, and the overflow beyond them; unset: no
    /// bound.
    budget: OnceLock<Budget>,
}

/// How many exact entries a store may hold, and where keys beyond them are
/// decided.
struct Budget {
    max: usize,
    /// Exact entries held (counted on insert and purge).
    entries: AtomicUsize,
    sketch: Mutex<Sketch>,
    /// Whether the sketch ever decided a key: from then on a new exact
    /// entry starts from the key's state in the sketch, so no key is freed
    /// into a fresh bucket when room appears.
    used: AtomicBool,
    overflow_decisions: AtomicU64,
    overflow_denials: AtomicU64,
}

impl Budget {
    fn full(&self) -> bool {
        self.entries.load(Ordering::Relaxed) >= self.max
    }

    fn sketch(&self) -> MutexGuard<'_, Sketch> {
        // Cells are raised in single statements; a panic leaves none
        // half-written.
        self.sketch.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The default width of the overflow sketch: 65 536 cells per row, 2 MiB.
pub const DEFAULT_OVERFLOW_WIDTH: usize = 1 << 16;

// === impl MemoryStore ===

impl MemoryStore<MonotonicClock> {
    /// A store on the [`MonotonicClock`] that sweeps idle keys every
    /// [`DEFAULT_PURGE_INTERVAL`] (when called within a Tokio runtime).
    pub fn new() -> Self {
        let store = Self::with_clock(MonotonicClock::new());
        store.start_purge(DEFAULT_PURGE_INTERVAL);
        store
    }
}

impl Default for MemoryStore<MonotonicClock> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C: Clock> MemoryStore<C> {
    /// A store on `clock`, with no purge task: call
    /// [`start_purge`](Self::start_purge) or [`purge`](Self::purge).
    pub fn with_clock(clock: C) -> Self {
        Self {
            inner: Arc::new(Inner {
                buckets: Tables::new(),
                clock,
                purging: AtomicBool::new(false),
                budget: OnceLock::new(),
            }),
        }
    }

    /// Holds at most about `max_keys` exact entries (a few more when new
    /// keys race for the last places); keys beyond them are decided in an
    /// overflow sketch of [`DEFAULT_OVERFLOW_WIDTH`] cells per row, whose
    /// memory is allocated now and never grows. See
    /// [`with_overflow_width`](Self::with_overflow_width). Call before the
    /// store is used; a second call changes nothing.
    #[must_use]
    pub fn with_max_keys(self, max_keys: usize) -> Self {
        self.with_overflow_width(max_keys, DEFAULT_OVERFLOW_WIDTH)
    }

    /// [`with_max_keys`](Self::with_max_keys) with a sketch of `width`
    /// cells per row (rounded up to a power of two, at least 64; 4 rows
    /// of 8-byte cells).
    ///
    /// # The overflow
    ///
    /// A key that has no exact entry when the store holds `max_keys` is
    /// decided in a count-min sketch of GCRA states with conservative
    /// update: its state is the smallest of its four cells, and a charge
    /// raises each of them to the new state. A cell is never lower than the state an exact
    /// bucket would have for any key that maps to it, so the sketch never
    /// admits more than an exact bucket would; keys that share cells may be
    /// denied early. Nothing is evicted: a key over its limit stays over it
    /// however many keys arrive, and when room for exact entries returns
    /// (idle keys purged), a new entry starts from the key's state in the
    /// sketch, not from a full bucket. Decisions in the sketch take one
    /// lock (only keys beyond the budget, and new keys once it was used).
    #[must_use]
    pub fn with_overflow_width(self, max_keys: usize, width: usize) -> Self {
        let _ = self.inner.budget.set(Budget {
            max: max_keys,
            entries: AtomicUsize::new(self.inner.buckets.len()),
            sketch: Mutex::new(Sketch::new(width)),
            used: AtomicBool::new(false),
            overflow_decisions: AtomicU64::new(0),
            overflow_denials: AtomicU64::new(0),
        });
        self
    }

    /// The overflow: (decisions made in it, of which denials, its bytes);
    /// `None` without a budget.
    pub fn overflow_stats(&self) -> Option<(u64, u64, usize)> {
        self.inner.budget.get().map(|budget| {
            (
                budget.overflow_decisions.load(Ordering::Relaxed),
                budget.overflow_denials.load(Ordering::Relaxed),
                budget.sketch().bytes(),
            )
        })
    }

    /// Sweeps idle keys every `every` on a background Tokio task, which ends
    /// when the last clone of the store is dropped. Returns `false` (and
    /// starts nothing) outside a Tokio runtime or when a task runs already.
    pub fn start_purge(&self, every: Duration) -> bool {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        if self.inner.purging.swap(true, Ordering::AcqRel) {
            return false;
        }
        let weak: Weak<Inner<C>> = Arc::downgrade(&self.inner);
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                let removed = inner.purge();
                let kept = inner.buckets.len();
                tracing::trace!(removed, kept, "purged idle rate-limit keys");
                #[cfg(feature = "metrics")]
                metrics::gauge!(crate::metrics::RATELIMIT_MEMORY_ENTRIES).set(kept as f64);
            }
        });
        true
    }

    /// Removes every idle key (fully replenished, so deciding exactly like
    /// a missing one) and returns how many were removed.
    pub fn purge(&self) -> usize {
        self.inner.purge()
    }

    /// Keys currently held.
    pub fn len(&self) -> usize {
        self.inner.buckets.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.inner.buckets.len() == 0
    }

    fn decide(&self, checks: &[Check]) -> Decisions {
        let now = nanos(self.inner.clock.now());
        if let [check] = checks {
            if let Some(decisions) = self.inner.decide_one(check, now) {
                return decisions;
            }
        }
        let tables: SmallVec<[TableRef<'_>; 4]> = checks
            .iter()
            .map(|check| self.inner.buckets.of(check.policy))
            .collect();
        let budget = self.inner.budget.get();
        // Beyond the budget, a key without an entry is decided in the
        // sketch; once the sketch was used, a new entry starts from it.
        let overflow: SmallVec<[bool; 4]> = checks
            .iter()
            .zip(&tables)
            .map(|(check, table)| {
                budget.is_some_and(|b| b.full() && !table.contains_key(&check.key))
            })
            .collect();
        let mut sketch = budget
            .filter(|b| overflow.contains(&true) || b.used.load(Ordering::Acquire))
            .map(Budget::sketch);
        let cells: SmallVec<[Option<Cells>; 4]> = checks
            .iter()
            .map(|check| sketch.as_ref().map(|s| s.cells(check.policy, &check.key)))
            .collect();
        'decide: loop {
            // Per check: the state it was decided on, whether that state
            // is an exact entry, and the outcome.
            let mut seen: SmallVec<[(Option<u64>, bool, Outcome); 4]> = SmallVec::new();
            let mut allowed = true;
            for (i, (check, table)) in checks.iter().zip(&tables).enumerate() {
                // Policies of one name share buckets: a check of a bucket an
                // earlier check of this batch charges is decided after that
                // charge (and its swap expects what that one writes).
                let earlier = checks[..i]
                    .iter()
                    .rposition(|c| c.policy == check.policy && c.key == check.key);
                let in_sketch = |s: &Option<MutexGuard<'_, Sketch>>| {
                    s.as_ref()
                        .zip(cells[i].as_ref())
                        .and_then(|(s, c)| s.state(c))
                };
                let (stored, exact) = match earlier {
                    Some(j) if seen[j].2.allowed => (Some(seen[j].2.new_tat), !overflow[j]),
                    Some(j) => (seen[j].0, seen[j].1),
                    None if overflow[i] => (in_sketch(&sketch), false),
                    None => match table.get(&check.key) {
                        Some(tat) => (Some(tat.load(Ordering::Acquire)), true),
                        None => (in_sketch(&sketch), false),
                    },
                };
                let outcome = check.quota.gcra().evaluate(stored, now, check.cost);
                allowed &= outcome.allowed || !check.enforce;
                seen.push((stored, exact, outcome));
            }
            if let Some(budget) = budget {
                count_overflow(budget, &overflow, &seen, allowed);
            }
            if !allowed {
                // Nothing is charged: report each bucket as it stands.
                let each = checks
                    .iter()
                    .zip(&seen)
                    .map(|(check, &(stored, _, outcome))| {
                        if outcome.allowed {
                            decision(check.quota.gcra().evaluate(stored, now, 0))
                        } else {
                            decision(outcome)
                        }
                    })
                    .collect();
                return Decisions { allowed, each };
            }
            for (i, (check, &(stored, exact, outcome))) in checks.iter().zip(&seen).enumerate() {
                // A denying shadow check is reported, not charged; the
                // sketch is charged below, once every entry is.
                if !outcome.allowed || overflow[i] {
                    continue;
                }
                let expected = if exact { stored } else { None };
                if !swap(&tables[i], &check.key, expected, outcome.new_tat, budget) {
                    // Raced with another request: undo (latest first, so a
                    // bucket charged twice is restored exactly) and decide
                    // again.
                    for (j, (check, &(stored, _, outcome))) in
                        checks.iter().zip(&seen).enumerate().take(i).rev()
                    {
                        if outcome.allowed && !overflow[j] {
                            let charge = check.quota.gcra().charge(check.cost);
                            undo(&tables[j], &check.key, stored, outcome.new_tat, charge);
                        }
                    }
                    continue 'decide;
                }
            }
            if let Some(sketch) = sketch.as_mut() {
                for (i, &(_, _, outcome)) in seen.iter().enumerate() {
                    if let (true, true, Some(cells)) = (overflow[i], outcome.allowed, &cells[i]) {
                        sketch.raise(cells, outcome.new_tat);
                    }
                }
            }
            let each = seen
                .iter()
                .map(|&(_, _, outcome)| decision(outcome))
                .collect();
            return Decisions { allowed, each };
        }
    }
}

impl<C> Inner<C> {
    /// One check: one lookup, then compare-and-swap on the bucket while
    /// holding it, as governor does. `None`: a new key of a store whose
    /// budget is full or whose sketch was used (the general path decides
    /// it).
    fn decide_one(&self, check: &Check, now: u64) -> Option<Decisions> {
        let gcra = check.quota.gcra();
        let table = self.buckets.of(check.policy);
        if let Some(tat) = table.get(&check.key) {
            let mut stored = tat.load(Ordering::Acquire);
            loop {
                let outcome = gcra.evaluate(Some(stored), now, check.cost);
                if !outcome.allowed {
                    return Some(single(outcome, !check.enforce));
                }
                match tat.compare_exchange_weak(
                    stored,
                    outcome.new_tat,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return Some(single(outcome, true)),
                    Err(current) => stored = current,
                }
            }
        }
        let budget = self.budget.get();
        if budget.is_some_and(|b| b.full() || b.used.load(Ordering::Acquire)) {
            return None;
        }
        let outcome = gcra.evaluate(None, now, check.cost);
        if outcome.allowed && !swap(&table, &check.key, None, outcome.new_tat, budget) {
            // Another request created the bucket first: decide against it.
            return self.decide_one(check, now);
        }
        Some(single(outcome, outcome.allowed || !check.enforce))
    }
}

/// Counts a batch's decisions made in the overflow sketch (and marks the
/// sketch used).
fn count_overflow(
    budget: &Budget,
    overflow: &[bool],
    seen: &[(Option<u64>, bool, Outcome)],
    allowed: bool,
) {
    let mut decided = 0;
    let mut denied = 0;
    for (_, &(_, _, outcome)) in overflow.iter().zip(seen).filter(|(o, _)| **o) {
        decided += 1;
        denied += u64::from(!outcome.allowed || !allowed);
    }
    if decided == 0 {
        return;
    }
    budget.used.store(true, Ordering::Release);
    budget
        .overflow_decisions
        .fetch_add(decided, Ordering::Relaxed);
    budget.overflow_denials.fetch_add(denied, Ordering::Relaxed);
    #[cfg(feature = "metrics")]
    {
        metrics::counter!(crate::metrics::RATELIMIT_OVERFLOW_DECISIONS).increment(decided);
        metrics::counter!(crate::metrics::RATELIMIT_OVERFLOW_DENIALS).increment(denied);
    }
}

/// Stores `new` if the bucket still holds `expected` (`None`: the bucket
/// does not exist yet; its creation is counted in `budget`).
fn swap(
    table: &Table,
    key: &Key,
    expected: Option<u64>,
    new: u64,
    budget: Option<&Budget>,
) -> bool {
    match expected {
        Some(expected) => table.get(key).is_some_and(|tat| {
            tat.compare_exchange(expected, new, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        }),
        None => match table.entry(key.clone()) {
            dashmap::Entry::Vacant(slot) => {
                slot.insert(AtomicU64::new(new));
                if let Some(budget) = budget {
                    budget.entries.fetch_add(1, Ordering::Relaxed);
                }
                true
            }
            dashmap::Entry::Occupied(_) => false,
        },
    }
}

/// Takes back a charge made by [`swap`]: restores the old state if nobody
/// charged since, else subtracts the charge.
fn undo(table: &Table, key: &Key, old: Option<u64>, written: u64, charge: u64) {
    if let Some(tat) = table.get(key) {
        let _ = tat.fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
            Some(if current == written {
                old.unwrap_or(0)
            } else {
                current.saturating_sub(charge)
            })
        });
    }
}

impl<C: Clock> Inner<C> {
    fn purge(&self) -> usize {
        let now = nanos(self.clock.now());
        let mut removed = 0;
        self.buckets.each(|table| {
            let before = table.len();
            table.retain(|_, tat| *tat.get_mut() > now);
            let after = table.len();
            // Give memory back after a flood of one-shot keys has passed.
            if after.saturating_mul(4) < table.capacity() {
                table.shrink_to_fit();
            }
            removed += before.saturating_sub(after);
        });
        if let Some(budget) = self.budget.get() {
            budget.entries.fetch_sub(removed, Ordering::Relaxed);
        }
        removed
    }
}

impl<C: Clock> Store for MemoryStore<C> {
    type Future = Ready<Result<Decisions, StoreError>>;

    fn check(&self, checks: &[Check]) -> Self::Future {
        ready(Ok(self.decide(checks)))
    }

    fn check_now(&self, checks: &[Check]) -> Option<Result<Decisions, StoreError>> {
        Some(Ok(self.decide(checks)))
    }
}

impl<C> Clone for MemoryStore<C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<C> fmt::Debug for MemoryStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("keys", &self.inner.buckets.len())
            .finish_non_exhaustive()
    }
}

fn single(outcome: Outcome, batch_allowed: bool) -> Decisions {
    let mut each = SmallVec::new();
    each.push(decision(outcome));
    Decisions {
        allowed: batch_allowed,
        each,
    }
}

fn decision(outcome: Outcome) -> Decision {
    Decision {
        allowed: outcome.allowed,
        remaining: outcome.remaining,
        reset_after: Duration::from_nanos(outcome.reset_after),
        retry_after: Duration::from_nanos(outcome.retry_after),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limit::{Key, ManualClock, Quota};
    use governor::clock::FakeRelativeClock;
    use proptest::prelude::*;
    use std::num::NonZeroU32;

    fn check(policy: &str, key: &str, quota: Quota, cost: u32) -> Check {
        Check {
            policy: policy.into(),
            key: Key::from(key),
            quota,
            cost,
            enforce: true,
        }
    }

    fn decide(store: &MemoryStore<ManualClock>, checks: &[Check]) -> Decisions {
        store.decide(checks)
    }

    #[test]
    fn exact_sequence_with_burst_refill_and_retry_after() {
        let clock = ManualClock::new();
        let store = MemoryStore::with_clock(clock.clone());
        // 60 per minute, burst 3: one unit per second.
        let c = check("ip", "a", Quota::per_minute(60).with_burst(3), 1);
        for remaining in [2, 1, 0] {
            let d = decide(&store, std::slice::from_ref(&c));
            assert!(d.allowed);
            assert_eq!(d.each[0].remaining, remaining);
        }
        let d = decide(&store, std::slice::from_ref(&c)).each[0];
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Duration::from_secs(1));
        assert_eq!(d.reset_after, Duration::from_secs(3));
        clock.advance(Duration::from_millis(999));
        let d = decide(&store, std::slice::from_ref(&c)).each[0];
        assert_eq!(
            (d.allowed, d.retry_after),
            (false, Duration::from_millis(1))
        );
        clock.advance(Duration::from_millis(1));
        let d = decide(&store, std::slice::from_ref(&c)).each[0];
        assert_eq!((d.allowed, d.remaining), (true, 0));
        assert_eq!(d.reset_after, Duration::from_secs(3));
        // Other keys and other policies are untouched.
        assert!(decide(&store, &[check("ip", "b", c.quota, 1)]).allowed);
        assert!(decide(&store, &[check("tenant", "a", c.quota, 1)]).allowed);
    }

    #[test]
    fn cost_above_one_and_above_burst() {
        let clock = ManualClock::new();
        let store = MemoryStore::with_clock(clock.clone());
        let q = Quota::per_second(10).with_burst(5);
        let d = decide(&store, &[check("p", "k", q, 4)]);
        assert_eq!((d.allowed, d.each[0].remaining), (true, 1));
        let d = decide(&store, &[check("p", "k", q, 2)]).each[0];
        assert_eq!((d.allowed, d.remaining), (false, 1));
        assert_eq!(d.retry_after, Duration::from_millis(100));
        let d = decide(&store, &[check("p", "other", q, 6)]).each[0];
        assert!(!d.allowed);
        assert!(store.len() == 1, "a denied check stores nothing");
    }

    #[test]
    fn batch_is_all_or_nothing() {
        let store = MemoryStore::with_clock(ManualClock::new());
        let roomy = check("ip", "a", Quota::per_minute(10), 1);
        let tight = check("tenant", "t", Quota::per_minute(1), 1);
        assert!(decide(&store, &[roomy.clone(), tight.clone()]).allowed);
        // The tenant is spent: the batch is denied, and the IP is not charged.
        for _ in 0..5 {
            let d = decide(&store, &[roomy.clone(), tight.clone()]);
            assert!(!d.allowed);
            assert!(d.each[0].allowed && !d.each[1].allowed);
            assert_eq!(d.each[0].remaining, 9, "uncharged remaining is reported");
        }
        let d = decide(&store, &[roomy]);
        assert_eq!(d.each[0].remaining, 8);
    }

    #[test]
    fn shadow_denial_does_not_deny_the_batch() {
        let store = MemoryStore::with_clock(ManualClock::new());
        let enforced = check("ip", "a", Quota::per_minute(10), 1);
        let mut shadow = check("new-limit", "a", Quota::per_minute(1), 1);
        shadow.enforce = false;
        assert!(decide(&store, &[enforced.clone(), shadow.clone()]).allowed);
        let d = decide(&store, &[enforced, shadow]);
        assert!(d.allowed);
        assert!(!d.each[1].allowed);
        assert_eq!(d.each[0].remaining, 8);
    }

    #[test]
    fn purge_removes_only_idle_keys_and_changes_no_decision() {
        let clock = ManualClock::new();
        let store = MemoryStore::with_clock(clock.clone());
        let q = Quota::per_second(1).with_burst(2);
        decide(&store, &[check("p", "idle", q, 1)]);
        decide(&store, &[check("p", "busy", q, 2)]);
        clock.advance(Duration::from_millis(1500));
        assert_eq!(store.purge(), 1);
        assert_eq!(store.len(), 1);
        let d = decide(&store, &[check("p", "busy", q, 1)]);
        assert_eq!((d.allowed, d.each[0].remaining), (true, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn purge_task_runs_on_tokio_clock_and_stops_with_the_store() {
        let store = MemoryStore::with_clock(crate::rate_limit::TokioClock::new());
        assert!(store.start_purge(DEFAULT_PURGE_INTERVAL));
        assert!(
            !store.start_purge(DEFAULT_PURGE_INTERVAL),
            "one task per store"
        );
        let weak = Arc::downgrade(&store.inner);
        store
            .check(&[check("p", "k", Quota::per_second(1), 1)])
            .await
            .unwrap();
        assert_eq!(store.len(), 1);
        tokio::time::sleep(DEFAULT_PURGE_INTERVAL + Duration::from_millis(1)).await;
        assert_eq!(store.len(), 0);
        drop(store);
        tokio::time::sleep(DEFAULT_PURGE_INTERVAL * 2).await;
        assert!(weak.upgrade().is_none());
    }

    #[test]
    fn concurrent_checks_never_exceed_the_burst() {
        let store = MemoryStore::with_clock(ManualClock::new());
        let allowed = AtomicU64::new(0);
        let a = check("ip", "a", Quota::per_hour(100), 1);
        let b = check("tenant", "t", Quota::per_hour(150), 1);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        if store.decide(&[a.clone(), b.clone()]).allowed {
                            allowed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(allowed.load(Ordering::Relaxed), 100);
        // The tenant bucket was charged exactly for the allowed requests.
        let d = decide(&store, &[b]);
        assert_eq!(d.each[0].remaining, 150 - 100 - 1);
    }

    /// Replays what a bounded store admitted, key by key, into an exact
    /// unbounded one: every request must be allowed there too, or the
    /// bounded store admitted more than an exact bucket would.
    fn assert_conformant(admitted: &[(u64, Check)]) {
        let clock = ManualClock::new();
        let exact = MemoryStore::with_clock(clock.clone());
        let mut at = 0;
        for (t, check) in admitted {
            clock.advance(Duration::from_nanos(t - at));
            at = *t;
            let d = exact.decide(std::slice::from_ref(check));
            assert!(
                d.allowed,
                "admitted beyond an exact bucket: {check:?} at {t} ns"
            );
        }
    }

    #[test]
    fn a_key_over_its_limit_stays_over_it_when_room_returns() {
        let clock = ManualClock::new();
        let store = MemoryStore::with_clock(clock.clone()).with_overflow_width(4, 64);
        // Four short-lived keys fill the budget.
        for k in 0..4 {
            let c = check("ip", &format!("short{k}"), Quota::per_second(1), 1);
            assert!(decide(&store, &[c]).allowed);
        }
        assert_eq!(store.len(), 4);
        // A spraying client's key lands in the sketch and exhausts it.
        let slow = check("ip", "sprayer", Quota::per_hour(10), 1);
        let admitted = (0..20)
            .filter(|_| decide(&store, std::slice::from_ref(&slow)).allowed)
            .count();
        assert_eq!(admitted, 10, "the sketch admitted more than the burst");
        assert_eq!(store.len(), 4, "the overflow made an exact entry");
        // The short keys go idle and are purged: room for exact entries.
        clock.advance(Duration::from_secs(2));
        assert_eq!(store.purge(), 4);
        // The sprayer gets an entry now, starting from its sketch state.
        assert!(!decide(&store, std::slice::from_ref(&slow)).allowed);
        assert_eq!(store.len(), 0, "a denied key needs no entry");
        let (decisions, denials, bytes) = store.overflow_stats().unwrap();
        assert_eq!((decisions, denials, bytes), (20, 10, 4 * 64 * 8));
    }

    proptest! {
        /// Random keys, costs, quotas and time steps on a store with room
        /// for 3 exact entries and a sketch of 64 cells per row (collisions
        /// forced): whatever it admits, an exact bucket admits too.
        #[test]
        fn the_overflow_never_admits_more_than_an_exact_bucket(
            steps in proptest::collection::vec(
                (0u16..300, 1u32..4, 0u64..50, any::<bool>(), any::<bool>()),
                1..400,
            ),
        ) {
            let clock = ManualClock::new();
            let store = MemoryStore::with_clock(clock.clone()).with_overflow_width(3, 64);
            let quotas = [Quota::per_second(5).with_burst(3), Quota::per_minute(20)];
            let mut now = 0u64;
            let mut admitted = Vec::new();
            for (key, cost, step_ms, slow, pair) in steps {
                clock.advance(Duration::from_millis(step_ms));
                now += step_ms * 1_000_000;
                let quota = quotas[usize::from(slow)];
                let mut checks = vec![check("ip", &key.to_string(), quota, cost)];
                if pair {
                    // Two policies decided together, the second on a key of
                    // its own.
                    checks.push(check("user", &(key / 7).to_string(), quotas[0], 1));
                }
                let d = decide(&store, &checks);
                if d.allowed {
                    admitted.extend(checks.into_iter().map(|c| (now, c)));
                }
                if step_ms % 7 == 0 {
                    store.purge();
                }
            }
            // Replayed policy by policy and key by key, in time order.
            let mut by_key: std::collections::BTreeMap<String, Vec<(u64, Check)>> =
                Default::default();
            for (t, c) in admitted {
                by_key.entry(format!("{}/{}", c.policy, c.key)).or_default().push((t, c));
            }
            for requests in by_key.values() {
                assert_conformant(requests);
            }
            prop_assert!(store.len() <= 3 + 1, "{} exact entries", store.len());
        }
    }

    proptest! {
        /// Same decisions and waits as governor's keyed limiter, request by
        /// request, for random quotas, costs and time steps.
        #[test]
        fn matches_governor(
            count in 1u32..50,
            period_ms in 1u64..5_000,
            burst in 1u32..20,
            steps in proptest::collection::vec((0u8..3, 1u32..25, 0u64..400), 1..200),
        ) {
            let quota = Quota::new(count, Duration::from_millis(period_ms)).with_burst(burst);
            let gov_quota = governor::Quota::with_period(quota.replenish_interval())
                .unwrap()
                .allow_burst(NonZeroU32::new(burst).unwrap());
            let gov_clock = FakeRelativeClock::default();
            let gov: governor::RateLimiter<
                u8,
                _,
                FakeRelativeClock,
                governor::middleware::NoOpMiddleware<governor::nanos::Nanos>,
            > = governor::RateLimiter::new(
                gov_quota,
                governor::state::keyed::DefaultKeyedStateStore::<u8>::default(),
                gov_clock.clone(),
            );
            let clock = ManualClock::new();
            let store = MemoryStore::with_clock(clock.clone());
            // The same policy decided in batches with a shadow companion
            // takes the multi-check path and must decide alike.
            let batched = MemoryStore::with_clock(clock.clone());
            let mut companion = check("companion", "k", Quota::per_second(1), 1);
            companion.enforce = false;
            for (key, cost, step_ms) in steps {
                let step = Duration::from_millis(step_ms);
                clock.advance(step);
                gov_clock.advance(step);
                let ours = decide(&store, &[check("p", &key.to_string(), quota, cost)]).each[0];
                let batch = decide(&batched, &[check("p", &key.to_string(), quota, cost), companion.clone()]);
                prop_assert_eq!(batch.each[0], ours);
                prop_assert_eq!(batch.allowed, ours.allowed);
                match gov.check_key_n(&key, NonZeroU32::new(cost).unwrap()) {
                    Ok(Ok(())) => prop_assert!(ours.allowed),
                    Ok(Err(not_until)) => {
                        prop_assert!(!ours.allowed);
                        use governor::clock::Clock as _;
                        prop_assert_eq!(ours.retry_after, not_until.wait_time_from(gov_clock.now()));
                    }
                    Err(_insufficient) => prop_assert!(!ours.allowed),
                }
            }
        }
    }

    /// Two policies of one name (or a shadow copy under the same name) in
    /// one batch share the bucket: both charge it, and the batch ends.
    #[test]
    fn same_policy_and_key_twice_in_a_batch_shares_the_bucket() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let store = MemoryStore::with_clock(ManualClock::new());
            let quota = Quota::per_minute(3);
            let mut shadow = check("ip", "a", quota, 1);
            shadow.enforce = false;
            let first = decide(
                &store,
                &[check("ip", "a", quota, 1), check("ip", "a", quota, 1)],
            );
            let second = decide(&store, &[check("ip", "a", quota, 1), shadow.clone()]);
            let third = decide(&store, &[check("ip", "a", quota, 1)]);
            let _ = tx.send((first, second, third));
        });
        let (first, second, third) = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("a batch with one bucket twice never finished");
        assert!(first.allowed);
        assert_eq!(
            first.each[1].remaining, 1,
            "the second check saw the first's charge"
        );
        // One unit left: the enforced check takes it, the shadow copy is
        // then over (reported, not enforced).
        assert!(second.allowed);
        assert!(!second.each[1].allowed);
        assert!(!third.allowed);
    }
}
