//! Time for stores, injectable so tests control it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// `d` in whole nanoseconds, saturating (584 years fit in a `u64`): the
/// unit every store keeps time in.
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A monotonic clock: time elapsed since some fixed start.
pub trait Clock: Send + Sync + 'static {
    /// Time since this clock's start.
    fn now(&self) -> Duration;
}

/// Tokio's clock, so `tokio::time::pause()` and `advance()` control it in
/// tests: give it to [`MemoryStore::with_clock`](super::MemoryStore::with_clock)
/// in tests that pause time.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start: tokio::time::Instant,
}

impl TokioClock {
    /// A clock starting now.
    pub fn new() -> Self {
        Self {
            start: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }
}

/// The monotonic clock of the CPU's time-stamp counter (through `quanta`,
/// which falls back to the OS clock where the counter is unreliable): a few
/// nanoseconds a reading, where the OS clock costs tens. The default of
/// [`MemoryStore::new`](super::MemoryStore::new).
#[cfg(feature = "memory")]
#[derive(Debug, Clone)]
pub struct MonotonicClock {
    clock: quanta::Clock,
    start: u64,
}

#[cfg(feature = "memory")]
impl MonotonicClock {
    /// A clock starting now.
    pub fn new() -> Self {
        let clock = quanta::Clock::new();
        let start = clock.raw();
        Self { clock, start }
    }
}

#[cfg(feature = "memory")]
impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "memory")]
impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.clock.delta_as_nanos(self.start, self.clock.raw()))
    }
}

/// A clock that moves only when told, for tests and simulations.
///
/// ```
/// use std::time::Duration;
/// use tollgate::rate_limit::{Clock, ManualClock};
///
/// let clock = ManualClock::new();
/// clock.advance(Duration::from_secs(2));
/// assert_eq!(clock.now(), Duration::from_secs(2));
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.nanos.fetch_add(nanos(by), Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }
}
